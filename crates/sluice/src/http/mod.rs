//! The HTTP endpoint: a read-only view of a context's queries.
//!
//! Started by [`StreamContext::serve_http`](crate::StreamContext::serve_http)
//! (and `sluice run --http`), on an address the caller gives (127.0.0.1
//! when only a port is given):
//!
//! | path | what |
//! |---|---|
//! | `GET /api/queries` | every query: name, id, status (`active`, `stopped`, `failed` with its `error`), trigger, sources, sink, output mode, last batch id, watermark |
//! | `GET /api/queries/{name}/progress?last=N` | the query's last `N` progress records (default 20, at most the 100 kept), oldest first |
//! | `GET /metrics` | Prometheus metrics (Prometheus's text format, or OpenMetrics for `Accept: application/openmetrics-text`), `sluice_` names with `query`, `source`, `sink`, `operator` and `phase` labels |
//! | `GET /` | a page with live charts of each query, polling the JSON API |
//!
//! Everything is served from memory: the page and its chart library
//! ([uPlot](https://github.com/leeoniya/uPlot), MIT, vendored from its npm
//! package with its licence under `assets/`) are embedded in the binary.

mod metrics;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use sluice_common::{Error, Result};
use sluice_exec::{QueryInfo, QueryStatus, Trigger};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

pub(crate) use metrics::Metrics;

/// How long a connection may take to send a request's head.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How many progress records `/api/queries/{name}/progress` gives without
/// `?last=`.
const DEFAULT_LAST: usize = 20;

/// The queries a context started, for its HTTP endpoint, and their metrics.
#[derive(Debug, Default)]
pub struct Watched {
    queries: Mutex<Vec<QueryInfo>>,
    metrics: Arc<Metrics>,
}

impl Watched {
    /// Watches a started query: it is listed, and its batches are counted
    /// in the metrics from now on (with the progress records it keeps).
    /// A query of the same name watched before that no longer runs is
    /// replaced (a restart). Two running queries of one name (possible from
    /// the DataFrame API) are both listed, but share their metrics' labels.
    pub fn add(&self, info: QueryInfo) {
        let metrics = Arc::clone(&self.metrics);
        let sink = info.sink.clone();
        info.listen(Arc::new(move |p| metrics.record(&sink, p)));
        let mut queries = self.queries.lock().unwrap_or_else(|p| p.into_inner());
        queries.retain(|q| q.name != info.name || q.status() == QueryStatus::Active);
        queries.push(info);
    }

