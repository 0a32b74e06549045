//! A directory of files as a stream: each batch takes files not taken before.
//!
//! The source's offset is a position in its *file log*: a durable list,
//! kept in the query's checkpoint (`sources/<name>/files/<first index>`), of
//! the files taken so far, in the order taken. Batch N reads the files at
//! positions `[start, end)` of that log, so a re-run reads the same files even
//! if the directory changed since.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};
use serde_json::Value;
use sluice_common::durable::{self, Durability};
use sluice_common::remote::Location;
use sluice_common::{Error, Options, Result};

use crate::decode::{self, Format};
use sluice_common::connector::{
    DeadLetter, OnError, ReadBatch, RemoteRead, Source, SourceContext, SourceReader,
};

use crate::source::offset_u64;

/// A stream over the files of a directory (`parquet`, `csv` or
/// newline-delimited `json`).
#[derive(Debug, Clone)]
pub struct FileSource {
    name: String,
    path: PathBuf,
    format: Format,
    schema: SchemaRef,
    max_files_per_trigger: Option<usize>,
    on_error: OnError,
}

impl FileSource {
    fn new(path: impl Into<PathBuf>, format: Format) -> Self {
        let path = path.into();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "files".to_string());
        FileSource {
            name,
            path,
            format,
            schema: Arc::new(Schema::empty()),
            max_files_per_trigger: None,
            on_error: OnError::Fail,
        }
    }

    /// Newline-delimited JSON files under `path`.
    pub fn json(path: impl Into<PathBuf>) -> Self {
        Self::new(path, Format::Json)
    }

    /// CSV files with a header line under `path`.
    pub fn csv(path: impl Into<PathBuf>) -> Self {
        Self::new(
            path,
            Format::Csv {
                header: true,
                delimiter: b',',
            },
        )
    }

    /// Parquet files under `path`.
    pub fn parquet(path: impl Into<PathBuf>) -> Self {
        Self::new(path, Format::Parquet)
    }

    /// The rows' schema (required).
    pub fn schema(mut self, schema: SchemaRef) -> Self {
        self.schema = schema;
        self
    }

    /// The source's name (default: the directory's name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// At most `n` new files per micro-batch.
    pub fn max_files_per_trigger(mut self, n: usize) -> Self {
        self.max_files_per_trigger = Some(n.max(1));
        self
    }

    /// What to do with a record that cannot be decoded.
    pub fn on_error(mut self, on_error: OnError) -> Self {
        self.on_error = on_error;
        self
    }

    /// Builds the source from `CREATE SOURCE ... WITH (connector = 'file', ...)`.
    pub fn from_options(name: &str, schema: SchemaRef, options: &Options) -> Result<Self> {
        options.check_known(&[
            "connector",
            "path",
            "format",
            "max_files_per_trigger",
            "on_error",
            "dead_letter",
            "header",
            "delimiter",
        ])?;
        let path = options.require("path")?;
        let format = match options
            .get_choice("format", &["json", "csv", "parquet"])?
            .as_deref()
        {
            Some("json") => Format::Json,
            Some("parquet") => Format::Parquet,
            Some(_) => Format::Csv {
                header: options.get_bool("header")?.unwrap_or(true),
                delimiter: decode::delimiter_option(options)?,
            },
            None => {
                return Err(Error::plan(format!(
                    "{} needs format = 'json' | 'csv' | 'parquet'",
                    options.owner()
                )));
            }
        };
        if path.contains("://") && !sluice_common::remote::is_url(Path::new(&path)) {
            return Err(Error::not_supported(format!(
                "{}: the URL '{path}' (local paths, file:// and s3:// URLs are read)",
                options.owner()
            )));
        }
        let mut s = Self::new(path.trim_start_matches("file://"), format)
            .schema(schema)
            .name(name);
        s.on_error = OnError::from_options(options)?;
        s.max_files_per_trigger = options
            .get_usize("max_files_per_trigger")?
            .map(|n| n.max(1));
        Ok(s)
    }
}

