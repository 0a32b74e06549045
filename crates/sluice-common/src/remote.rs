//! Object storage: `s3://bucket/prefix` (and `file://`) locations for
//! checkpoints, file sources and file sinks, through `object_store`.
//!
//! A file source reads and a file sink writes objects directly (see
//! `sluice-connectors`). A **checkpoint** in a bucket is *mounted*: the
//! engine keeps working on a local directory, a cache, and every durable
//! write below it is written through to the bucket as one `PUT` of the
//! whole file before the write returns. The bucket is the checkpoint; the
//! cache is only a copy:
//!
//! - [`local_dir`] mounts a URL on a cache directory of this process
//!   (`$TMPDIR/sluice-mounts/<pid>-<hash of the URL>`) and [`sync`]s it;
//! - [`sync`] brings a directory of a mount in line with the bucket:
//!   objects that are new or changed (by ETag) are downloaded, files the
//!   bucket does not hold are removed. A checkpoint's open syncs the whole
//!   mount, and a cluster task syncs its state partition before it loads it;
//! - the writes of [`crate::durable`] call [`put`] after the local write,
//!   and the batch log calls [`put_file`] after an append; a failed `PUT`
//!   fails the write, so the commit protocol's order (state, then commit
//!   record) is the order in which objects land in the bucket.
//!
//! A `PUT` of an object is atomic on S3: a reader gets the old object or the
//! new one, never part of one, which is what the local temp-file-and-rename
//! gives on a disk.
//!
//! Stores come from [`register_store`] (tests register one with an explicit
//! endpoint) or else from the environment, as `object_store` reads it:
//! `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION`, `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint.

use std::collections::HashMap;
use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::{Error, Result};

/// Whether `path` is written as an object-store URL (`s3://`, `s3a://`,
/// `file://`) rather than a local path.
pub fn is_url(path: &Path) -> bool {
    path.to_str().is_some_and(|s| {
        s.starts_with("s3://") || s.starts_with("s3a://") || s.starts_with("file://")
    })
}

/// Where a path given by a user points.
#[derive(Debug, Clone)]
pub enum Location {
    /// A local path (a `file://` URL is one too).
    Local(PathBuf),
    /// A prefix in an object store.
    Store {
        /// The URL as given, without a trailing `/`.
        url: String,
        /// The store (its bucket).
        store: Arc<dyn ObjectStore>,
        /// The prefix inside the store (may be empty).
        prefix: ObjectPath,
    },
}

impl Location {
    /// Parses `path`: a local path, a `file://` URL, or an `s3://` URL.
    pub fn parse(path: &Path) -> Result<Location> {
        let Some(s) = path.to_str().filter(|_| is_url(path)) else {
            return Ok(Location::Local(path.to_path_buf()));
        };
        if let Some(local) = s.strip_prefix("file://") {
            if !local.starts_with('/') {
                return Err(Error::plan(format!(
                    "'{s}': a file:// URL needs an absolute path (file:///dir)"
                )));
            }
            return Ok(Location::Local(PathBuf::from(local)));
        }
        let url = s.trim_end_matches('/').to_string();
        let (scheme, rest) = url.split_once("://").unwrap_or(("s3", ""));
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::plan(format!("'{s}': no bucket in the URL")));
        }
        let prefix = ObjectPath::parse(prefix)
            .map_err(|e| Error::plan(format!("'{s}': not a valid object path: {e}")))?;
        let store = store_for(&format!("{scheme}://{bucket}"))?;
        Ok(Location::Store { url, store, prefix })
    }
}

fn registry() -> &'static RwLock<HashMap<String, Arc<dyn ObjectStore>>> {
    static STORES: OnceLock<RwLock<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    STORES.get_or_init(Default::default)
}

/// Makes `store` the one used for every URL of the bucket `bucket_url`
/// (`s3://bucket`) in this process, instead of one built from the
/// environment.
pub fn register_store(bucket_url: &str, store: Arc<dyn ObjectStore>) {
    registry()
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(bucket_url.trim_end_matches('/').to_string(), store);
}

