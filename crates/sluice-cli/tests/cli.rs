//! The `sluice` binary end to end: exactly-once across a hard crash, bad
//! input, a locked checkpoint, and clean one-line errors.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::sink_rows;

fn sluice(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("SLUICE_CRASH_AT")
        .env_remove("SLUICE_IO_FAULT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the sluice binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn pipeline(dir: &Path) -> PathBuf {
    let sql = dir.join("pipeline.sql");
    fs::write(
        &sql,
        "CREATE SOURCE ev (id BIGINT, v VARCHAR) WITH (connector = 'file', path = 'in', format = 'json', max_files_per_trigger = 1);
         CREATE SINK out WITH (connector = 'file', path = 'out', format = 'json') AS SELECT id, upper(v) AS v FROM ev WHERE id > 0;",
    )
    .unwrap();
    fs::create_dir_all(dir.join("in")).unwrap();
    sql
}

fn write_input(dir: &Path, files: usize) {
    for f in 0..files {
        let body: String = (0..5)
            .map(|r| format!("{{\"id\": {}, \"v\": \"r{f}-{r}\"}}\n", f * 5 + r + 1))
            .collect();
        fs::write(dir.join("in").join(format!("{f:03}.json")), body).unwrap();
    }
}

fn committed(dir: &Path) -> Vec<String> {
    committed_of(dir, "out")
}

#[test]
fn a_crash_between_sink_and_commit_neither_loses_nor_duplicates_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pipeline(dir);
    write_input(dir, 4);
    let args = [
        "run",
        "pipeline.sql",
        "--checkpoint",
        "ckpt",
        "--trigger",
        "available-now",
    ];

    // Batch 1 writes its file to the sink, then the process dies before its
    // commit is logged.
    let crashed = sluice(&args, dir, &[("SLUICE_CRASH_AT", "after-sink:1")]);
    assert_eq!(crashed.status.code(), Some(86), "{}", stderr(&crashed));
    assert_eq!(committed(dir), vec!["0"]);
    assert_eq!(logged_of(dir, "out", "plan"), vec!["0", "1"]);
    assert_eq!(
        sink_rows(&dir.join("out")).len(),
        10,
        "batch 1's output is visible before its commit"
    );

    // Also crash once right after a plan record.
    let crashed = sluice(&args, dir, &[("SLUICE_CRASH_AT", "after-offsets:2")]);
    assert_eq!(crashed.status.code(), Some(86), "{}", stderr(&crashed));

    let ok = sluice(&args, dir, &[]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let expected: Vec<String> = {
        let mut v: Vec<String> = (0..4)
            .flat_map(|f| {
                (0..5).map(move |r| format!("{{\"id\":{},\"v\":\"R{f}-{r}\"}}", f * 5 + r + 1))
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(sink_rows(&dir.join("out")), expected);
    assert_eq!(committed(dir), vec!["0", "1", "2", "3"]);

    // A new file later is picked up by the next run, and nothing else is redone.
    fs::write(dir.join("in/004.json"), "{\"id\": 100, \"v\": \"late\"}\n").unwrap();
    let ok = sluice(&args, dir, &[]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert_eq!(sink_rows(&dir.join("out")).len(), 21);
}

#[test]
fn a_malformed_line_fails_cleanly_and_the_fixed_file_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pipeline(dir);
    write_input(dir, 1);
    let args = [
        "run",
        "pipeline.sql",
        "--checkpoint",
        "ckpt",
        "--trigger",
        "available-now",
    ];
    assert!(sluice(&args, dir, &[]).status.success());
    let before = sink_rows(&dir.join("out"));

    fs::write(
        dir.join("in/001.json"),
        "{\"id\": 50, \"v\": \"x\"}\n{\"id\": 51, \"v\": }\n",
    )
    .unwrap();
    let failed = sluice(&args, dir, &[]);
    assert_eq!(failed.status.code(), Some(1));
    let err = stderr(&failed);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("sluice: error: "), "{err}");
    assert!(last.contains("in/001.json, line 2"), "{err}");
    assert!(last.contains("source 'ev'"), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert_eq!(
        committed(dir),
        vec!["0"],
        "the failed batch is not committed"
    );
    assert_eq!(
        sink_rows(&dir.join("out")),
        before,
        "the sink holds nothing of the failed batch"
    );

    fs::write(
        dir.join("in/001.json"),
        "{\"id\": 50, \"v\": \"x\"}\n{\"id\": 51, \"v\": \"y\"}\n",
    )
    .unwrap();
    let ok = sluice(&args, dir, &[]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert_eq!(committed(dir), vec!["0", "1"]);
    assert_eq!(sink_rows(&dir.join("out")).len(), before.len() + 2);
}

#[test]
fn a_checkpoint_in_use_is_refused_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pipeline(dir);
    write_input(dir, 1);
    // This test process holds the checkpoint, as a running query would.
    let held = sluice::deps::sluice_state::Checkpoint::open(
        &dir.join("ckpt/out"),
        "out",
        "x",
        &["ev".to_string()],
        0,
        Default::default(),
    )
    .unwrap();
    let refused = sluice(
        &[
            "run",
            "pipeline.sql",
            "--checkpoint",
            "ckpt",
            "--trigger",
            "once",
        ],
        dir,
        &[],
    );
    assert_eq!(refused.status.code(), Some(1));
    let err = stderr(&refused);
    assert!(err.contains("is in use by another query (pid"), "{err}");
    assert!(err.contains("ckpt/out"), "{err}");
    assert!(sink_rows(&dir.join("out")).is_empty());
    drop(held);
    assert!(
        sluice(
            &[
                "run",
                "pipeline.sql",
                "--checkpoint",
                "ckpt",
                "--trigger",
                "once"
            ],
            dir,
            &[]
        )
        .status
        .success()
    );
}

#[test]
fn explain_shows_the_incremental_plan_and_errors_are_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pipeline(dir);
    let out = sluice(&["explain", "pipeline.sql"], dir, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "streaming query 'out'",
        "output mode: append",
        "ev (file, no watermark)",
        "state: none",
        "StreamingTableExec",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }

    fs::write(dir.join("bad.sql"), "CREATE SOURCE s (a BIGINT) WITH (connector = 'memory');\nCREATE SINK k WITH (connector = 'console') AS SELECT a, count(*) FROM s GROUP BY a;").unwrap();
    let out = sluice(&["run", "bad.sql"], dir, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.contains("output mode append on the aggregate"),
        "{err}"
    );

    let out = sluice(&["run", "missing.sql"], dir, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("reading missing.sql"),
        "{}",
        stderr(&out)
    );
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_after_the_current_batch_commits_and_a_rerun_resumes() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::create_dir_all(dir.join("in")).unwrap();
    fs::write(dir.join("in/a.json"), "{\"id\": 1}\n{\"id\": 2}\n").unwrap();
    fs::write(
        dir.join("p.sql"),
        "CREATE SOURCE ev (id BIGINT) WITH (connector = 'file', path = 'in', format = 'json');
         CREATE SINK show WITH (connector = 'console') AS SELECT id * 10 AS id FROM ev;",
    )
    .unwrap();
    // An hour-long trigger: after batch 0 the query waits, until Ctrl-C.
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "p.sql", "--checkpoint", "ckpt", "--trigger", "1h"])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let done = line.contains("| 20 |");
        seen.push(line);
        if done {
            break;
        }
    }
    assert!(seen.iter().any(|l| l.starts_with("Batch: 0")), "{seen:?}");
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("stopping after the current batch commits"),
        "{err}"
    );
    assert_eq!(committed_of(dir, "show"), vec!["0"]);

    fs::write(dir.join("in/b.json"), "{\"id\": 3}\n").unwrap();
    let again = sluice(
        &[
            "run",
            "p.sql",
            "--checkpoint",
            "ckpt",
            "--trigger",
            "available-now",
        ],
        dir,
        &[],
    );
    assert!(again.status.success(), "{}", stderr(&again));
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(
        text.contains("Batch: 1") && text.contains("| 30 |") && !text.contains("| 20 |"),
        "{text}"
    );
}