impl Source for FileSource {
    fn name(&self) -> &str {
        &self.name
    }
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
    fn connector(&self) -> &str {
        "file"
    }
    fn open(&self, ctx: SourceContext) -> Result<Box<dyn SourceReader>> {
        if self.schema.fields().is_empty() {
            return Err(Error::plan(format!(
                "file source '{}' needs a schema",
                self.name
            )));
        }
        let log = FileLog::load(ctx.dir.join("files"), ctx.durability)?;
        // A directory or a bucket prefix: the store is what differs.
        let store: Arc<dyn ObjectStore> = match Location::parse(&self.path)? {
            Location::Local(_) => Arc::new(LocalFileSystem::new()),
            Location::Store { store, .. } => store,
        };
        Ok(Box::new(FileReader {
            source: self.clone(),
            store,
            log,
            listed: false,
        }))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn dead_letter_target(&self) -> Option<&str> {
        match &self.on_error {
            OnError::DeadLetter(t) => Some(t),
            _ => None,
        }
    }
}

/// The durable list of files taken, in order.
#[derive(Debug)]
struct FileLog {
    dir: PathBuf,
    durability: Durability,
    files: Vec<String>,
    seen: HashSet<String>,
}

impl FileLog {
    fn load(dir: PathBuf, durability: Durability) -> Result<Self> {
        let mut chunks: Vec<(usize, PathBuf)> = Vec::new();
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let start = name.parse::<usize>().map_err(|_| {
                    Error::checkpoint(
                        e.path(),
                        "unexpected file in a file-source log (names are positions)",
                    )
                })?;
                chunks.push((start, e.path()));
            }
        }
        chunks.sort();
        let mut files: Vec<String> = Vec::new();
        for (start, path) in chunks {
            if start != files.len() {
                return Err(Error::checkpoint(
                    &path,
                    format!(
                        "file log chunk starts at {start} but the log before it ends at {}",
                        files.len()
                    ),
                ));
            }
            let chunk: Vec<String> = durable::read_json(&path)?;
            files.extend(chunk);
        }
        let seen = files.iter().cloned().collect();
        Ok(FileLog {
            dir,
            durability,
            files,
            seen,
        })
    }

    fn append(&mut self, new: Vec<String>) -> Result<()> {
        if new.is_empty() {
            return Ok(());
        }
        durable::write_json(
            &self.dir.join(self.files.len().to_string()),
            &new,
            self.durability,
        )?;
        self.seen.extend(new.iter().cloned());
        self.files.extend(new);
        Ok(())
    }
}

#[derive(Debug)]
struct FileReader {
    source: FileSource,
    store: Arc<dyn ObjectStore>,
    log: FileLog,
    /// Whether the last `latest_offset` listed the directory (so the log
    /// holds every file there was).
    listed: bool,
}

impl FileReader {
    /// The directory as shown in messages (the URL for a bucket), and its
    /// prefix in the store.
    fn root(&self) -> Result<(PathBuf, StorePath)> {
        if let Location::Store { url, prefix, .. } = Location::parse(&self.source.path)? {
            return Ok((PathBuf::from(url), prefix));
        }
        let root = fs::canonicalize(&self.source.path).map_err(|e| {
            Error::plan(format!(
                "file source '{}': directory {} cannot be read: {e}",
                self.source.name,
                self.source.path.display()
            ))
        })?;
        let prefix = StorePath::from_filesystem_path(&root)
            .map_err(|e| Error::plan(format!("file source '{}': {e}", self.source.name)))?;
        Ok((root, prefix))
    }

    /// Files under the directory not taken yet, in name order; hidden files
    /// and those under `_` or `.` directories (e.g. a sink's metadata) skipped.
    async fn list_new(&self) -> Result<Vec<String>> {
        let (_, prefix) = self.root()?;
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| {
                Error::io(
                    format!("listing {}", self.source.path.display()),
                    std::io::Error::other(e),
                )
            })?;
        let ext = self.source.format.extension();
        let mut new: Vec<String> = metas
            .into_iter()
            .filter_map(|m| {
                let rel: Vec<_> = m
                    .location
                    .prefix_match(&prefix)?
                    .map(|p| p.as_ref().to_string())
                    .collect();
                if rel.iter().any(|p| p.starts_with('.') || p.starts_with('_')) {
                    return None;
                }
                let rel = rel.join("/");
                let keep =
                    rel.ends_with(&format!(".{ext}")) || !rel.rsplit('/').next()?.contains('.');
                keep.then_some(rel)
            })
            .filter(|rel| !self.log.seen.contains(rel))
            .collect();
        new.sort();
        Ok(new)
    }
}

#[async_trait]
impl SourceReader for FileReader {
    fn initial_offset(&self) -> Value {
        Value::from(0u64)
    }