/// The store of a bucket URL: the registered one, or an S3 client
/// configured from the environment (built once per bucket).
fn store_for(bucket_url: &str) -> Result<Arc<dyn ObjectStore>> {
    if let Some(s) = registry()
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(bucket_url)
    {
        return Ok(Arc::clone(s));
    }
    let store: Arc<dyn ObjectStore> = Arc::new(
        AmazonS3Builder::from_env()
            .with_url(bucket_url)
            .build()
            .map_err(|e| Error::plan(format!("{bucket_url}: {e}")))?,
    );
    register_store(bucket_url, Arc::clone(&store));
    Ok(store)
}

/// Runs `fut` on Sluice's object-store runtime and waits for it, from any
/// thread (an engine thread inside a tokio runtime too): durable writes are
/// synchronous, like the file writes they stand beside.
pub fn block_on<F>(fut: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sluice-object-store")
            .enable_all()
            .build()
            .expect("building the object-store runtime")
    });
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .expect("the object-store runtime dropped a request")
}

/// A URL mounted on a local cache directory.
#[derive(Debug)]
struct Mount {
    url: String,
    local: PathBuf,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// The ETag of each cached file as the bucket held it when it was
    /// downloaded or put: a file whose object still has it is current.
    etags: Mutex<HashMap<PathBuf, Option<String>>>,
}

impl Mount {
    fn object(&self, path: &Path) -> Option<ObjectPath> {
        let rel = path.strip_prefix(&self.local).ok()?;
        let mut parts: Vec<String> = self
            .prefix
            .parts()
            .map(|p| p.as_ref().to_string())
            .collect();
        for c in rel.components() {
            parts.push(c.as_os_str().to_str()?.to_string());
        }
        Some(ObjectPath::from_iter(parts))
    }

    fn local_of(&self, object: &ObjectPath) -> Option<PathBuf> {
        let rel = object.prefix_match(&self.prefix)?;
        let mut p = self.local.clone();
        for part in rel {
            p.push(part.as_ref());
        }
        Some(p)
    }

