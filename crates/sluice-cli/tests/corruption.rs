//! Damaged checkpoint files the other CLI tests do not reach: a state
//! snapshot (named, then rebuilt with `state_snapshot_fallback`) and the
//! progress log (informational: damage there never stops a run).

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

fn sluice(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .current_dir(cwd)
        .env_remove("SLUICE_CRASH_AT")
        .env_remove("SLUICE_IO_FAULT")
        .output()
        .expect("the sluice binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const PIPELINE: &str = "CREATE SOURCE ev (k VARCHAR, ts TIMESTAMP, WATERMARK FOR ts AS ts)
  WITH (connector = 'file', path = 'in', format = 'json', max_files_per_trigger = 1);
CREATE SINK counts WITH (connector = 'file', path = 'out', format = 'json', output_mode = 'append') AS
SELECT window_start, k, count(*) AS n FROM TUMBLE(ev, ts, INTERVAL '1' HOUR) GROUP BY window_start, window_end, k;";

const ARGS: [&str; 6] = [
    "run",
    "p.sql",
    "--checkpoint",
    "ckpt",
    "--trigger",
    "available-now",
];

/// Input file `i`: two keys in the first hour (state that lives through
/// every batch), or with `close`, a row that closes that hour.
fn input(dir: &Path, i: usize, close: bool) {
    let body = if close {
        "{\"k\": \"z\", \"ts\": \"1970-01-01T02:00:00Z\"}\n".to_string()
    } else {
        format!(
            "{{\"k\": \"a\", \"ts\": \"1970-01-01T00:{i:02}:00Z\"}}\n{{\"k\": \"k{}\", \"ts\": \"1970-01-01T00:{i:02}:30Z\"}}\n",
            i % 3
        )
    };
    fs::write(dir.join("in").join(format!("{i:03}.json")), body).unwrap();
}

fn setup(dir: &Path, prelude: &str) {
    fs::create_dir_all(dir.join("in")).unwrap();
    fs::write(dir.join("p.sql"), format!("{prelude}{PIPELINE}")).unwrap();
    for i in 0..12 {
        input(dir, i, false);
    }
}

fn out_rows(dir: &Path) -> Vec<String> {
    let mut rows: Vec<String> = fs::read_dir(dir.join("out"))
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with(['_', '.']))
        .flat_map(|e| {
            fs::read_to_string(e.path())
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    rows.sort();
    rows
}

#[test]
fn a_damaged_snapshot_is_named_and_the_fallback_option_rebuilds_the_state() {
    // The uninterrupted run: 12 batches keep the first hour open, a 13th closes it.
    let clean = tempfile::tempdir().unwrap();
    setup(clean.path(), "");
    assert!(sluice(&ARGS, clean.path()).status.success());
    input(clean.path(), 12, true);
    assert!(sluice(&ARGS, clean.path()).status.success());
    let expected = out_rows(clean.path());
    assert_eq!(
        expected,
        [
            "{\"window_start\":\"1970-01-01T00:00:00\",\"k\":\"a\",\"n\":12}",
            "{\"window_start\":\"1970-01-01T00:00:00\",\"k\":\"k0\",\"n\":4}",
            "{\"window_start\":\"1970-01-01T00:00:00\",\"k\":\"k1\",\"n\":4}",
            "{\"window_start\":\"1970-01-01T00:00:00\",\"k\":\"k2\",\"n\":4}",
        ]
    );

    // The same, but batch 9's snapshot is damaged before the 13th batch,
    // whose restart loads state version 11 from it.
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), "");
    assert!(sluice(&ARGS, dir.path()).status.success());
    let state = dir.path().join("ckpt/counts/state/aggregate");
    let snap = state.join("9.snapshot");
    let bytes = fs::read(&snap).expect("a snapshot at version 9");
    fs::write(&snap, &bytes[..bytes.len() - 5]).unwrap();
    input(dir.path(), 12, true);
    let out = sluice(&ARGS, dir.path());
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("9.snapshot")
            && err.contains("truncated")
            && err.contains("state_snapshot_fallback"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(out_rows(dir.path()).is_empty(), "nothing emitted");

    // With the option the state is rebuilt from the deltas: same output,
    // and the run says what it passed over.
    fs::write(
        dir.path().join("p.sql"),
        format!("SET state_snapshot_fallback = true;\n{PIPELINE}"),
    )
    .unwrap();
    let out = sluice(&ARGS, dir.path());
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning") && err.contains("9.snapshot is unreadable"),
        "{err}"
    );
    assert_eq!(out_rows(dir.path()), expected);
}

#[test]
fn a_damaged_progress_log_never_stops_a_run() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), "");
    assert!(sluice(&ARGS, dir.path()).status.success());
    // A torn last line, binary junk, and a record that is valid JSON of
    // the wrong shape: progress records are informational.
    let log = dir.path().join("ckpt/counts/progress.jsonl");
    let mut bytes = fs::read(&log).unwrap();
    let keep = bytes.len() - 40;
    bytes.truncate(keep);
    bytes.extend_from_slice(b"\n\xff\xfe\x00junk\n{\"batch_id\": \"x\"}\n{\"batch_");
    fs::write(&log, bytes).unwrap();
    input(dir.path(), 12, true);
    let out = sluice(&ARGS, dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out_rows(dir.path()).len(), 4);
    // The log goes on after the damage, and `sluice state` still reads.
    let text = String::from_utf8_lossy(&fs::read(&log).unwrap()).into_owned();
    let last = text.lines().last().unwrap();
    assert!(
        last.starts_with("{\"name\":\"counts\"") && last.contains("\"batch_id\":12"),
        "a record of its own after the torn line: {text}"
    );
    let out = sluice(&["state", "ckpt/counts"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    // Every record that parses is still read: the 12 batches before the
    // damage minus the one torn, and batch 12 after it.
    let readable =
        sluice::deps::sluice_state::checkpoint::read_progress(&dir.path().join("ckpt/counts"))
            .unwrap();
    assert_eq!(readable.last().map(|p| p.batch_id), Some(12));
    assert!(readable.len() >= 12, "{}", readable.len());
}