    async fn latest_offset(&mut self, start: &Value) -> Result<Value> {
        let start = offset_u64(&self.source.name, start)? as usize;
        let logged = self.log.files.len();
        if start > logged {
            return Err(Error::checkpoint(
                &self.log.dir,
                format!(
                    "the offset log says {start} files were taken but the file log lists only {logged}"
                ),
            ));
        }
        let cap = self.source.max_files_per_trigger.unwrap_or(usize::MAX);
        // Files logged but not taken yet (by an earlier listing, or by a run
        // that stopped before writing its plan record) come first, in log
        // order. Only when they do not fill the batch is the directory
        // listed again, and everything new is logged at once, so a backlog
        // of many files is listed once, not once per batch.
        let pending = logged - start;
        self.listed = pending < cap;
        if self.listed {
            let new = self.list_new().await?;
            self.log.append(new)?;
        }
        Ok(Value::from(
            (self.log.files.len().min(start.saturating_add(cap))) as u64,
        ))
    }

    /// Files logged and not taken, when the planning listed the directory;
    /// unknown otherwise (a batch that had enough logged files to take did
    /// not list, and what the log holds then undercounts).
    async fn backlog(&mut self, end: &Value) -> Result<Option<u64>> {
        if !self.listed {
            return Ok(None);
        }
        let end = offset_u64(&self.source.name, end)? as usize;
        Ok(Some(self.log.files.len().saturating_sub(end) as u64))
    }

    fn backlog_unit(&self) -> &'static str {
        "files"
    }

    async fn read(&mut self, start: &Value, end: &Value) -> Result<ReadBatch> {
        let (s, e) = (
            offset_u64(&self.source.name, start)? as usize,
            offset_u64(&self.source.name, end)? as usize,
        );
        if e > self.log.files.len() || s > e {
            return Err(Error::checkpoint(
                &self.log.dir,
                format!(
                    "batch needs files [{s}, {e}) but the file log lists {}",
                    self.log.files.len()
                ),
            ));
        }
        let (root, prefix) = self.root()?;
        read_files(
            &self.source,
            &self.store,
            &root,
            &prefix,
            &self.log.files[s..e],
        )
        .await
    }

    fn remote_read(&self, start: &Value, end: &Value) -> Result<Option<RemoteRead>> {
        let (s, e) = (
            offset_u64(&self.source.name, start)? as usize,
            offset_u64(&self.source.name, end)? as usize,
        );
        let files = self.log.files.get(s..e).ok_or_else(|| {
            Error::checkpoint(
                &self.log.dir,
                format!(
                    "batch needs files [{s}, {e}) but the file log lists {}",
                    self.log.files.len()
                ),
            )
        })?;
        // The directory as every process finds it: an absolute path (a
        // shared directory) or the bucket's URL.
        let (root, _) = self.root()?;
        let src = &self.source;
        let (format, header, delimiter) = match &src.format {
            Format::Json => ("json", true, b','),
            Format::Parquet => ("parquet", true, b','),
            Format::Csv { header, delimiter } => ("csv", *header, *delimiter),
        };
        let (on_error, dead_letter) = match &src.on_error {
            OnError::Fail => ("fail", None),
            OnError::Drop => ("drop", None),
            OnError::DeadLetter(t) => ("dead_letter", Some(t.clone())),
        };
        let config = serde_json::json!({
            "connector": "file",
            "name": src.name,
            "root": root.to_string_lossy(),
            "format": format,
            "header": header,
            "delimiter": delimiter,
            "on_error": on_error,
            "dead_letter": dead_letter,
        });
        // Runs of consecutive files, at most REMOTE_PARTS of them.
        let per = files.len().div_ceil(REMOTE_PARTS).max(1);
        let parts = files
            .chunks(per)
            .map(|run| Value::from(run.to_vec()))
            .collect();
        Ok(Some(RemoteRead { config, parts }))
    }
}

/// At most how many parts a batch's files are read in elsewhere.
const REMOTE_PARTS: usize = 16;

