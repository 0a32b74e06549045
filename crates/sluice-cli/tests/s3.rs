//! Object storage: a pipeline whose source, sink and checkpoint are all in
//! a bucket of a local S3 server (moto, on 127.0.0.1, installed by the
//! README's test command), killed at its durable writes and object puts
//! and restarted, gives the output of an uninterrupted local run, exactly
//! once; its checkpoint is in the bucket, not on the disk of the process
//! that wrote it.

mod common;
use common::{Rng, kill_until_done, sink_rows};

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use sluice::deps::sluice_connectors::s3_server::LocalS3;

fn sluice(
    cwd: &Path,
    args: &[&str],
    env: &[(&'static str, String)],
    fault: Option<(&str, String)>,
) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("SLUICE_CRASH_AT")
        .env_remove("SLUICE_IO_FAULT")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    if let Some((k, v)) = fault {
        cmd.env(k, v);
    }
    cmd.output().expect("the sluice binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A windowed count with a watermark, in append mode, reading `input` and
/// writing `output` (paths or URLs).
fn pipeline(dir: &Path, input: &str, output: &str) {
    fs::write(
        dir.join("pipeline.sql"),
        format!(
            "CREATE SOURCE ev (id BIGINT, v VARCHAR, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) \
               WITH (connector = 'file', path = '{input}', format = 'json', max_files_per_trigger = 1);
             CREATE SINK out WITH (connector = 'file', path = '{output}', format = 'json') AS
             SELECT window_start, id % 5 AS k, count(*) AS n, min(v) AS first
             FROM TUMBLE(ev, ts, INTERVAL '10' SECOND) GROUP BY window_start, window_end, id % 5;"
        ),
    )
    .unwrap();
}

/// The input: 12 files of 6 rows, in event-time order with some disorder.
fn input_files() -> Vec<(String, String)> {
    (0..12)
        .map(|f| {
            let body: String = (0..6)
                .map(|r| {
                    let id = f * 6 + r;
                    format!(
                        "{{\"id\": {id}, \"v\": \"r{f}-{r}\", \"ts\": \"2026-01-01T00:00:{:02}\"}}\n",
                        (f * 4 + r % 3) % 60
                    )
                })
                .collect();
            (format!("{f:03}.json"), body)
        })
        .collect()
}

/// The rows of the objects of a file sink under `prefix` (not its `_`
/// metadata), sorted.
fn bucket_rows(s3: &LocalS3, bucket: &str, prefix: &str) -> Vec<String> {
    let mut rows: Vec<String> = s3
        .objects(bucket, prefix)
        .unwrap()
        .into_iter()
        .filter(|(key, _)| {
            !key.split('/')
                .any(|p| p.starts_with('_') || p.starts_with('.'))
        })
        .flat_map(|(_, bytes)| {
            String::from_utf8(bytes)
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    rows.sort();
    rows
}

/// The pipeline's output run in one process on local directories.
fn expected() -> Vec<String> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::create_dir_all(dir.join("in")).unwrap();
    for (name, body) in input_files() {
        fs::write(dir.join("in").join(name), body).unwrap();
    }
    pipeline(dir, "in", "out");
    let args = [
        "run",
        "pipeline.sql",
        "--checkpoint",
        "ckpt",
        "--trigger",
        "available-now",
    ];
    let o = sluice(dir, &args, &[], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = sink_rows(&dir.join("out"));
    assert!(rows.len() > 15, "{rows:?}");
    rows
}

#[test]
fn a_pipeline_in_a_bucket_is_exactly_once_across_crashes_and_its_checkpoint_is_the_buckets() {
    let expected = expected();
    let s3 = LocalS3::start().unwrap();
    s3.create_bucket("lake").unwrap();
    for (name, body) in input_files() {
        s3.put("lake", &format!("in/{name}"), body.into_bytes())
            .unwrap();
    }
    let env = s3.env();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pipeline(dir, "s3://lake/in", "s3://lake/out");
    let args = [
        "run",
        "pipeline.sql",
        "--checkpoint",
        "s3://lake/ck",
        "--trigger",
        "available-now",
    ];

    // Crashes at the commit protocol's steps: after batch 2's rows are in
    // the sink, before its commit record; right after batch 5's plan.
    for crash in ["after-sink:2", "after-offsets:5"] {
        let o = sluice(
            dir,
            &args,
            &env,
            Some(("SLUICE_CRASH_AT", crash.to_string())),
        );
        assert_eq!(o.status.code(), Some(86), "{crash}: {}", stderr(&o));
    }
    // Then kills at random durable-write steps, object puts among them
    // (each batch writes state, log records and source files, and puts
    // each): every restart starts from what the bucket holds.
    let seed = std::env::var("SLUICE_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0b1e);
    let mut rng = Rng(seed);
    let kills = kill_until_done(&mut rng, 40, &format!("seed {seed}"), |at| {
        sluice(
            dir,
            &args,
            &env,
            Some(("SLUICE_IO_FAULT", format!("crash:{at}"))),
        )
    });
    assert!(kills > 0, "no run was killed (seed {seed})");
    assert_eq!(bucket_rows(&s3, "lake", "out"), expected, "seed {seed}");

    // The checkpoint is the bucket's: its files are objects there.
    let keys: Vec<String> = s3
        .objects("lake", "ck/out")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for want in [
        "ck/out/metadata",
        "ck/out/log/00000000000000000000.log",
        "ck/out/state/aggregate/meta",
        "ck/out/sources/ev/files/0",
        "ck/out/pipeline.sql",
    ] {
        assert!(keys.iter().any(|k| k == want), "{want} not in {keys:?}");
    }
    assert!(
        !keys
            .iter()
            .any(|k| k.ends_with("/lock") || k.ends_with(".tmp")),
        "{keys:?}"
    );

    // Nothing is left to do, read from the bucket by a new process.
    let o = sluice(dir, &args, &env, None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(bucket_rows(&s3, "lake", "out"), expected);
    // `sluice state` reads the state in the bucket.
    let o = sluice(dir, &["state", "s3://lake/ck/out"], &env, None);
    assert!(o.status.success(), "{}", stderr(&o));
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(shown.contains("window_start"), "{shown}");
}

#[test]
fn a_bucket_that_is_not_there_fails_the_run_naming_it() {
    let s3 = LocalS3::start().unwrap();
    let env = s3.env();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::create_dir_all(dir.join("in")).unwrap();
    pipeline(dir, "in", "out");
    let args = [
        "run",
        "pipeline.sql",
        "--checkpoint",
        "s3://missing/ck",
        "--trigger",
        "once",
    ];
    let o = sluice(dir, &args, &env, None);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("s3://missing/ck"), "{err}");
}
