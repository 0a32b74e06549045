//! A local S3-compatible server for tests and benchmarks: moto's server
//! (PyPI's `moto`), listening on 127.0.0.1 only, one per test, stopped when
//! dropped. `scripts/s3-server.sh install` installs it into
//! `~/.cache/sluice/tools/moto` (the README's test command does that
//! itself); `SLUICE_MOTO_SERVER` names another `moto_server` binary.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sluice_common::{Error, Result};

use crate::local_server::LocalServer;

/// The key id and secret the local server is given (it checks neither).
const KEY_ID: &str = "sluice-test";
const SECRET: &str = "sluice-test-secret";
const REGION: &str = "us-east-1";

/// A moto server on a free port of 127.0.0.1, stopped when dropped.
#[derive(Debug)]
pub struct LocalS3 {
    server: LocalServer,
}

impl LocalS3 {
    /// Where `moto_server` is: `$SLUICE_MOTO_SERVER`, else
    /// `~/.cache/sluice/tools/moto/bin/moto_server`.
    pub fn binary() -> Result<PathBuf> {
        if let Some(p) = std::env::var_os("SLUICE_MOTO_SERVER") {
            return Ok(PathBuf::from(p));
        }
        let tools = match std::env::var_os("SLUICE_TOOLS") {
            Some(t) => PathBuf::from(t),
            None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/sluice/tools"),
        };
        let p = tools.join("moto/bin/moto_server");
        if p.is_file() {
            return Ok(p);
        }
        Err(Error::plan(format!(
            "no S3 server to start: moto is not installed at {}. Run `scripts/s3-server.sh \
             install` (the README's test command does it), or set SLUICE_MOTO_SERVER to a \
             moto_server binary",
            p.display()
        )))
    }

    /// Starts a server and waits (at most 30 s) until it answers.
    pub fn start() -> Result<LocalS3> {
        let bin = Self::binary()?;
        let args = |port: u16| {
            ["-H", "127.0.0.1", "-p", &port.to_string()]
                .map(str::to_string)
                .to_vec()
        };
        // Listening is not enough: the server answers once its app is
        // loaded.
        let ready = |port: u16| request(port, "GET", "/").is_ok_and(|status| status < 500);
        let server = LocalServer::start("moto_server", &bin, args, ready, Duration::from_secs(30))?;
        Ok(LocalS3 { server })
    }

    /// The endpoint URL (`http://127.0.0.1:<port>`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.server.port())
    }

    /// Makes bucket `name`.
    pub fn create_bucket(&self, name: &str) -> Result<()> {
        match request(self.server.port(), "PUT", &format!("/{name}")) {
            Ok(200) => Ok(()),
            Ok(status) => Err(Error::io(
                format!("creating bucket '{name}' on {}", self.endpoint()),
                std::io::Error::other(format!("HTTP status {status}")),
            )),
            Err(e) => Err(Error::io(
                format!("creating bucket '{name}' on {}", self.endpoint()),
                e,
            )),
        }
    }

    /// A client of bucket `name` on this server.
    pub fn store(&self, name: &str) -> Result<Arc<dyn ObjectStore>> {
        let store = AmazonS3Builder::new()
            .with_bucket_name(name)
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_region(REGION)
            .with_access_key_id(KEY_ID)
            .with_secret_access_key(SECRET)
            .build()
            .map_err(|e| Error::plan(format!("a client of bucket '{name}': {e}")))?;
        Ok(Arc::new(store))
    }

    /// Makes bucket `name` and has every `s3://<name>/...` URL of this
    /// process use this server ([`sluice_common::remote::register_store`]).
    pub fn register_bucket(&self, name: &str) -> Result<()> {
        self.create_bucket(name)?;
        sluice_common::remote::register_store(&format!("s3://{name}"), self.store(name)?);
        Ok(())
    }

    /// Puts `bytes` at `key` of bucket `bucket`.
    pub fn put(&self, bucket: &str, key: &str, bytes: Vec<u8>) -> Result<()> {
        let store = self.store(bucket)?;
        let location = ObjectPath::from(key);
        sluice_common::remote::block_on(async move {
            store.put(&location, PutPayload::from(bytes)).await
        })
        .map_err(|e| Error::io(format!("putting {key}"), std::io::Error::other(e)))?;
        Ok(())
    }

    /// Every object of bucket `bucket` under `prefix`, with its bytes, in
    /// key order.
    pub fn objects(&self, bucket: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let store = self.store(bucket)?;
        let prefix = ObjectPath::from(prefix);
        sluice_common::remote::block_on(async move {
            let metas: Vec<_> = store.list(Some(&prefix)).try_collect().await?;
            let mut out = Vec::with_capacity(metas.len());
            for m in metas {
                let bytes = store.get(&m.location).await?.bytes().await?;
                out.push((m.location.to_string(), bytes.to_vec()));
            }
            out.sort();
            Ok::<_, object_store::Error>(out)
        })
        .map_err(|e| {
            Error::io(
                format!("reading bucket '{bucket}'"),
                std::io::Error::other(e),
            )
        })
    }

    /// The environment another process needs to reach this server through
    /// `s3://` URLs (read by `object_store`'s S3 client).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET.into()),
            ("AWS_REGION", REGION.into()),
        ]
    }
}

/// One plain HTTP/1.1 request with no body; the response's status.
fn request(port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        port
    )?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    let text = String::from_utf8_lossy(&head);
    text.get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))
}