/// Reads part `part` (a run of file names under the source's directory) of
/// a range described by `config` ([`SourceReader::remote_read`]), as the
/// source's reader would.
pub async fn read_part(config: &Value, schema: SchemaRef, part: &Value) -> Result<ReadBatch> {
    let field = |k: &str| {
        config
            .get(k)
            .ok_or_else(|| Error::internal(format!("a file source's remote read without '{k}'")))
    };
    let text = |k: &str| -> Result<String> {
        field(k)?.as_str().map(str::to_string).ok_or_else(|| {
            Error::internal(format!("a file source's remote read: '{k}' is not text"))
        })
    };
    let name = text("name")?;
    let root = text("root")?;
    let format = match text("format")?.as_str() {
        "json" => Format::Json,
        "parquet" => Format::Parquet,
        "csv" => Format::Csv {
            header: field("header")?.as_bool().unwrap_or(true),
            delimiter: field("delimiter")?
                .as_u64()
                .and_then(|d| u8::try_from(d).ok())
                .unwrap_or(b','),
        },
        other => return Err(Error::internal(format!("unknown file format '{other}'"))),
    };
    let on_error = match text("on_error")?.as_str() {
        "fail" => OnError::Fail,
        "drop" => OnError::Drop,
        _ => OnError::DeadLetter(text("dead_letter")?),
    };
    let files: Vec<String> = serde_json::from_value(part.clone())
        .map_err(|e| Error::internal(format!("a file source's part {part}: {e}")))?;
    let mut source = FileSource::new(root.clone(), format)
        .schema(schema)
        .name(name);
    source.on_error = on_error;
    let (shown, store, prefix): (PathBuf, Arc<dyn ObjectStore>, StorePath) =
        match Location::parse(Path::new(&root))? {
            Location::Store { url, store, prefix } => (PathBuf::from(url), store, prefix),
            Location::Local(p) => {
                let prefix = StorePath::from_filesystem_path(&p)
                    .map_err(|e| Error::plan(format!("file source '{}': {e}", source.name)))?;
                (p, Arc::new(LocalFileSystem::new()), prefix)
            }
        };
    read_files(&source, &store, &shown, &prefix, &files).await
}

/// Fetches and decodes `files` (names under `prefix` of `store`, shown in
/// messages under `root`), in order, as `source` says.
async fn read_files(
    source: &FileSource,
    store: &Arc<dyn ObjectStore>,
    root: &Path,
    prefix: &StorePath,
    files: &[String],
) -> Result<ReadBatch> {
    let mut out = ReadBatch::default();
    // The files are fetched concurrently (each get waits on a blocking
    // read, on a local disk as on an object store) and kept in log order.
    let targets: Vec<(PathBuf, StorePath)> = files
        .iter()
        .map(|rel| {
            let location =
                StorePath::from_iter(prefix.parts().chain(rel.split('/').map(Into::into)));
            (root.join(rel), location)
        })
        .collect();
    let store = Arc::clone(store);
    let fetches = targets.into_iter().map(move |(shown, location)| {
        let store = Arc::clone(&store);
        async move {
            let got = match store.get(&location).await {
                // A file is available from its last modification.
                Ok(r) => {
                    let modified = r.meta.last_modified.timestamp_millis();
                    r.bytes().await.map(|b| (b, modified))
                }
                Err(e) => Err(e),
            };
            (shown, got)
        }
    });
    let mut oldest: Option<i64> = None;
    let mut fetched = Vec::with_capacity(files.len());
    let mut gets = futures::stream::iter(fetches).buffered(FETCH_CONCURRENCY);
    while let Some((shown, got)) = gets.next().await {
        let (bytes, modified) = got.map_err(|err| match err {
            object_store::Error::NotFound { .. } => Error::data(format!(
                "source '{}': file {} was taken by this query but is gone",
                source.name,
                shown.display()
            )),
            other => Error::io(
                format!("reading {}", shown.display()),
                std::io::Error::other(other),
            ),
        })?;
        oldest = Some(oldest.map_or(modified, |o| o.min(modified)));
        fetched.push((shown, bytes));
    }
    // Decoding (Parquet above all) is the costly part: the files of a
    // batch are decoded in parallel, then taken in log order.
    let decoded = decode_all(&source.format, &source.schema, fetched)?;
    out.available_ms = oldest;
    for (shown, decoded) in decoded {
        out.batches.extend(decoded.batches);
        for bad in decoded.bad {
            let location = match bad.line {
                Some(l) => format!("{}:{l}", shown.display()),
                None => shown.display().to_string(),
            };
            match &source.on_error {
                OnError::Fail => {
                    let at = match bad.line {
                        Some(l) => format!("file {}, line {l}", shown.display()),
                        None => format!("file {}", shown.display()),
                    };
                    return Err(Error::data(format!(
                        "source '{}': {at}: {}",
                        source.name, bad.error
                    )));
                }
                OnError::Drop => out.dropped += 1,
                OnError::DeadLetter(_) => out.dead_letters.push(DeadLetter {
                    source: source.name.clone(),
                    location,
                    error: bad.error,
                    raw: bad.raw,
                }),
            }
        }
    }
    Ok(out)
}

