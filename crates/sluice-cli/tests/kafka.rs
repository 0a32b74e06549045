//! Kafka → windowed aggregate → Kafka, through the real `sluice` binary,
//! against a real Kafka-protocol broker (tansu on 127.0.0.1, started here;
//! `scripts/kafka-broker.sh install` puts it in place and the README's test
//! command runs that first; without it these tests fail, never skip).
//!
//! The pipeline is killed at seeded random steps of its writes — every file
//! of the checkpoint and every record the Kafka sink stores counts as a step,
//! so kills land between the records of one batch too — and with SIGKILL at
//! random moments, then restarted until it finishes. A consumer reading the
//! output topics from the beginning must then see every result row exactly
//! once: the rows of an uninterrupted run, none lost, none twice.
//!
//! `SLUICE_KILL_SEED=<n>` replays a run of kills (the seed is in every
//! failure message); `SLUICE_KAFKA_KILL_RUNS=<n>` sets how many pipelines
//! are killed at random steps (default 10).

mod common;
use common::{Rng, kill_until_done};

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use sluice::deps::sluice_connectors::kafka::{LocalBroker, consume_all, create_topic, produce};

const T: Duration = Duration::from_secs(20);

fn sluice(dir: &Path, io_fault: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args([
        "run",
        "p.sql",
        "--checkpoint",
        "ckpt",
        "--trigger",
        "available-now",
    ])
    .current_dir(dir)
    .env_remove("SLUICE_CRASH_AT")
    .env_remove("SLUICE_IO_FAULT");
    if let Some(f) = io_fault {
        cmd.env("SLUICE_IO_FAULT", f);
    }
    cmd.output().expect("the sluice binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The SPEC's example events, spread over the input topic's 3 partitions.
const EVENTS: &[(&str, u32)] = &[
    ("a", 1),
    ("a", 4),
    ("b", 7),
    ("a", 12),
    ("b", 9),
    ("a", 16),
    ("b", 21),
    ("a", 3),
    ("b", 14),
    ("a", 18),
    ("a", 27),
    ("c", 31),
    ("a", 33),
    ("b", 38),
    ("z", 100),
];

async fn broker_with_input() -> LocalBroker {
    let broker = LocalBroker::start().unwrap();
    let servers = broker.bootstrap();
    create_topic(&servers, "events", 3).await.unwrap();
    let bodies: Vec<(i32, String)> = EVENTS
        .iter()
        .enumerate()
        .map(|(i, (k, s))| {
            (
                (i % 3) as i32,
                format!(
                    "{{\"k\": \"{k}\", \"ts\": \"1970-01-01T00:{:02}:{:02}Z\"}}",
                    s / 60,
                    s % 60
                ),
            )
        })
        .collect();
    let records: Vec<_> = bodies
        .iter()
        .map(|(p, v)| (Some(*p), None, v.as_bytes()))
        .collect();
    produce(&servers, "events", &records).await.unwrap();
    broker
}

/// A pipeline writing to topics `counts-<tag>` and `copy-<tag>`.
async fn setup(dir: &Path, servers: &str, tag: &str) {
    create_topic(servers, &format!("counts-{tag}"), 2)
        .await
        .unwrap();
    create_topic(servers, &format!("copy-{tag}"), 3)
        .await
        .unwrap();
    std::fs::write(
        dir.join("p.sql"),
        format!(
            "SET max_batch_retries = 1;
             CREATE SOURCE ev (k VARCHAR, ts TIMESTAMP, _partition INT, _offset BIGINT,
                               WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
               WITH (connector = 'kafka', 'bootstrap.servers' = '{servers}', topic = 'events',
                     format = 'json', max_rows_per_trigger = 4);
             CREATE SINK counts WITH (connector = 'kafka', 'bootstrap.servers' = '{servers}',
                     topic = 'counts-{tag}', format = 'json', key = 'k', output_mode = 'append',
                     'kafka.batch.num.messages' = '1') AS
             SELECT window_start, k, count(*) AS n, max(ts) AS last
             FROM TUMBLE(ev, ts, INTERVAL '10' SECOND) GROUP BY window_start, window_end, k;
             CREATE SINK copy WITH (connector = 'kafka', 'bootstrap.servers' = '{servers}',
                     topic = 'copy-{tag}', format = 'json', 'kafka.batch.num.messages' = '1') AS
             SELECT k, ts, upper(k) AS big, _partition, _offset FROM ev WHERE k <> 'z';"
        ),
    )
    .unwrap();
}

/// The values in the output topics, sorted: what a consumer reading them
/// from the beginning sees.
fn outputs(servers: &str, tag: &str) -> [Vec<String>; 2] {
    ["counts", "copy"].map(|t| {
        let mut v: Vec<String> = consume_all(servers, &format!("{t}-{tag}"), T)
            .unwrap()
            .into_iter()
            .map(|r| String::from_utf8(r.value.unwrap()).unwrap())
            .collect();
        v.sort();
        v
    })
}

fn seed() -> u64 {
    std::env::var("SLUICE_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6b61_666b)
}

/// The uninterrupted run's output, checked against the rows the SPEC's
/// example gives, and how long the run took.
async fn clean_run(servers: &str) -> ([Vec<String>; 2], Duration) {
    let clean = tempfile::tempdir().unwrap();
    setup(clean.path(), servers, "clean").await;
    let started = std::time::Instant::now();
    let out = sluice(clean.path(), None);
    let took = started.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    let expected = outputs(servers, "clean");
    let mut distinct = expected[0].clone();
    distinct.dedup();
    assert_eq!(distinct.len(), expected[0].len(), "{:?}", expected[0]);
    // Windows [0,10): a 2 (a@3 arrives after the watermark passed 10 s... or
    // not, depending on the batch it is in); all windows close by z@100.
    let count_of = |k: &str, start: &str| {
        expected[0]
            .iter()
            .find(|v| v.contains(&format!("\"k\":\"{k}\"")) && v.contains(start))
            .map(|v| {
                v.split("\"n\":")
                    .nth(1)
                    .unwrap()
                    .split(',')
                    .next()
                    .unwrap()
                    .to_string()
            })
    };
    assert_eq!(
        count_of("a", "00:00:10").as_deref(),
        Some("3"),
        "{:?}",
        expected[0]
    );
    assert_eq!(
        count_of("c", "00:00:30").as_deref(),
        Some("1"),
        "{:?}",
        expected[0]
    );
    assert_eq!(
        expected[1].len(),
        14,
        "every event but z: {:?}",
        expected[1]
    );
    (expected, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_at_random_steps_leave_every_result_row_in_the_topic_exactly_once() {
    let broker = broker_with_input().await;
    let servers = broker.bootstrap();
    let (expected, _) = clean_run(&servers).await;

    // How many steps a run takes: a crash at a step past the end is none.
    // Found by doubling then bisecting, each probe on topics of its own.
    let mut probes = 0;
    let mut finishes = async |n: u64| {
        probes += 1;
        let d = tempfile::tempdir().unwrap();
        setup(d.path(), &servers, &format!("probe{probes}")).await;
        let out = sluice(d.path(), Some(&format!("crash:{n}")));
        match out.status.code() {
            Some(0) => true,
            Some(86) => false,
            other => panic!("step {n}: exit {other:?}: {}", stderr(&out)),
        }
    };
    let (mut lo, mut hi) = (1, 64);
    while !finishes(hi).await {
        lo = hi;
        hi *= 2;
        assert!(hi < 1 << 14, "no end of the run's write steps found");
    }
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if finishes(mid).await {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let steps = lo;
    assert!(steps > 20, "a run takes {steps} write steps");

    let seed = seed();
    let runs: u64 = std::env::var("SLUICE_KAFKA_KILL_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let mut rng = Rng(seed | 1);
    let mut kills = 0;
    for run in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let tag = format!("kill{run}");
        setup(dir.path(), &servers, &tag).await;
        // Every other run kills early in each attempt's own steps, so that
        // most attempts die (each still gets a batch or so done).
        let range = if run % 2 == 0 { steps } else { steps / 3 };
        kills += kill_until_done(&mut rng, range, &format!("seed {seed}, run {run}"), |at| {
            sluice(dir.path(), Some(&format!("crash:{at}")))
        });
        let out = sluice(dir.path(), None);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(
            outputs(&servers, &tag),
            expected,
            "seed {seed}, run {run}: the topics differ from the uninterrupted run's"
        );
    }
    assert!(kills >= runs, "only {kills} kills in {runs} runs");
    println!("{runs} runs, {kills} kills at random steps of {steps}, seed {seed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_leaves_every_result_row_exactly_once() {
    let broker = broker_with_input().await;
    let servers = broker.bootstrap();
    let (expected, took) = clean_run(&servers).await;
    let seed = seed() ^ 0x5151;
    let span = took.as_millis() as u64 + 1;
    let mut rng = Rng(seed | 1);
    let mut kills = 0;
    for run in 0..4 {
        let dir = tempfile::tempdir().unwrap();
        let tag = format!("sigkill{run}");
        setup(dir.path(), &servers, &tag).await;
        let mut finished = false;
        for _ in 0..60 {
            let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
                .args([
                    "run",
                    "p.sql",
                    "--checkpoint",
                    "ckpt",
                    "--trigger",
                    "available-now",
                ])
                .current_dir(dir.path())
                .env_remove("SLUICE_CRASH_AT")
                .env_remove("SLUICE_IO_FAULT")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // The moment of the kill is what is random here; the outcome
            // checked below is the same whatever it is. (A pause before a
            // kill, not a wait for work.)
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(rng.below(span)));
            match child.try_wait().unwrap() {
                Some(status) => {
                    assert!(status.success(), "seed {seed}, run {run}: {status}");
                    finished = true;
                    break;
                }
                None => {
                    child.kill().unwrap();
                    child.wait().unwrap();
                    kills += 1;
                }
            }
        }
        if !finished {
            let out = sluice(dir.path(), None);
            assert!(out.status.success(), "{}", stderr(&out));
        }
        assert_eq!(
            outputs(&servers, &tag),
            expected,
            "seed {seed}, run {run}: the topics differ from the uninterrupted run's"
        );
    }
    println!("4 runs, {kills} SIGKILLs within the {span} ms a clean run takes, seed {seed}");
}