    /// The watched queries, in the order they started.
    pub fn queries(&self) -> Vec<QueryInfo> {
        self.queries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A running HTTP endpoint; it stops (closing its connections) when dropped.
#[derive(Debug)]
pub struct HttpServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl HttpServer {
    /// Listens on `addr` (`HOST:PORT`, or a port alone for 127.0.0.1;
    /// port 0 picks a free one) and serves `watched`.
    pub(crate) async fn start(addr: &str, watched: Arc<Watched>) -> Result<HttpServer> {
        let addr = if addr.parse::<u16>().is_ok() {
            format!("127.0.0.1:{addr}")
        } else {
            addr.to_string()
        };
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|e| Error::io(format!("listening for HTTP on {addr}"), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::io(format!("listening for HTTP on {addr}"), e))?;
        let (stop_tx, mut stop_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            // Dropped with the loop: every open connection is closed.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else {
                            // Out of file descriptors, say: wait a little
                            // rather than spin.
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        };
                        let watched = Arc::clone(&watched);
                        connections.spawn(async move {
                            let service = service_fn(move |req| {
                                let watched = Arc::clone(&watched);
                                async move { Ok::<_, Infallible>(respond(&watched, &req)) }
                            });
                            // A connection that breaks concerns only its client.
                            // A client that sends no whole request head
                            // within the timeout is dropped.
                            let _ = http1::Builder::new()
                                .timer(TokioTimer::new())
                                .header_read_timeout(HEADER_TIMEOUT)
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    // Finished connections are reaped as they end.
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Ok(HttpServer {
            addr: local,
            stop: Some(stop_tx),
            task,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// The response to one request.
fn respond(watched: &Watched, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "the endpoint is read-only: only GET and HEAD are served",
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    match path {
        "/" | "/index.html" => reply(StatusCode::OK, "text/html; charset=utf-8", page()),
        "/metrics" => {
            let openmetrics = req
                .headers()
                .get_all(hyper::header::ACCEPT)
                .iter()
                .any(|v| {
                    v.to_str()
                        .is_ok_and(|v| v.contains("application/openmetrics-text"))
                });
            let (text, content_type) = watched.metrics.encode(&watched.queries(), openmetrics);
            reply(StatusCode::OK, content_type, text)
        }
        "/api/queries" => json_reply(
            StatusCode::OK,
            &Value::Array(watched.queries().iter().map(describe).collect()),
        ),
        _ => match path
            .strip_prefix("/api/queries/")
            .and_then(|rest| rest.strip_suffix("/progress"))
        {
            Some(name) => progress(watched, &percent_decode(name), query),
            None => error(
                StatusCode::NOT_FOUND,
                &format!(
                    "no such path: {path} (try /, /api/queries, /api/queries/NAME/progress or /metrics)"
                ),
            ),
        },
    }
}

fn progress(watched: &Watched, name: &str, query: &str) -> Response<Full<Bytes>> {
    let queries = watched.queries();
    let Some(info) = queries.iter().find(|q| q.name == name) else {
        let names: Vec<&str> = queries.iter().map(|q| q.name.as_str()).collect();
        return error(
            StatusCode::NOT_FOUND,
            &format!("no query '{name}' (queries: {})", names.join(", ")),
        );
    };
    let mut last = DEFAULT_LAST;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("last", v)) => match v.parse::<usize>() {
                Ok(n) => last = n,
                Err(_) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("last={v}: not a number of batches"),
                    );
                }
            },
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("unknown parameter '{pair}' (only last=N)"),
                );
            }
        }
    }
    match serde_json::to_value(info.recent_progress(last)) {
        Ok(v) => json_reply(StatusCode::OK, &v),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// One query as `/api/queries` lists it.
fn describe(info: &QueryInfo) -> Value {
    let last = info.last_progress();
    let status = info.status();
    let interval_ms = match info.trigger {
        Trigger::ProcessingTime(d) if !d.is_zero() => Some(d.as_millis() as u64),
        _ => None,
    };
    json!({
        "name": info.name,
        "id": info.id,
        "status": status.as_str(),
        "error": match &status {
            QueryStatus::Failed(e) => Some(e.as_str()),
            _ => None,
        },
        "trigger": info.trigger.to_string(),
        "trigger_interval_ms": interval_ms,
        "sources": info.sources,
        "sink": info.sink,
        "output_mode": info.output_mode.to_string(),
        "checkpoint": info.checkpoint.display().to_string(),
        "last_batch_id": last.as_ref().map(|p| p.batch_id),
        "watermark_ms": last.as_ref().and_then(|p| p.watermark_ms),
        "falling_behind": last.as_ref().is_some_and(|p| p.falling_behind),
    })
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

fn json_reply(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", v.to_string())
}

fn error(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    json_reply(status, &json!({ "error": msg }))
}

/// `%XX` escapes decoded (a query name in a path).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The page, with its chart library inlined: one self-contained document.
fn page() -> &'static str {
    static PAGE: OnceLock<String> = OnceLock::new();
    PAGE.get_or_init(|| {
        include_str!("assets/index.html")
            .replace("/*UPLOT_CSS*/", include_str!("assets/uPlot.min.css"))
            .replace("/*UPLOT_JS*/", include_str!("assets/uPlot.iife.min.js"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_paths_are_percent_decoded() {
        assert_eq!(percent_decode("my%20query"), "my query");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("plain"), "plain");
    }

    #[test]
    fn the_page_inlines_its_chart_library() {
        let p = page();
        assert!(!p.contains("/*UPLOT_JS*/") && !p.contains("/*UPLOT_CSS*/"));
        assert!(p.contains("uPlot"));
    }
}