    fn etags(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Option<String>>> {
        self.etags.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn mounts() -> &'static RwLock<Vec<Arc<Mount>>> {
    static MOUNTS: OnceLock<RwLock<Vec<Arc<Mount>>>> = OnceLock::new();
    MOUNTS.get_or_init(Default::default)
}

fn mount_of(path: &Path) -> Option<Arc<Mount>> {
    mounts()
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|m| path.starts_with(&m.local))
        .cloned()
}

/// The local directory to work in for `path`: `path` itself when it is
/// local, the path of a `file://` URL, or the cache directory an `s3://`
/// URL is mounted on in this process (mounted and [`sync`]ed with the
/// bucket on the first call; a later call returns the same directory as it
/// is, and whoever needs it current syncs what it reads).
pub fn local_dir(path: &Path) -> Result<PathBuf> {
    mount(path, true)
}

/// [`local_dir`] without the first sync: the cache starts empty, and the
/// caller [`sync`]s each directory before it reads it (a cluster task reads
/// its state partition alone, and need not download the whole checkpoint).
pub fn local_dir_unsynced(path: &Path) -> Result<PathBuf> {
    mount(path, false)
}

fn mount(path: &Path, synced: bool) -> Result<PathBuf> {
    let (url, store, prefix) = match Location::parse(path)? {
        Location::Local(p) => return Ok(p),
        Location::Store { url, store, prefix } => (url, store, prefix),
    };
    // Looked up and, the first time, made and synced under the table's
    // write lock: two tasks of an executor mounting at once must not both
    // make (and the second empty) the cache, and none may use it before
    // it holds what the bucket does.
    let mut all = mounts().write().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = all.iter().find(|m| m.url == url) {
        return Ok(m.local.clone());
    }
    let local = cache_root().join(format!(
        "{}-{:016x}",
        std::process::id(),
        fnv1a(url.as_bytes())
    ));
    // A directory of this name is an earlier process's (the same pid):
    // nothing in it is known to be current.
    let _ = fs::remove_dir_all(&local);
    fs::create_dir_all(&local)
        .map_err(|e| Error::io(format!("creating {}", local.display()), e))?;
    let m = Arc::new(Mount {
        url,
        local,
        store,
        prefix,
        etags: Mutex::new(HashMap::new()),
    });
    if synced {
        sync_in(&m, &m.local)?;
    }
    all.push(Arc::clone(&m));
    Ok(m.local.clone())
}

/// The URL a mounted local path stands for (`None` when it is not in a
/// mount): what to send to another process that should mount it too.
pub fn url_of(path: &Path) -> Option<String> {
    let m = mount_of(path)?;
    let rel = path.strip_prefix(&m.local).ok()?;
    let mut url = m.url.clone();
    for c in rel.components() {
        url.push('/');
        url.push_str(c.as_os_str().to_str()?);
    }
    Some(url)
}

fn cache_root() -> PathBuf {
    let root = std::env::temp_dir().join("sluice-mounts");
    // Caches of processes that no longer run go (Linux: per /proc).
    if Path::new("/proc/self").exists()
        && let Ok(entries) = fs::read_dir(&root)
    {
        for e in entries.flatten() {
            let name = e.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.split('-').next()?.parse::<u32>().ok());
            if let Some(pid) = pid
                && pid != std::process::id()
                && !Path::new("/proc").join(pid.to_string()).exists()
            {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    root
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn store_error(what: String, e: object_store::Error) -> std::io::Error {
    std::io::Error::other(format!("{what}: {e}"))
}

/// Brings `dir` (a directory of a mount, or the mount itself) in line with
/// the bucket: downloads every object below it that the cache lacks or
/// holds at another ETag, and removes cached files the bucket does not
/// hold (but not `lock` or temporary files, which are local). Does nothing
/// for a directory outside every mount.
pub fn sync(dir: &Path) -> Result<()> {
    match mount_of(dir) {
        Some(m) => sync_in(&m, dir),
        None => Ok(()),
    }
}

/// [`sync`] of `dir`, a directory of mount `m` (takes no lock of the
/// mount table).
fn sync_in(m: &Mount, dir: &Path) -> Result<()> {
    let what = || format!("syncing {} from {}", dir.display(), m.url);
    let prefix = m
        .object(dir)
        .ok_or_else(|| Error::internal(format!("{} is not in its mount", dir.display())))?;
    let store = Arc::clone(&m.store);
    let listed = block_on(async move { store.list(Some(&prefix)).try_collect::<Vec<_>>().await })
        .map_err(|e| Error::io(what(), store_error("listing".into(), e)))?;
    let mut present = std::collections::HashSet::new();
    for meta in listed {
        let Some(local) = m.local_of(&meta.location) else {
            continue;
        };
        let current = m
            .etags()
            .get(&local)
            .is_some_and(|t| t.is_some() && *t == meta.e_tag)
            && local.exists();
        if current {
            present.insert(local);
            continue;
        }
        let store = Arc::clone(&m.store);
        let location = meta.location.clone();
        let got = block_on(async move {
            let r = store.get(&location).await?;
            let e_tag = r.meta.e_tag.clone();
            Ok::<_, object_store::Error>((r.bytes().await?, e_tag))
        });
        let (bytes, e_tag) = match got {
            Ok(got) => got,
            // Removed since the listing (retention's cleanup after another
            // task's commit): gone, as if it had not been listed.
            Err(object_store::Error::NotFound { .. }) => continue,
            Err(e) => {
                return Err(Error::io(
                    what(),
                    store_error(format!("reading {}", meta.location), e),
                ));
            }
        };
        write_local(&local, &bytes).map_err(|e| Error::io(what(), e))?;
        m.etags().insert(local.clone(), e_tag);
        present.insert(local);
    }
    remove_unlisted(dir, &present, m);
    Ok(())
}

/// Writes a downloaded object into the cache (a new file renamed into
/// place: a store kept open on the old file sees its inode change).
fn write_local(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("object");
    // Named per process and call: two threads may sync one file at once.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}-{call}.{}.tmp", std::process::id()));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

fn remove_unlisted(dir: &Path, present: &std::collections::HashSet<PathBuf>, m: &Mount) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let name = name.to_str().unwrap_or("");
        if name.starts_with('.') || (name == "lock" && dir == m.local) {
            continue;
        }
        match e.file_type() {
            Ok(t) if t.is_dir() => remove_unlisted(&path, present, m),
            Ok(_) if !present.contains(&path) => {
                let _ = fs::remove_file(&path);
                m.etags().remove(&path);
            }
            _ => {}
        }
    }
}

/// Writes the bytes of `parts`, just written to `path`, through to the
/// bucket when `path` is in a mount (one `PUT` of the whole file); a no-op
/// elsewhere. An error is an I/O error: the write it belongs to failed.
pub fn put(path: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    let Some(m) = mount_of(path) else {
        return Ok(());
    };
    let Some(location) = m.object(path) else {
        return Ok(());
    };
    crate::durable::io_step("putting to the object store", path)?;
    let payload = PutPayload::from_iter(parts.iter().map(|p| bytes::Bytes::copy_from_slice(p)));
    let store = Arc::clone(&m.store);
    let loc = location.clone();
    let put = block_on(async move { store.put(&loc, payload).await }).map_err(|e| {
        // The cache now holds what the bucket may not: forgotten, so the
        // next sync takes the bucket's object again.
        m.etags().remove(path);
        store_error(format!("putting {location} in {}", m.url), e)
    })?;
    m.etags().insert(path.to_path_buf(), put.e_tag);
    Ok(())
}

/// [`put`] of the first `len` bytes of the file at `path` (a log segment
/// after an append: what follows its records is zeros prepared ahead).
pub fn put_file(path: &Path, len: u64) -> std::io::Result<()> {
    if mount_of(path).is_none() {
        return Ok(());
    }
    // Only the records: the zeros prepared past them are not read.
    let mut bytes = vec![0; len as usize];
    std::io::Read::read_exact(&mut fs::File::open(path)?, &mut bytes)?;
    put(path, &[&bytes])
}

/// The bytes of the file at `path`, or `None` when there is none: in a
/// mount, the bucket's object (not the cache's copy, which another process
/// may have replaced in the bucket); elsewhere, the local file.
pub fn read(path: &Path) -> Result<Option<Vec<u8>>> {
    let what = || format!("reading {}", path.display());
    let Some((m, location)) = mount_of(path).and_then(|m| Some((Arc::clone(&m), m.object(path)?)))
    else {
        return match fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(what(), e)),
        };
    };
    let store = Arc::clone(&m.store);
    let loc = location.clone();
    match block_on(async move { store.get(&loc).await?.bytes().await }) {
        Ok(b) => Ok(Some(b.to_vec())),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(Error::io(
            what(),
            store_error(format!("reading {location} in {}", m.url), e),
        )),
    }
}

/// Removes the object of `path`, just removed from a mount's cache; a
/// no-op outside mounts. Best effort, like the local removal it follows
/// (retention's cleanup): an object left behind is removed by the next
/// cleanup or ignored by readers, as a local file would be.
pub fn remove(path: &Path) {
    let Some(m) = mount_of(path) else {
        return;
    };
    let Some(location) = m.object(path) else {
        return;
    };
    m.etags().remove(path);
    let store = Arc::clone(&m.store);
    let _ = block_on(async move { store.delete(&location).await });
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn bucket(name: &str) -> Arc<dyn ObjectStore> {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        register_store(&format!("s3://{name}"), Arc::clone(&store));
        store
    }

    fn get(store: &Arc<dyn ObjectStore>, path: &str) -> Option<Vec<u8>> {
        let store = Arc::clone(store);
        let path = ObjectPath::from(path);
        block_on(async move {
            match store.get(&path).await {
                Ok(r) => Some(r.bytes().await.unwrap().to_vec()),
                Err(_) => None,
            }
        })
    }

    fn put_object(store: &Arc<dyn ObjectStore>, path: &str, bytes: &'static [u8]) {
        let store = Arc::clone(store);
        let path = ObjectPath::from(path);
        block_on(async move { store.put(&path, PutPayload::from_static(bytes)).await }).unwrap();
    }

    #[test]
    fn urls_parse_into_local_paths_and_store_prefixes() {
        bucket("parse-bucket");
        assert!(matches!(
            Location::parse(Path::new("/tmp/x")).unwrap(),
            Location::Local(p) if p == Path::new("/tmp/x")
        ));
        assert!(matches!(
            Location::parse(Path::new("file:///tmp/y")).unwrap(),
            Location::Local(p) if p == Path::new("/tmp/y")
        ));
        let e = Location::parse(Path::new("file://relative")).unwrap_err();
        assert!(e.to_string().contains("absolute path"), "{e}");
        let e = Location::parse(Path::new("s3:///no-bucket")).unwrap_err();
        assert!(e.to_string().contains("no bucket"), "{e}");
        match Location::parse(Path::new("s3://parse-bucket/a/b/")).unwrap() {
            Location::Store { url, prefix, .. } => {
                assert_eq!(url, "s3://parse-bucket/a/b");
                assert_eq!(prefix.as_ref(), "a/b");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_mount_writes_through_and_syncs_what_others_wrote() {
        let store = bucket("mount-bucket");
        put_object(&store, "ck/metadata", b"meta");
        let root = local_dir(Path::new("s3://mount-bucket/ck")).unwrap();
        assert_eq!(fs::read(root.join("metadata")).unwrap(), b"meta");
        assert_eq!(
            url_of(&root.join("state/a")).unwrap(),
            "s3://mount-bucket/ck/state/a"
        );

        // A durable write below the mount lands in the bucket.
        crate::durable::write_framed(
            &root.join("state/a/1.delta"),
            b"one",
            crate::durable::Durability::NoSync,
        )
        .unwrap();
        let framed = get(&store, "ck/state/a/1.delta").unwrap();
        assert_eq!(
            crate::durable::unframe(Path::new("x"), &framed).unwrap(),
            b"one"
        );

        // Another process rewrote one object and added one: a sync of the
        // directory takes both, and leaves the file it wrote itself alone.
        let before = fs::metadata(root.join("state/a/1.delta")).unwrap();
        put_object(&store, "ck/state/a/2.delta", b"two");
        put_object(&store, "ck/metadata", b"meta2");
        sync(&root.join("state/a")).unwrap();
        assert_eq!(fs::read(root.join("state/a/2.delta")).unwrap(), b"two");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            fs::metadata(root.join("state/a/1.delta")).unwrap().ino(),
            before.ino(),
            "an object that is as this process put it is not downloaded again"
        );
        assert_eq!(
            fs::read(root.join("metadata")).unwrap(),
            b"meta",
            "outside the synced dir"
        );
        sync(&root).unwrap();
        assert_eq!(fs::read(root.join("metadata")).unwrap(), b"meta2");

        // A cached file the bucket does not hold goes; `lock` stays.
        fs::write(root.join("lock"), b"1").unwrap();
        fs::write(root.join("state/a/9.delta"), b"stray").unwrap();
        sync(&root).unwrap();
        assert!(!root.join("state/a/9.delta").exists());
        assert!(root.join("lock").exists());
        assert!(get(&store, "ck/lock").is_none(), "the lock is local");

        // Removal follows a local removal.
        fs::remove_file(root.join("state/a/2.delta")).unwrap();
        remove(&root.join("state/a/2.delta"));
        assert!(get(&store, "ck/state/a/2.delta").is_none());

        // Mounting again (a query reopened) keeps the directory.
        assert_eq!(local_dir(Path::new("s3://mount-bucket/ck/")).unwrap(), root);
    }

    #[test]
    fn tasks_mounting_at_once_share_one_whole_cache() {
        let store = bucket("race-bucket");
        for k in 0..20 {
            put_object(&store, &format!("ck/state/p{k}/0.delta"), b"v0");
        }
        let roots: Vec<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| local_dir(Path::new("s3://race-bucket/ck")).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(roots.windows(2).all(|w| w[0] == w[1]), "{roots:?}");
        for k in 0..20 {
            assert_eq!(
                fs::read(roots[0].join(format!("state/p{k}/0.delta"))).unwrap(),
                b"v0"
            );
        }
    }

    /// A store whose listings also name an object it does not hold, as a
    /// listing taken just before another process's cleanup removed it.
    #[derive(Debug)]
    struct ListsAGhost(InMemory);

    impl std::fmt::Display for ListsAGhost {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("ListsAGhost")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for ListsAGhost {
        async fn put_opts(
            &self,
            location: &ObjectPath,
            payload: PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            self.0.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &ObjectPath,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.0.put_multipart_opts(location, opts).await
        }
        async fn get_opts(
            &self,
            location: &ObjectPath,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.0.get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<'static, object_store::Result<ObjectPath>>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<ObjectPath>> {
            self.0.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            use futures::StreamExt;
            let ghost = self.0.list(prefix).map(|m| {
                m.map(|mut m| {
                    m.location = ObjectPath::from(format!("{}.ghost", m.location));
                    m
                })
            });
            self.0.list(prefix).chain(ghost.take(1)).boxed()
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> object_store::Result<object_store::ListResult> {
            self.0.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &ObjectPath,
            to: &ObjectPath,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.0.copy_opts(from, to, options).await
        }
    }

    #[test]
    fn an_object_removed_after_the_listing_is_taken_as_gone() {
        let store: Arc<dyn ObjectStore> = Arc::new(ListsAGhost(InMemory::new()));
        register_store("s3://ghost-bucket", Arc::clone(&store));
        put_object(&store, "ck/state/7.delta", b"seven");
        let root = local_dir(Path::new("s3://ghost-bucket/ck")).unwrap();
        assert_eq!(fs::read(root.join("state/7.delta")).unwrap(), b"seven");
        assert!(!root.join("state/7.delta.ghost").exists());
        sync(&root.join("state")).unwrap();
    }

    #[test]
    fn an_unsynced_mount_downloads_only_what_is_synced() {
        let store = bucket("lazy-bucket");
        put_object(&store, "ck/log/0.log", b"log");
        put_object(&store, "ck/state/a/p1/3.delta", b"p1");
        let root = local_dir_unsynced(Path::new("s3://lazy-bucket/ck")).unwrap();
        assert!(!root.join("log/0.log").exists());
        sync(&root.join("state/a/p1")).unwrap();
        assert_eq!(fs::read(root.join("state/a/p1/3.delta")).unwrap(), b"p1");
        assert!(
            !root.join("log/0.log").exists(),
            "only the synced directory"
        );
    }

    #[test]
    fn put_file_sends_the_records_not_the_prepared_zeros() {
        let store = bucket("segment-bucket");
        let root = local_dir(Path::new("s3://segment-bucket")).unwrap();
        let seg = root.join("log/0.log");
        fs::create_dir_all(seg.parent().unwrap()).unwrap();
        fs::write(&seg, b"rec\n\0\0\0\0").unwrap();
        put_file(&seg, 4).unwrap();
        assert_eq!(get(&store, "log/0.log").unwrap(), b"rec\n");
    }
}
