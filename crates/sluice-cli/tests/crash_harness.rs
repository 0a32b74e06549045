//! The crash harness: the real `sluice` binary on a file → file pipeline with
//! stateful and stateless sinks (a windowed count; a stream–stream left outer
//! join feeding a windowed count; a filtered copy), killed at random moments of its durable
//! writes (inside checkpoint, state and sink writes: a temp file half
//! written, before and after a rename) and restarted until it finishes, many
//! times over; and the same pipeline on a disk that fills up mid-batch. The
//! output must always equal an uninterrupted run's: no row lost, none
//! duplicated.
//!
//! `SLUICE_KILL_SEED=<n>` replays a run's kill step numbers (the seed is in
//! every failure message; which write a step falls in can vary, as writes
//! on parallel threads interleave); `SLUICE_KILL_RUNS=<n>` sets how many pipelines are
//! killed (default 20).

mod common;
use common::sink_rows;
use common::{Rng, kill_until_done};

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

fn sluice(args: &[&str], cwd: &Path, io_fault: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(args)
        .current_dir(cwd)
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

/// Every `.<name>.<pid>.tmp` file under `dir`.
fn temp_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(temp_files(&p));
        } else if e
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with('.') && n.ends_with(".tmp"))
        {
            out.push(p);
        }
    }
    out
}

/// Every sink's rows: the windowed counts, the stateless copy, late rows
/// and the joined rows.
fn outputs(dir: &Path) -> [Vec<String>; 4] {
    ["counts", "copy", "late", "joined"].map(|d| sink_rows(&dir.join(d)))
}

const ARGS: [&str; 6] = [
    "run",
    "p.sql",
    "--checkpoint",
    "ckpt",
    "--trigger",
    "available-now",
];