/// The batch ids of the `commit` records in a query's batch log, read as
/// a person would: each record is a line `commit len=.. crc32=.. {json}`.
fn committed_of(dir: &Path, query: &str) -> Vec<String> {
    logged_of(dir, query, "commit")
}

/// The batch ids of a query's log records of one kind, in log order.
fn logged_of(dir: &Path, query: &str, kind: &str) -> Vec<String> {
    let mut segments: Vec<_> = fs::read_dir(dir.join("ckpt").join(query).join("log"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    segments.sort();
    let mut ids = Vec::new();
    for seg in segments {
        for line in fs::read_to_string(seg).unwrap().lines() {
            let mut words = line.splitn(4, ' ');
            if words.next() == Some(kind) {
                let body: serde_json::Value = serde_json::from_str(words.nth(2).unwrap()).unwrap();
                ids.push(body["batch_id"].to_string());
            }
        }
    }
    ids
}

#[test]
fn explain_shows_the_state_of_a_windowed_aggregate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::write(
        dir.join("agg.sql"),
        "CREATE SOURCE bids (auction BIGINT, price BIGINT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) WITH (connector = 'memory');
         CREATE SINK hot WITH (connector = 'console', output_mode = 'append') AS
         SELECT window_start, window_end, auction, count(*) AS bids, max(price) AS top
         FROM TUMBLE(bids, ts, INTERVAL '10' SECOND) GROUP BY window_start, window_end, auction;",
    )
    .unwrap();
    let out = sluice(&["explain", "agg.sql"], dir, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "output mode: append",
        "bids (memory, watermark ts - 5s)",
        "state: aggregate count(Int64(1)), max(bids.price) keyed by [bids.window_start, bids.window_end, bids.auction]",
        "eviction: emit a window once window_end <= watermark",
        "late rows: rows whose window_end <= watermark at the start of the batch are late",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}

#[test]
fn explain_shows_the_state_and_eviction_of_a_stream_join() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::write(
        dir.join("join.sql"),
        "CREATE SOURCE imp (ad BIGINT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) WITH (connector = 'memory');
         CREATE SOURCE clk (ad BIGINT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) WITH (connector = 'memory');
         CREATE SINK per_minute WITH (connector = 'console', output_mode = 'append') AS
         SELECT window_start, count(*) AS n, count(clk_ts) AS clicked FROM TUMBLE(
           (SELECT imp.ad, imp.ts, clk.ts AS clk_ts FROM imp LEFT JOIN clk ON imp.ad = clk.ad
              AND clk.ts BETWEEN imp.ts AND imp.ts + INTERVAL '1' MINUTE),
           ts, INTERVAL '1' MINUTE) GROUP BY window_start, window_end;",
    )
    .unwrap();
    let out = sluice(&["explain", "join.sql"], dir, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "state: left join of two streams on [imp.ad = clk.ad AND clk.ts >= imp.ts AND clk.ts <= imp.ts + INTERVAL '60' SECOND]",
        "eviction: left row once left.ts + 60000 ms <= watermark, right row once right.ts <= watermark",
        "(operator 'join': state/join/",
        "StreamJoinExec: operator=join,",
        "late rows: a row whose event time <= watermark at the start of the batch",
        "whose watermark is delayed by the join's bound",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}

/// Runs the windowed-count pipeline in `dir` until it stops, crashing first
/// at each of `crashes`; returns the sink's rows.
fn windowed_run(dir: &Path, crashes: &[&str]) -> Vec<String> {
    fs::create_dir_all(dir.join("in")).unwrap();
    fs::write(
        dir.join("w.sql"),
        "CREATE SINK late WITH (connector = 'file', path = 'late', format = 'json');
         CREATE SOURCE ev (k VARCHAR, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
           WITH (connector = 'file', path = 'in', format = 'json', max_files_per_trigger = 1, late_rows = 'late');
         CREATE SINK counts WITH (connector = 'file', path = 'out', format = 'json', output_mode = 'append') AS
         SELECT window_start, k, count(*) AS n FROM TUMBLE(ev, ts, INTERVAL '10' SECOND) GROUP BY window_start, window_end, k;",
    )
    .unwrap();
    // The SPEC §3 example's three batches, one file each, then a file that
    // moves the watermark far ahead so every window closes.
    let files = [
        "a@1 a@4 b@7 a@12",
        "b@9 a@16 b@21",
        "a@3 b@14 a@18 a@27",
        "z@100",
    ];
    for (i, f) in files.iter().enumerate() {
        let body: String = f
            .split(' ')
            .map(|e| {
                let (k, s) = e.split_once('@').unwrap();
                format!(
                    "{{\"k\": \"{k}\", \"ts\": \"1970-01-01T00:00:{:02}Z\"}}\n",
                    s.parse::<u32>().unwrap().min(59)
                )
            })
            .collect();
        fs::write(dir.join("in").join(format!("{i}.json")), body).unwrap();
    }
    let args = [
        "run",
        "w.sql",
        "--checkpoint",
        "ckpt",
        "--trigger",
        "available-now",
    ];
    for crash in crashes {
        let out = sluice(&args, dir, &[("SLUICE_CRASH_AT", crash)]);
        assert_eq!(out.status.code(), Some(86), "{crash}: {}", stderr(&out));
    }
    let out = sluice(&args, dir, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    sink_rows(&dir.join("out"))
}

#[test]
fn a_windowed_aggregate_survives_crashes_at_every_step_with_the_same_output() {
    let clean = tempfile::tempdir().unwrap();
    let expected = windowed_run(clean.path(), &[]);
    assert_eq!(
        expected,
        vec![
            "{\"window_start\":\"1970-01-01T00:00:00\",\"k\":\"a\",\"n\":2}",
            "{\"window_start\":\"1970-01-01T00:00:00\",\"k\":\"b\",\"n\":2}",
            "{\"window_start\":\"1970-01-01T00:00:10\",\"k\":\"a\",\"n\":3}",
            "{\"window_start\":\"1970-01-01T00:00:10\",\"k\":\"b\",\"n\":1}",
            "{\"window_start\":\"1970-01-01T00:00:20\",\"k\":\"a\",\"n\":1}",
            "{\"window_start\":\"1970-01-01T00:00:20\",\"k\":\"b\",\"n\":1}",
        ]
    );
    // `sluice state` reads what is left: the windows not yet closed.
    let out = sluice(&["state", "ckpt/counts"], clean.path(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("state as of batch 3: 1 key (the query's columns"),
        "{text}"
    );
    // The aggregate's final value, not its partial state.
    assert!(
        text.contains("| 1970-01-01T00:00:50 | 1970-01-01T00:01:00 | z | 1"),
        "{text}"
    );
    assert!(!text.contains("[count]"), "{text}");
    // Under the query's own name for it (`count(*) AS n`).
    assert!(
        text.lines()
            .any(|l| l.starts_with("| window_start") && l.contains("| n ")),
        "{text}"
    );
    // --raw shows the stored partial states under their internal names.
    let out = sluice(&["state", "ckpt/counts", "--raw"], clean.path(), &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("partial aggregate states, as asked with --raw"),
        "{text}"
    );
    assert!(text.contains("[count]"), "{text}");
    let out = sluice(
        &["state", "ckpt/counts", "--version", "0"],
        clean.path(),
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("state as of batch 0: 3 keys"), "{text}");
    assert!(
        text.contains("| 1970-01-01T00:00:00 | 1970-01-01T00:00:10 | a | 2"),
        "{text}"
    );
    let out = sluice(
        &["state", "ckpt/counts", "--version", "9"],
        clean.path(),
        &[],
    );
    assert!(
        stderr(&out).contains("batch 9 of query 'counts' has not committed"),
        "{}",
        stderr(&out)
    );

    // Each window came out in the batch whose watermark closed it.
    let part = |n: u32| {
        fs::read_to_string(clean.path().join(format!("out/part-{n:06}.json"))).unwrap_or_default()
    };
    assert!(part(0).is_empty() && part(1).contains("00:00:00") && !part(1).contains("00:00:10"));
    assert!(part(2).contains("00:00:10") && !part(2).contains("00:00:20"));
    assert!(part(3).contains("00:00:20"));
    // The late a@3 was counted and written to the late-row sink.
    let late = sink_rows(&clean.path().join("late"));
    assert_eq!(late.len(), 1, "{late:?}");
    assert!(
        late[0].contains("\"k\":\"a\"") && late[0].contains("00:00:00"),
        "{late:?}"
    );

    let crashed = tempfile::tempdir().unwrap();
    let got = windowed_run(
        crashed.path(),
        &[
            "after-offsets:0",
            "after-sink:1",
            "after-commit:1",
            "after-sink:2",
            "after-offsets:3",
        ],
    );
    assert_eq!(got, expected);
    assert_eq!(
        sink_rows(&crashed.path().join("late")),
        late,
        "late rows once, across crashes"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            fs::copy(e.path(), &target).unwrap();
        }
    }
}

#[test]
fn a_corrupt_checkpoint_file_of_any_kind_is_named_and_nothing_runs() {
    let clean = tempfile::tempdir().unwrap();
    windowed_run(clean.path(), &[]);
    // A crash after the sink of batch 4 leaves its file visible and its
    // state version written, for the re-run to replace and to pass over.
    fs::write(
        clean.path().join("in/9.json"),
        "{\"k\": \"q\", \"ts\": \"1970-01-01T00:00:59Z\"}\n",
    )
    .unwrap();
    let args = [
        "run",
        "w.sql",
        "--checkpoint",
        "ckpt",
        "--trigger",
        "available-now",
    ];
    let crashed = sluice(&args, clean.path(), &[("SLUICE_CRASH_AT", "after-sink:4")]);
    assert_eq!(crashed.status.code(), Some(86), "{}", stderr(&crashed));
    let state_delta = "ckpt/counts/state/aggregate/3.delta".to_string();
    let kinds = [
        "ckpt/counts/metadata".to_string(),
        // The batch log: a byte flipped in its last, complete record
        // (batch 4's plan) is damage; cut short, the record is torn (below).
        "ckpt/counts/log/00000000000000000000.log".to_string(),
        "ckpt/counts/sources/ev/files/0".to_string(),
        "ckpt/counts/state/aggregate/meta".to_string(),
        state_delta,
    ];
    for (i, file) in kinds.iter().enumerate() {
        for damage in ["flip", "truncate"] {
            if file.contains("/log/") && damage == "truncate" {
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            copy_dir(clean.path(), dir.path());
            let path = dir.path().join(file);
            let mut bytes = fs::read(&path).unwrap();
            // Damage goes into what the file holds: a log segment and a
            // prepared state delta may end in zeros past it (and the
            // zeros of a delta's own end are covered by its checksum).
            let end = bytes.iter().rposition(|b| *b != 0).unwrap() + 1;
            match damage {
                "flip" => bytes[end - 2] ^= 0x20,
                _ => bytes.truncate(end * 2 / 3),
            }
            fs::write(&path, &bytes).unwrap();
            let before = sink_rows(&dir.path().join("out"));
            let out = sluice(&args, dir.path(), &[]);
            let err = stderr(&out);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{file} ({damage}, case {i}): {err}"
            );
            assert!(
                err.contains(file.as_str()),
                "{file} ({damage}) not named: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
            assert_eq!(
                sink_rows(&dir.path().join("out")),
                before,
                "{file} ({damage}): the sink changed"
            );
        }
    }
    // A log whose last record is cut short, as a crash mid-append leaves it:
    // the torn record goes, batch 4 is planned again, and the output is that
    // of a resume from the undamaged checkpoint.
    let undamaged = tempfile::tempdir().unwrap();
    copy_dir(clean.path(), undamaged.path());
    let resumed = sluice(&args, undamaged.path(), &[]);
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    let torn = tempfile::tempdir().unwrap();
    copy_dir(clean.path(), torn.path());
    let log = torn.path().join("ckpt/counts/log/00000000000000000000.log");
    // The last record's end never written: zeros, as the durable segment
    // was created with, in place of its last 10 bytes.
    let mut bytes = fs::read(&log).unwrap();
    let end = bytes.iter().rposition(|b| *b != 0).unwrap() + 1;
    bytes[end - 10..end].fill(0);
    fs::write(&log, &bytes).unwrap();
    let out = sluice(&args, torn.path(), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        sink_rows(&torn.path().join("out")),
        sink_rows(&undamaged.path().join("out"))
    );
    let progress = fs::read_to_string(torn.path().join("ckpt/counts/progress.jsonl")).unwrap();
    assert!(progress.contains("ended in a torn record"), "{progress}");
}

#[test]
fn crashing_at_every_step_of_every_batch_in_one_run_still_gives_the_same_output() {
    let clean = tempfile::tempdir().unwrap();
    let expected = windowed_run(clean.path(), &[]);
    // Every fault point of every batch, one after the other on the same
    // checkpoint: 16 kills of the real binary, each resumed by the next run.
    let crashes: Vec<String> = (0..4)
        .flat_map(|b| {
            ["after-offsets", "after-state", "after-sink", "after-commit"]
                .map(|p| format!("{p}:{b}"))
        })
        .collect();
    let crashes: Vec<&str> = crashes.iter().map(String::as_str).collect();
    let crashed = tempfile::tempdir().unwrap();
    assert_eq!(windowed_run(crashed.path(), &crashes), expected);
    assert_eq!(
        sink_rows(&crashed.path().join("late")),
        sink_rows(&clean.path().join("late"))
    );
}

#[test]
fn state_and_progress_take_the_checkpoint_root_and_name_queries() {
    let dir = tempfile::tempdir().unwrap();
    windowed_run(dir.path(), &[]);
    // The directory given to `run --checkpoint`: every query in it.
    let out = sluice(&["state", "ckpt"], dir.path(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("query 'counts', state as of batch 3: 1 key"),
        "{text}"
    );
    let out = sluice(&["state", "ckpt", "--query", "counts"], dir.path(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = sluice(&["state", "ckpt", "--query", "nope"], dir.path(), &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("ckpt holds no query 'nope' (it holds: counts)"),
        "{}",
        stderr(&out)
    );
    let out = sluice(
        &["state", "ckpt/counts", "--query", "other"],
        dir.path(),
        &[],
    );
    assert!(
        stderr(&out).contains("is the checkpoint of query 'counts', not 'other'"),
        "{}",
        stderr(&out)
    );
    let out = sluice(&["state", "in"], dir.path(), &[]);
    assert!(
        stderr(&out).contains("in holds no query checkpoint"),
        "{}",
        stderr(&out)
    );
    // Without the SQL kept by `run`, the partial states, saying why.
    fs::remove_file(dir.path().join("ckpt/counts/pipeline.sql")).unwrap();
    let out = sluice(&["state", "ckpt"], dir.path(), &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("as the checkpoint holds no pipeline.sql"),
        "{text}"
    );

    // The progress records as a table: the four batches, or the last N.
    let out = sluice(&["progress", "ckpt"], dir.path(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("query 'counts': the last 4 batches of 4 recorded"),
        "{text}"
    );
    let header = text.lines().find(|l| l.contains("| batch")).unwrap();
    for col in [
        "rows in",
        "rows out",
        "latency ms",
        "backlog",
        "watermark",
        "late",
        "state rows",
        "behind",
    ] {
        assert!(header.contains(col), "{col} in {header}");
    }
    // Batch 2 read one late row. The backlog is known when a planning
    // listed the directory: the first (three files left), not the others,
    // which had a logged file to take without listing.
    let rows: Vec<Vec<String>> = text
        .lines()
        .filter(|l| l.starts_with("| ") && !l.contains("| batch"))
        .map(|l| l.split('|').map(|c| c.trim().to_string()).collect())
        .collect();
    assert_eq!(rows.len(), 4, "{text}");
    let col = |name: &str| header.split('|').position(|c| c.trim() == name).unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r[col("batch")].as_str())
            .collect::<Vec<_>>(),
        ["0", "1", "2", "3"]
    );
    assert_eq!(
        rows.iter()
            .map(|r| r[col("late")].as_str())
            .collect::<Vec<_>>(),
        ["0", "0", "1", "0"]
    );
    assert_eq!(
        rows.iter()
            .map(|r| r[col("backlog")].as_str())
            .collect::<Vec<_>>(),
        ["3", "", "", ""]
    );
    let out = sluice(&["progress", "ckpt/counts", "--last", "1"], dir.path(), &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("the last 1 batch of 4 recorded"), "{text}");
}

#[test]
fn run_says_rows_in_the_singular_and_serves_http_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let sql = pipeline(dir.path());
    fs::write(
        dir.path().join("in/000.json"),
        "{\"id\": 1, \"v\": \"x\"}\n",
    )
    .unwrap();
    let out = sluice(
        &[
            "run",
            sql.to_str().unwrap(),
            "--checkpoint",
            "ckpt",
            "--trigger",
            "available-now",
            "--http",
            "127.0.0.1:0",
        ],
        dir.path(),
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("sluice: serving http://127.0.0.1:"), "{err}");
    assert!(
        err.contains("(1 row in, 1 row out in the last batch)"),
        "{err}"
    );
    // A bad address fails before any batch, naming it.
    let out = sluice(
        &["run", sql.to_str().unwrap(), "--http", "127.0.0.1:99999"],
        dir.path(),
        &[],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("listening for HTTP on 127.0.0.1:99999"),
        "{}",
        stderr(&out)
    );
}
