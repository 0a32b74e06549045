//! The HTTP endpoint against running queries on the manual clock: the JSON
//! API and `/metrics` match the progress records (and the metrics pass
//! Prometheus's own parser, `promtool check metrics`), and the page, loaded
//! in a real headless Chromium driven over WebDriver, draws every batch.
//!
//! Chromium, ChromeDriver and promtool are installed by
//! `scripts/web-tools.sh install` (which `./test.sh` runs); a test whose
//! tool is missing fails with that command.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use sluice::prelude::*;
use sluice::{ManualClock, Outcome, Progress, StreamingQuery};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const INSTALL: &str = "scripts/web-tools.sh install";

/// One HTTP/1.1 exchange on a fresh connection: (status, headers, body).
/// Both servers here answer with a `Content-Length` (ChromeDriver does not
/// close the connection after its answer, so the body is read by its
/// length, not to the end of the stream).
async fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    extra: &str,
) -> (u16, String, Vec<u8>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut stream = BufReader::new(stream);
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut headers = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stream.read_line(&mut line).await.unwrap() > 0,
            "a whole response head"
        );
        if line == "\r\n" {
            break;
        }
        headers.push_str(&line.to_ascii_lowercase());
    }
    let status: u16 = headers.split(' ').nth(1).unwrap().parse().unwrap();
    let length: usize = headers
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .expect("a Content-Length")
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.unwrap();
    (status, headers, body)
}

async fn get_json(addr: &str, path: &str) -> (u16, Value) {
    let (status, _, body) = request(addr, "GET", path, None, "").await;
    (status, serde_json::from_slice(&body).unwrap())
}

/// A windowed count over a memory source, on a manual trigger and clock.
async fn windowed_query(ctx: &StreamContext) -> StreamingQuery {
    let outcomes = ctx
        .sql(
            "CREATE SOURCE clicks (usr VARCHAR, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
               WITH (connector = 'memory');
             CREATE SINK counts WITH (connector = 'memory', output_mode = 'append') AS
             SELECT window_start, window_end, usr, count(*) AS n
             FROM TUMBLE(clicks, ts, INTERVAL '10' SECOND)
             GROUP BY window_start, window_end, usr;",
        )
        .await
        .unwrap();
    let pending = outcomes
        .into_iter()
        .find_map(|o| match o {
            Outcome::Query(q) => Some(q),
            _ => None,
        })
        .unwrap();
    pending.with_trigger(Trigger::Manual).start().await.unwrap()
}

/// Batch `i`: three clicks in the `i`-th ten seconds, one of them late
/// after the first batch; the clock moves a second.
async fn batch(ctx: &StreamContext, clock: &ManualClock, q: &StreamingQuery, i: u64) -> Progress {
    let s = i * 10;
    ctx.sql(&format!(
        "INSERT INTO clicks VALUES ('a', '1970-01-01T00:00:{:02}'), ('b', '1970-01-01T00:00:{:02}'), ('a', '1970-01-01T00:00:{:02}'), ('c', '1970-01-01T00:00:00')",
        s % 60,
        (s + 3) % 60,
        (s + 8) % 60
    ))
    .await
    .unwrap();
    clock.advance(Duration::from_secs(1));
    q.run_batch().await.unwrap().expect("a batch with data")
}

fn manual() -> (StreamContext, ManualClock) {
    let clock = ManualClock::new(1_800_000_000_000);
    (StreamContext::with_clock(Arc::new(clock.clone())), clock)
}

/// The value of the sample `name{labels}` in Prometheus text.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