/// How many files of a batch are fetched at once.
const FETCH_CONCURRENCY: usize = 16;

/// Decodes `files` on up to as many threads as there are cores (each a run
/// of consecutive files), keeping their order.
fn decode_all(
    format: &Format,
    schema: &SchemaRef,
    files: Vec<(PathBuf, Bytes)>,
) -> Result<Vec<(PathBuf, decode::Decoded)>> {
    let decode_run = |run: Vec<(PathBuf, Bytes)>| -> Vec<(PathBuf, decode::Decoded)> {
        run.into_iter()
            .map(|(p, b)| {
                let d = decode::decode(format, schema, b);
                (p, d)
            })
            .collect()
    };
    let threads = sluice_common::cores().min(files.len());
    if threads <= 1 {
        return Ok(decode_run(files));
    }
    let per = files.len().div_ceil(threads);
    let mut files = files.into_iter();
    std::thread::scope(|scope| {
        let mut runs = Vec::new();
        loop {
            let run: Vec<_> = files.by_ref().take(per).collect();
            if run.is_empty() {
                break;
            }
            runs.push(scope.spawn(move || decode_run(run)));
        }
        let mut out = Vec::new();
        for run in runs {
            // decode never panics (fuzzed); if it did, say so.
            out.extend(
                run.join()
                    .map_err(|_| Error::internal("a thread decoding input files panicked"))?,
            );
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::{DataType, Field};
    use sluice_common::ManualClock;
    use std::path::Path;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, true)]))
    }

    fn ctx(dir: &Path) -> SourceContext {
        SourceContext {
            dir: dir.to_path_buf(),
            durability: Durability::NoSync,
            clock: Arc::new(ManualClock::new(0)),
        }
    }

    #[tokio::test]
    async fn files_are_taken_in_order_capped_and_the_log_survives_reopen() {
        let data = tempfile::tempdir().unwrap();
        let cp = tempfile::tempdir().unwrap();
        for (n, body) in [
            ("b.json", "{\"id\":2}\n"),
            ("a.json", "{\"id\":1}\n"),
            ("c.json", "{\"id\":3}\n"),
        ] {
            fs::write(data.path().join(n), body).unwrap();
        }
        fs::create_dir(data.path().join("_sluice")).unwrap();
        fs::write(data.path().join("_sluice/x.json"), "{\"id\":99}\n").unwrap();
        let src = FileSource::json(data.path())
            .schema(schema())
            .max_files_per_trigger(2);
        let mut r = src.open(ctx(cp.path())).unwrap();
        assert_eq!(
            r.latest_offset(&Value::from(0)).await.unwrap(),
            Value::from(2)
        );
        let b = r.read(&Value::from(0), &Value::from(2)).await.unwrap();
        assert_eq!(b.batches.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
        drop(r);
        fs::write(data.path().join("0.json"), "{\"id\":0}\n").unwrap();
        let mut r = src.open(ctx(cp.path())).unwrap();
        // "0.json" arrived after a.json and b.json were taken: it is taken
        // now, with c.json, though its name sorts before theirs.
        assert_eq!(
            r.latest_offset(&Value::from(2)).await.unwrap(),
            Value::from(4)
        );
        assert_eq!(
            r.latest_offset(&Value::from(4)).await.unwrap(),
            Value::from(4)
        );
    }

    #[tokio::test]
    async fn a_bad_line_fails_with_file_and_line_or_is_dropped() {
        let data = tempfile::tempdir().unwrap();
        let cp = tempfile::tempdir().unwrap();
        fs::write(
            data.path().join("a.json"),
            "{\"id\":1}\n{\"id\":\n{\"id\":3}\n",
        )
        .unwrap();
        let src = FileSource::json(data.path()).schema(schema());
        let mut r = src.open(ctx(cp.path())).unwrap();
        let end = r.latest_offset(&Value::from(0)).await.unwrap();
        let e = r.read(&Value::from(0), &end).await.unwrap_err().to_string();
        assert!(e.contains("a.json, line 2"), "{e}");
        let mut r = src
            .clone()
            .on_error(OnError::Drop)
            .open(ctx(cp.path()))
            .unwrap();
        let b = r.read(&Value::from(0), &end).await.unwrap();
        assert_eq!(
            (
                b.batches.iter().map(|b| b.num_rows()).sum::<usize>(),
                b.dropped
            ),
            (2, 1)
        );
    }
}