/// The pipeline and its input: the SPEC §3 example's rows, a file each, and
/// a last file that closes every window; and a second stream of the same
/// keys that the first (read again as `ev2`) joins within two seconds.
fn setup(dir: &Path) {
    fs::write(
        dir.join("p.sql"),
        "SET max_batch_retries = 1;
         CREATE SINK late WITH (connector = 'file', path = 'late', format = 'json');
         CREATE SOURCE ev (k VARCHAR, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
           WITH (connector = 'file', path = 'in', format = 'json', max_files_per_trigger = 1, late_rows = 'late');
         CREATE SINK counts WITH (connector = 'file', path = 'counts', format = 'json', output_mode = 'append') AS
         SELECT window_start, k, count(*) AS n, max(ts) AS last FROM TUMBLE(ev, ts, INTERVAL '10' SECOND) GROUP BY window_start, window_end, k;
         CREATE SINK copy WITH (connector = 'file', path = 'copy', format = 'json') AS
         SELECT k, ts, upper(k) AS big FROM ev WHERE k <> 'z';
         CREATE SOURCE ev2 (k VARCHAR, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
           WITH (connector = 'file', path = 'in', format = 'json', max_files_per_trigger = 1);
         CREATE SOURCE im (k VARCHAR, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
           WITH (connector = 'file', path = 'in2', format = 'json', max_files_per_trigger = 1);
         CREATE SINK joined WITH (connector = 'file', path = 'joined', format = 'json', output_mode = 'append') AS
         SELECT window_start, k, count(*) AS n, count(im_ts) AS matched FROM TUMBLE(
           (SELECT ev2.k, ev2.ts, im.ts AS im_ts FROM ev2 LEFT JOIN im ON ev2.k = im.k
              AND im.ts BETWEEN ev2.ts - INTERVAL '2' SECOND AND ev2.ts + INTERVAL '2' SECOND),
           ts, INTERVAL '10' SECOND) GROUP BY window_start, window_end, k;",
    )
    .unwrap();
    write_rows(&dir.join("in"), &EVENTS);
    write_rows(&dir.join("in2"), &IMPRESSIONS);
}

/// `ev`'s rows, one file per micro-batch (`key@second`).
const EVENTS: [&str; 5] = [
    "a@1 a@4 b@7 a@12",
    "b@9 a@16 b@21",
    "a@3 b@14 a@18 a@27",
    "c@31 a@33 b@38",
    "z@100",
];

/// `im`'s rows, read beside `ev`'s, a file per micro-batch.
const IMPRESSIONS: [&str; 5] = ["a@2 b@8", "a@15 c@30", "b@20 a@26", "b@37 a@34", "y@100"];

fn write_rows(dir: &Path, files: &[&str]) {
    fs::create_dir_all(dir).unwrap();
    for (i, f) in files.iter().enumerate() {
        let body: String = f
            .split(' ')
            .map(|e| {
                let (k, s) = e.split_once('@').unwrap();
                let s: u32 = s.parse().unwrap();
                format!(
                    "{{\"k\": \"{k}\", \"ts\": \"1970-01-01T00:{:02}:{:02}Z\"}}\n",
                    s / 60,
                    s % 60
                )
            })
            .collect();
        fs::write(dir.join(format!("{i}.json")), body).unwrap();
    }
}

/// How many durable-write steps an uninterrupted run of the pipeline takes:
/// a crash at a step past the last is no crash.
fn count_steps() -> u64 {
    // Crash at step n succeeds for every n past the end; find the end by
    // doubling then bisecting, on fresh copies of the input.
    let finishes = |n: u64| {
        let d = tempfile::tempdir().unwrap();
        setup(d.path());
        let out = sluice(&ARGS, d.path(), Some(&format!("crash:{n}")));
        match out.status.code() {
            Some(0) => true,
            Some(86) => false,
            other => panic!("step {n}: exit {other:?}: {}", stderr(&out)),
        }
    };
    let (mut lo, mut hi) = (1, 64);
    while !finishes(hi) {
        lo = hi;
        hi *= 2;
        assert!(hi < 1 << 16, "no end of the run's I/O steps found");
    }
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if finishes(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    lo
}

#[test]
fn random_kills_inside_durable_writes_never_lose_or_duplicate_a_row() {
    let clean = tempfile::tempdir().unwrap();
    setup(clean.path());
    let out = sluice(&ARGS, clean.path(), None);
    assert!(out.status.success(), "{}", stderr(&out));
    let expected = outputs(clean.path());
    assert_eq!(expected[0].len(), 9, "{:?}", expected[0]);
    assert_eq!(expected[1].len(), 14, "{:?}", expected[1]);
    assert_eq!(expected[2].len(), 1, "the late a@3: {:?}", expected[2]);
    // Per window and key, rows of `ev2` (a@3 and b@14 are late for the
    // join) and how many found an `im` row within two seconds: a@12 and
    // a@18 never do, and come out once each with NULLs when evicted.
    let joined: Vec<(String, String, u64, u64)> = expected[3]
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_str(r).unwrap();
            let text = |f: &str| v[f].as_str().unwrap_or_default().to_string();
            let count = |f: &str| v[f].as_u64().unwrap_or_default();
            (
                text("window_start"),
                text("k"),
                count("n"),
                count("matched"),
            )
        })
        .collect();
    let want = [
        (0, "a", 2, 2),
        (0, "b", 2, 2),
        (10, "a", 3, 1),
        (20, "a", 1, 1),
        (20, "b", 1, 1),
        (30, "a", 1, 1),
        (30, "b", 1, 1),
        (30, "c", 1, 1),
    ]
    .map(|(s, k, n, m)| (format!("1970-01-01T00:00:{s:02}"), k.to_string(), n, m));
    assert_eq!(joined, want, "{:?}", expected[3]);

    let steps = count_steps();
    assert!(steps > 20, "a run takes {steps} durable-write steps");
    let seed: u64 = std::env::var("SLUICE_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c4a5);
    let runs: u64 = std::env::var("SLUICE_KILL_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut rng = Rng(seed | 1);
    let mut kills = 0;
    for run in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        setup(dir.path());
        // Every attempt is killed at a random step of its own writes (a
        // resumed run writes less, so late steps become no kill), until one
        // finishes; then once more without faults, which must do nothing new.
        kills += kill_until_done(&mut rng, steps, &format!("seed {seed}, run {run}"), |at| {
            sluice(&ARGS, dir.path(), Some(&format!("crash:{at}")))
        });
        let out = sluice(&ARGS, dir.path(), None);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(
            outputs(dir.path()),
            expected,
            "seed {seed}, run {run}: output differs from the uninterrupted run"
        );
        // The killed runs' half-written temporary files are gone: each run
        // removes those of dead processes when it opens its checkpoint and
        // its sinks.
        let left = temp_files(dir.path());
        assert!(
            left.is_empty(),
            "seed {seed}, run {run}: left behind {left:?}"
        );
    }
    assert!(kills >= runs, "only {kills} kills in {runs} runs");
    println!("{runs} runs, {kills} kills at random steps of {steps}, seed {seed}");
}

#[test]
fn a_disk_that_fills_up_mid_batch_fails_the_run_cleanly_and_the_next_run_recovers() {
    let clean = tempfile::tempdir().unwrap();
    setup(clean.path());
    assert!(sluice(&ARGS, clean.path(), None).status.success());
    let expected = outputs(clean.path());
    let steps = count_steps();
    // The disk fills at a step spread over the run: inside log appends,
    // state and sink writes alike.
    for at in (1..steps).step_by(9) {
        let dir = tempfile::tempdir().unwrap();
        setup(dir.path());
        let out = sluice(&ARGS, dir.path(), Some(&format!("full:{at}")));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "step {at}: {err}");
        assert!(
            err.contains("No space left on device") && !err.contains("panicked"),
            "step {at}: {err}"
        );
        // One line that names what was being written.
        assert_eq!(err.trim().lines().count(), 1, "step {at}: {err}");
        assert!(
            ["writing ", "moving ", "appending a ", "starting "]
                .iter()
                .any(|w| err.contains(w)),
            "{err}"
        );
        let out = sluice(&ARGS, dir.path(), None);
        assert!(out.status.success(), "step {at}: {}", stderr(&out));
        assert_eq!(outputs(dir.path()), expected, "full disk at step {at}");
    }
}