fn promtool() -> PathBuf {
    let path = std::env::var_os("SLUICE_PROMTOOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/sluice/tools/prometheus/usr/bin/promtool")
        });
    assert!(
        path.exists(),
        "promtool is not at {} : install it with `{INSTALL}` (from the repository root)",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_and_metrics_match_the_progress_records() {
    let (ctx, clock) = manual();
    let server = ctx.serve_http("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().to_string();
    let q = windowed_query(&ctx).await;

    // Before any batch: listed, active, nothing run.
    let (status, queries) = get_json(&addr, "/api/queries").await;
    assert_eq!(status, 200);
    assert_eq!(queries[0]["name"], "counts");
    assert_eq!(queries[0]["status"], "active");
    assert_eq!(queries[0]["last_batch_id"], Value::Null);

    let mut records = Vec::new();
    for i in 0..3 {
        records.push(batch(&ctx, &clock, &q, i).await);
    }
    let last = records.last().unwrap();
    assert!(last.late_rows > 0, "the late clicks are counted: {last:?}");

    let (_, queries) = get_json(&addr, "/api/queries").await;
    let info = &queries[0];
    assert_eq!(info["id"], q.id());
    assert_eq!(info["trigger"], "manual");
    assert_eq!(info["sources"], json!(["clicks"]));
    assert_eq!(info["sink"], "counts");
    assert_eq!(info["output_mode"], "append");
    assert_eq!(info["last_batch_id"], json!(last.batch_id));
    assert_eq!(info["watermark_ms"], json!(last.watermark_ms));
    assert_eq!(info["error"], Value::Null);

    // The progress API serves exactly the records the query keeps.
    // (Compared as text: parsing JSON back may round a float's last bit.)
    let text_of = |r: &[Progress]| serde_json::to_value(r).unwrap().to_string();
    let (status, _, body) = request(
        &addr,
        "GET",
        "/api/queries/counts/progress?last=2",
        None,
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8(body).unwrap(), text_of(&records[1..]));
    let (_, _, body) = request(&addr, "GET", "/api/queries/counts/progress", None, "").await;
    assert_eq!(String::from_utf8(body.clone()).unwrap(), text_of(&records));
    let all: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(all[2]["sources"][0]["backlog"], json!(0));
    assert_eq!(all[2]["sources"][0]["backlog_unit"], "rows");
    assert!(all[2]["latency_ms"].is_number(), "{}", all[2]);

    // Errors name what is wrong.
    let (status, err) = get_json(&addr, "/api/queries/nope/progress").await;
    assert_eq!(status, 404);
    assert_eq!(err["error"], "no query 'nope' (queries: counts)");
    let (status, err) = get_json(&addr, "/api/queries/counts/progress?last=x").await;
    assert_eq!(status, 400);
    assert!(err["error"].as_str().unwrap().contains("last=x"), "{err}");
    let (status, _, _) = request(&addr, "POST", "/api/queries", Some(&json!({})), "").await;
    assert_eq!(status, 405);
    let (status, _, _) = request(&addr, "GET", "/nothing", None, "").await;
    assert_eq!(status, 404);

    // The metrics count what the records say.
    let (status, headers, body) = request(&addr, "GET", "/metrics", None, "").await;
    assert_eq!(status, 200);
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    let text = String::from_utf8(body).unwrap();
    let sum = |f: &dyn Fn(&Progress) -> u64| records.iter().map(f).sum::<u64>() as f64;
    assert_eq!(sample(&text, "sluice_batches_total{query=\"counts\"}"), 3.0);
    assert_eq!(
        sample(
            &text,
            "sluice_input_rows_total{query=\"counts\",source=\"clicks\"}"
        ),
        sum(&|p| p.input_rows)
    );
    assert_eq!(
        sample(
            &text,
            "sluice_output_rows_total{query=\"counts\",sink=\"counts\"}"
        ),
        sum(&|p| p.output_rows)
    );
    assert_eq!(
        sample(&text, "sluice_late_rows_total{query=\"counts\"}"),
        sum(&|p| p.late_rows)
    );
    assert_eq!(
        sample(
            &text,
            "sluice_state_rows{query=\"counts\",operator=\"aggregate\"}"
        ),
        last.operators[0].rows as f64
    );
    assert_eq!(
        sample(&text, "sluice_last_batch_id{query=\"counts\"}"),
        last.batch_id as f64
    );
    assert_eq!(
        sample(
            &text,
            "sluice_backlog{query=\"counts\",source=\"clicks\",unit=\"rows\"}"
        ),
        0.0
    );
    assert_eq!(
        sample(&text, "sluice_watermark_lag_seconds{query=\"counts\"}"),
        (last.timestamp_ms - last.watermark_ms.unwrap()) as f64 / 1000.0
    );
    assert_eq!(
        sample(
            &text,
            "sluice_batch_duration_seconds_count{query=\"counts\",phase=\"total\"}"
        ),
        3.0
    );
    assert_eq!(sample(&text, "sluice_query_active{query=\"counts\"}"), 1.0);
    assert_eq!(
        sample(&text, "sluice_query_failures_total{query=\"counts\"}"),
        0.0
    );

    // Prometheus's own parser and linter accept the text.
    let mut check = tokio::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .await
        .unwrap();
    let out = check.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A scraper that asks for OpenMetrics gets it.
    let (_, headers, body) = request(
        &addr,
        "GET",
        "/metrics",
        None,
        "Accept: application/openmetrics-text; version=1.0.0\r\n",
    )
    .await;
    assert!(
        headers.contains("content-type: application/openmetrics-text"),
        "{headers}"
    );
    let open = String::from_utf8(body).unwrap();
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert_eq!(sample(&open, "sluice_batches_total{query=\"counts\"}"), 3.0);

    // A dropped manual query is listed as stopped.
    drop(q);
    let (_, queries) = get_json(&addr, "/api/queries").await;
    assert_eq!(queries[0]["status"], "stopped");
    let (_, _, body) = request(&addr, "GET", "/metrics", None, "").await;
    let text = String::from_utf8(body).unwrap();
    assert_eq!(sample(&text, "sluice_query_active{query=\"counts\"}"), 0.0);
}

/// A ChromeDriver process on a free port of 127.0.0.1, killed when dropped.
struct Driver {
    child: tokio::process::Child,
    addr: String,
}

impl Driver {
    async fn start() -> Driver {
        let bin =
            std::env::var("SLUICE_CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        let chromium = chromium();
        assert!(
            std::path::Path::new(&bin).exists() && std::path::Path::new(&chromium).exists(),
            "Chromium and ChromeDriver ({chromium}, {bin}) are needed: install them with `{INSTALL}` (from the repository root)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = tokio::process::Command::new(bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            // Its own process group, so that the browsers it starts go
            // with it, even when a test fails half-way.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // It says when it listens; nothing is polled.
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        loop {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .expect("ChromeDriver starts within 30 s")
                .unwrap()
                .expect("ChromeDriver says it started");
            if line.contains("started successfully") {
                break;
            }
        }
        Driver {
            child,
            addr: format!("127.0.0.1:{port}"),
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, _, bytes) = request(&self.addr, method, path, body.as_ref(), "").await;
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(status, 200, "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
        let _ = self.child.start_kill();
    }
}

fn chromium() -> String {
    std::env::var("SLUICE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

/// Waits in the page (polling there, up to the script timeout) until
/// `condition` holds for `window.sluicePage`, and returns what `result`
/// gives then.
const WAIT: &str = "
    const [condition, result, done] = arguments;
    const check = () => {
        const page = window.sluicePage;
        let ok = false;
        try { ok = page && new Function('page', 'return ' + condition)(page); } catch (e) {}
        if (ok) { done(new Function('page', 'return ' + result)(page)); } else { setTimeout(check, 50); }
    };
    check();";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_live_charts_in_a_real_browser() {
    let (ctx, clock) = manual();
    let server = ctx.serve_http("127.0.0.1:0").await.unwrap();
    let q = windowed_query(&ctx).await;
    for i in 0..2 {
        batch(&ctx, &clock, &q, i).await;
    }

    let driver = Driver::start().await;
    let profile = tempfile::tempdir().unwrap();
    let session = driver
        .call(
            "POST",
            "/session",
            Some(json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chromium(),
                    "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                             "--no-first-run", "--disable-background-networking",
                             "--disable-component-update", "--disable-sync",
                             "--disable-dev-shm-usage", "--window-size=1400,1600",
                             format!("--user-data-dir={}", profile.path().display())]
                }
            }}})),
        )
        .await;
    let sid = session["sessionId"].as_str().unwrap().to_string();
    let s = format!("/session/{sid}");
    driver
        .call(
            "POST",
            &format!("{s}/timeouts"),
            Some(json!({"script": 30_000})),
        )
        .await;
    driver
        .call(
            "POST",
            &format!("{s}/url"),
            Some(json!({"url": format!("http://{}/?refresh=100", server.local_addr())})),
        )
        .await;
    let wait = |condition: String, result: &'static str| {
        let s = s.clone();
        let driver = &driver;
        async move {
            driver
                .call(
                    "POST",
                    &format!("{s}/execute/async"),
                    Some(json!({"script": WAIT, "args": [condition, result]})),
                )
                .await
        }
    };

    // The two batches run so far are drawn.
    let points = wait(
        "page.queries.counts && page.queries.counts.points >= 2".into(),
        "page.queries.counts.points",
    )
    .await;
    assert_eq!(points, json!(2));

    // A third batch: the charts hold three points, the table shows it first.
    let third = batch(&ctx, &clock, &q, 2).await;
    let shown = wait(
        format!("page.queries.counts.lastBatch === {}", third.batch_id),
        "[page.queries.counts.points, document.querySelector('section[data-query=counts] table.batches tr[data-batch]').dataset.batch, document.querySelectorAll('section[data-query=counts] .uplot').length, document.querySelector('section[data-query=counts] .badge').textContent]",
    )
    .await;
    assert_eq!(shown, json!([3, third.batch_id.to_string(), 6, "active"]));

    // Every chart holds its three points (uPlot's data, x and each series).
    let lengths = wait(
        "true".into(),
        "Object.values(page.queries.counts.plots).map(p => p.u.data.map(d => d.length))",
    )
    .await;
    for chart in lengths.as_array().unwrap() {
        assert!(
            chart.as_array().unwrap().iter().all(|n| n == 3),
            "{lengths}"
        );
    }
    let screenshot = driver.call("GET", &format!("{s}/screenshot"), None).await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(screenshot.as_str().unwrap())
        .unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sluice-page.png");
    std::fs::write(&out, &png).unwrap();
    eprintln!("screenshot of the page: {}", out.display());

    // The charts move with the next batch.
    let fourth = batch(&ctx, &clock, &q, 3).await;
    let points = wait(
        format!("page.queries.counts.lastBatch === {}", fourth.batch_id),
        "page.queries.counts.points",
    )
    .await;
    assert_eq!(points, json!(4));
    driver.call("DELETE", &s, None).await;
}
