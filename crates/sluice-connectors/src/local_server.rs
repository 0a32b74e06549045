//! A server process on a free port of 127.0.0.1, for tests and examples
//! (the Kafka broker, the S3 server): started, waited for until it
//! answers, and killed when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice_common::{Error, Result};

/// A running server process.
#[derive(Debug)]
pub(crate) struct LocalServer {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl LocalServer {
    /// Starts `bin` with `args(port)` on a free port and waits (at most
    /// `limit`) until `ready(port)`; a few ports are tried, as a port found
    /// free may be taken before the server binds it. `what` names the
    /// server in errors; its stderr goes to a log whose last lines an error
    /// quotes.
    pub(crate) fn start(
        what: &str,
        bin: &Path,
        args: impl Fn(u16) -> Vec<String>,
        ready: impl Fn(u16) -> bool,
        limit: Duration,
    ) -> Result<LocalServer> {
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let log = std::env::temp_dir().join(format!("sluice-{what}-{port}.log"));
            let log_file = std::fs::File::create(&log)
                .map_err(|e| Error::io(format!("creating {}", log.display()), e))?;
            let child = Command::new(bin)
                .args(args(port))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .map_err(|e| Error::io(format!("starting {}", bin.display()), e))?;
            let mut server = LocalServer { child, port, log };
            match server.wait_ready(what, &ready, limit) {
                Ok(()) => return Ok(server),
                Err(e) => last = e.to_string(),
            }
        }
        Err(Error::io(
            format!("starting {what}"),
            std::io::Error::other(last),
        ))
    }

    fn wait_ready(
        &mut self,
        what: &str,
        ready: &impl Fn(u16) -> bool,
        limit: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(|e| Error::io(format!("waiting for {what}"), e))?
            {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                return Err(Error::io(
                    format!(
                        "{what} exited ({status}) before it listened on port {}",
                        self.port
                    ),
                    std::io::Error::other(
                        log.lines().rev().take(5).collect::<Vec<_>>().join(" | "),
                    ),
                ));
            }
            if ready(self.port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::io(
                    format!(
                        "{what} did not answer on port {} within {limit:?}",
                        self.port
                    ),
                    std::io::Error::from(std::io::ErrorKind::TimedOut),
                ));
            }
            // Waiting for another process to listen, not for engine work:
            // there is no clock of ours to wait on.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port it listens on.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("finding a free port", e))?;
    Ok(l.local_addr()
        .map_err(|e| Error::io("finding a free port", e))?
        .port())
}
