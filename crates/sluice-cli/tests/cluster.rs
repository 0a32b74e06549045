//! `sluice cluster scheduler`, `sluice cluster executor` and `sluice run
//! --cluster`, as separate processes on 127.0.0.1: a query's output on the
//! cluster (a stateless join, and a windowed aggregate with its state in
//! partitions of the checkpoint) equals its output in one process, and
//! stays so when the driver crashes mid-run or an executor is killed
//! between batches.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

mod common;
use common::sink_rows;

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.env_remove("SLUICE_CRASH_AT")
        .env_remove("SLUICE_IO_FAULT");
    cmd
}

/// A cluster process, killed when dropped.
struct Part(Child);

impl Drop for Part {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port free at the time of asking (the executor binds it itself).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// Starts a scheduler on a free port and returns it with its address, read
/// from the line it prints (waiting at most a minute).
fn scheduler(log: &Path) -> (Part, String) {
    scheduler_with(log, &[])
}

/// [`scheduler`] with more arguments.
fn scheduler_with(log: &Path, extra: &[&str]) -> (Part, String) {
    let mut child = bin()
        .args(["cluster", "scheduler", "--bind", "127.0.0.1:0"])
        .args(extra)
        // Its recovery from a lost executor is logged as warnings.
        .env("SLUICE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .expect("the scheduler starts");
    let stdout = child.stdout.take().unwrap();
    let part = Part(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the scheduler prints its address");
    let addr = line
        .trim()
        .strip_prefix("sluice: scheduler listening on ")
        .unwrap_or_else(|| panic!("unexpected scheduler output {line:?}"))
        .to_string();
    (part, addr)
}

fn executor(scheduler: &str, dir: &Path, i: usize) -> Part {
    executor_with(scheduler, dir, i, &[], &[])
}

/// [`executor`] with more environment and arguments.
fn executor_with(
    scheduler: &str,
    dir: &Path,
    i: usize,
    env: &[(&str, &str)],
    extra: &[&str],
) -> Part {
    let mut cmd = bin();
    // Shuffle reads mended (see `sluice_cluster::shuffle`) are warnings.
    cmd.env("SLUICE_LOG", "warn").envs(env.iter().copied());
    // In a directory of its own: nothing it writes may depend on where
    // the driver runs.
    let work = dir.join(format!("executor-{i}"));
    fs::create_dir_all(&work).unwrap();
    let child = cmd
        .current_dir(&work)
        .args([
            "cluster",
            "executor",
            "--scheduler",
            scheduler,
            "--host",
            "127.0.0.1",
            "--flight-port",
            &free_port().to_string(),
            "--grpc-port",
            &free_port().to_string(),
            "--slots",
            "2",
            "--work-dir",
        ])
        .arg(dir.join(format!("executor-{i}")))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join(format!("executor-{i}.log"))).unwrap())
        .spawn()
        .expect("the executor starts");
    Part(child)
}

fn pipeline(dir: &Path) -> PathBuf {
    let sql = dir.join("pipeline.sql");
    fs::write(
        &sql,
        "CREATE SOURCE ev (id BIGINT, v VARCHAR) WITH (connector = 'file', path = 'in', format = 'json', max_files_per_trigger = 1);
         CREATE EXTERNAL TABLE names STORED AS CSV LOCATION 'names.csv' OPTIONS ('format.has_header' 'true');
         CREATE SINK out WITH (connector = 'file', path = 'out', format = 'json') AS
         SELECT e.id, upper(e.v) AS v, n.name FROM ev e LEFT JOIN names n ON e.id % 4 = n.k WHERE e.id % 3 <> 0;",
    )
    .unwrap();
    fs::write(dir.join("names.csv"), "k,name\n0,zero\n1,one\n2,two\n").unwrap();
    fs::create_dir_all(dir.join("in")).unwrap();
    for f in 0..20 {
        let body: String = (0..5)
            .map(|r| format!("{{\"id\": {}, \"v\": \"r{f}-{r}\"}}\n", f * 5 + r + 1))
            .collect();
        fs::write(dir.join("in").join(format!("{f:03}.json")), body).unwrap();
    }
    sql
}

fn run(dir: &Path, cluster: Option<&str>, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = bin();
    cmd.current_dir(dir)
        .args(["run", "pipeline.sql", "--trigger", "available-now"]);
    if !extra.contains(&"--checkpoint") {
        cmd.args(["--checkpoint", "ckpt"]);
    }
    if let Some(c) = cluster {
        cmd.args(["--cluster", c]);
    }
    cmd.args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    bounded(cmd)
}

/// Runs `cmd` to the end, or kills it after five minutes and fails: a run
/// waits on the cluster, and a cluster that never answers must not hang
/// the test suite.
fn bounded(mut cmd: Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sluice run starts");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(300)) {
        Ok(out) => out.expect("sluice run ran"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("sluice run (pid {pid}) did not finish within five minutes");
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The output of the pipeline run in one process, start to end.
fn expected() -> Vec<String> {
    let rows = one_process(|d| {
        pipeline(d);
    });
    assert_eq!(rows.len(), 67, "{rows:?}");
    rows
}

/// The sink rows of the pipeline `setup` writes, run in one process.
fn one_process(setup: impl Fn(&Path)) -> Vec<String> {
    one_process_sinks(setup, &["out"]).swap_remove(0)
}

/// The rows of each of `sinks` (by path) of the pipeline `setup` writes,
/// run in one process.
fn one_process_sinks(setup: impl Fn(&Path), sinks: &[&str]) -> Vec<Vec<String>> {
    let tmp = tempfile::tempdir().unwrap();
    setup(tmp.path());
    let o = run(tmp.path(), None, &[], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    sinks
        .iter()
        .map(|s| sink_rows(&tmp.path().join(s)))
        .collect()
}

/// The rows of the two sinks of [`windowed_pipeline`] run in one process.
fn windowed_expected() -> (Vec<String>, Vec<String>) {
    let mut both = one_process_sinks(windowed_pipeline, &["out", "joined"]);
    let joined = both.pop().unwrap();
    let out = both.pop().unwrap();
    assert!(out.len() > 20, "{out:?}");
    // 120 rows of `ev`, a third matched; the rest come out with NULLs
    // but for the last few, whose match the watermark never ruled out.
    let matched = joined.iter().filter(|r| r.contains("\"t")).count();
    assert!(joined.len() > 100 && matched >= 40, "{joined:?}");
    (out, joined)
}

#[test]
fn a_query_on_the_cluster_survives_a_driver_crash_and_a_lost_executor() {
    let expected = expected();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pipeline(dir);
    let (_scheduler, addr) = scheduler(&dir.join("scheduler.log"));
    let _one = executor(&addr, dir, 1);
    let two = executor(&addr, dir, 2);

    // The driver dies after batch 4's rows reached the sink, before its
    // commit: the re-run redoes batch 4 on the cluster, exactly once.
    let crashed = run(
        dir,
        Some(&addr),
        &[],
        &[("SLUICE_CRASH_AT", "after-sink:4")],
    );
    assert_eq!(crashed.status.code(), Some(86), "{}", stderr(&crashed));
    let ok = run(dir, Some(&addr), &["--max-batches", "6"], &[]);
    assert!(ok.status.success(), "{}", stderr(&ok));

    // One executor is killed; the rest of the run goes to the other.
    drop(two);
    let ok = run(dir, Some(&addr), &[], &[]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert_eq!(sink_rows(&dir.join("out")), expected);
}

/// Two queries over streams with watermarks, in append mode: a windowed
/// aggregate (sink `out`), and a left outer join of two streams within
/// 5 seconds (sink `joined`), whose rows without a match come out once the
/// watermark rules one out.
fn windowed_pipeline(dir: &Path) {
    fs::write(
        dir.join("pipeline.sql"),
        "CREATE SOURCE ev (id BIGINT, v VARCHAR, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) \
           WITH (connector = 'file', path = 'in', format = 'json', max_files_per_trigger = 1);
         CREATE SOURCE tags (id BIGINT, tag VARCHAR, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) \
           WITH (connector = 'file', path = 'tags', format = 'json', max_files_per_trigger = 1);
         CREATE SINK out WITH (connector = 'file', path = 'out', format = 'json') AS
         SELECT window_start, id % 5 AS k, count(*) AS n, min(v) AS first
         FROM TUMBLE(ev, ts, INTERVAL '10' SECOND) GROUP BY window_start, window_end, id % 5;
         CREATE SINK joined WITH (connector = 'file', path = 'joined', format = 'json') AS
         SELECT e.id, e.v, t.tag FROM ev e LEFT JOIN tags t
           ON e.id = t.id AND t.ts BETWEEN e.ts AND e.ts + INTERVAL '5' SECOND;",
    )
    .unwrap();
    fs::create_dir_all(dir.join("tags")).unwrap();
    for f in 0..20 {
        // Every other row of each file of `ev` gets a tag, two seconds
        // after it.
        let body: String = (0..6)
            .step_by(2)
            .map(|r| {
                let id = f * 6 + r;
                format!(
                    "{{\"id\": {id}, \"tag\": \"t{f}\", \"ts\": \"2026-01-01T00:00:{:02}\"}}\n",
                    ((f * 3 + r % 3) % 60 + 2).min(59)
                )
            })
            .collect();
        fs::write(dir.join("tags").join(format!("{f:03}.json")), body).unwrap();
    }
    fs::create_dir_all(dir.join("in")).unwrap();
    for f in 0..20 {
        let body: String = (0..6)
            .map(|r| {
                let id = f * 6 + r;
                format!(
                    "{{\"id\": {id}, \"v\": \"r{f}-{r}\", \"ts\": \"2026-01-01T00:00:{:02}\"}}\n",
                    (f * 3 + r % 3) % 60
                )
            })
            .collect();
        fs::write(dir.join("in").join(format!("{f:03}.json")), body).unwrap();
    }
}

#[test]
fn a_windowed_aggregate_and_a_join_on_the_cluster_are_exactly_once_across_crashes() {
    let (expected, joined) = windowed_expected();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    windowed_pipeline(dir);
    let (_scheduler, addr) = scheduler(&dir.join("scheduler.log"));
    let _one = executor(&addr, dir, 1);
    let two = executor(&addr, dir, 2);
    // The driver dies after batch 3's state and rows are written, before
    // its commit record; then again right after batch 7's plan record.
    for crash in ["after-sink:3", "after-offsets:7"] {
        let crashed = run(dir, Some(&addr), &[], &[("SLUICE_CRASH_AT", crash)]);
        assert_eq!(
            crashed.status.code(),
            Some(86),
            "{crash}: {}",
            stderr(&crashed)
        );
    }
    let ok = run(dir, Some(&addr), &["--max-batches", "4"], &[]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    // One executor is killed; the rest of the run goes to the other, which
    // loads the state partitions the killed one wrote.
    drop(two);
    let ok = run(dir, Some(&addr), &[], &[]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert_eq!(sink_rows(&dir.join("out")), expected);
    assert_eq!(sink_rows(&dir.join("joined")), joined);
    // The state is in the driver's checkpoint (the executors run in other
    // directories and are given its absolute path).
    assert!(dir.join("ckpt/out/state/aggregate/partitions").exists());
    assert!(dir.join("ckpt/out/state/aggregate/p0/0.delta").exists());
    assert!(dir.join("ckpt/joined/state/join/p0/0.delta").exists());

    // The checkpoint's state is in partitions: a run in one process is
    // refused, naming why.
    let o = run(dir, None, &[], &[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("was written by a run on a cluster"), "{err}");
}

/// With pull scheduling: with push scheduling, Ballista 55's scheduler
/// stopped scheduling in four runs of eight after the executor died
/// mid-task (the last thing it logs is that it ignores the status of a task
/// of the stage it rolled back; later jobs are queued and never run).
#[test]
fn an_executor_killed_in_the_middle_of_a_batch_leaves_the_output_exactly_once() {
    let (expected, joined) = windowed_expected();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    windowed_pipeline(dir);
    // An executor not heard from for 4 s is taken for lost.
    let (_scheduler, addr) = scheduler_with(
        &dir.join("scheduler.log"),
        &["--executor-timeout", "4", "--scheduling", "pull"],
    );
    let pull = ["--scheduling", "pull"];
    let _one = executor_with(&addr, dir, 1, &[], &pull);
    // Executor two dies in the middle of the first task of batch 5 or
    // later it runs: after writing its state partition's version, before
    // reporting the task done.
    let mut two = executor_with(
        &addr,
        dir,
        2,
        &[("SLUICE_CRASH_AT", "after-state:5")],
        &pull,
    );
    // A job the cluster leaves waiting is given up after 15 s and the
    // batch retried.
    let logged = [("SLUICE_LOG", "warn")];
    let first = run(dir, Some(&addr), &["--job-timeout", "15"], &logged);
    // Ballista runs the lost tasks again on executor one; should the job
    // fail instead, the query stops with the batch uncommitted and a re-run
    // redoes it. Either way the output is exactly once.
    eprintln!(
        "the run with the executor killed mid-batch: {}",
        if first.status.success() {
            "completed (Ballista ran the lost tasks again)".to_string()
        } else {
            format!("stopped: {}", stderr(&first).trim())
        }
    );
    if !first.status.success() {
        let again = run(dir, Some(&addr), &["--job-timeout", "15"], &logged);
        assert!(
            again.status.success(),
            "first: {}\nagain: {}",
            stderr(&first),
            stderr(&again)
        );
    }
    let status = two.0.try_wait().expect("executor two's status");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(86),
        "executor two did not die mid-batch"
    );
    // What the scheduler did about the lost executor, shown if an output
    // differs.
    let driver: String = stderr(&first)
        .lines()
        .filter(|l| l.contains("runs again"))
        .map(|l| format!("driver: {l}\n"))
        .collect();
    let recovery: String = ["scheduler.log", "executor-1.log", "executor-2.log"]
        .iter()
        .flat_map(|log| {
            fs::read_to_string(dir.join(log))
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    l.contains("Roll back") || l.contains("Reset ") || l.contains("ran again")
                })
                .map(|l| format!("{log}: {l}\n"))
                .collect::<Vec<_>>()
        })
        .chain(std::iter::once(driver))
        .collect();
    assert_eq!(sink_rows(&dir.join("out")), expected, "{recovery}");
    assert_eq!(sink_rows(&dir.join("joined")), joined, "{recovery}");
    eprintln!("the scheduler's recovery:\n{recovery}");
}

#[test]
fn a_checkpoint_written_in_one_process_is_refused_on_a_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A checkpoint whose aggregate state was written in one process is not
    // taken over by a cluster.
    windowed_pipeline(dir);
    let o = run(dir, None, &["--max-batches", "2"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(dir, Some("127.0.0.1:9"), &[], &[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("was written by a run in one process"), "{err}");
}

/// The same windowed aggregate with its checkpoint in a bucket of a local
/// S3 server: the driver and each executor mount it in caches of their own
/// (separate processes, separate directories), so the state partitions an
/// executor loads are the ones in the bucket.
#[test]
fn a_windowed_aggregate_and_a_join_on_the_cluster_keep_their_checkpoints_in_a_bucket() {
    use sluice::deps::sluice_connectors::s3_server::LocalS3;
    let (expected, joined) = windowed_expected();
    let s3 = LocalS3::start().unwrap();
    s3.create_bucket("ckpts").unwrap();
    let env: Vec<(&str, String)> = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    windowed_pipeline(dir);
    let (_scheduler, addr) = scheduler(&dir.join("scheduler.log"));
    let _one = executor_with(&addr, dir, 1, &env, &[]);
    let two = executor_with(&addr, dir, 2, &env, &[]);
    let in_bucket = ["--checkpoint", "s3://ckpts/run"];
    let mut crash_env = env.clone();
    crash_env.push(("SLUICE_CRASH_AT", "after-sink:3"));
    let crashed = run(dir, Some(&addr), &in_bucket, &crash_env);
    assert_eq!(crashed.status.code(), Some(86), "{}", stderr(&crashed));
    let mut first = in_bucket.to_vec();
    first.extend(["--max-batches", "5"]);
    let ok = run(dir, Some(&addr), &first, &env);
    assert!(ok.status.success(), "{}", stderr(&ok));
    // One executor is killed; the other loads the partitions it wrote from
    // the bucket.
    drop(two);
    let ok = run(dir, Some(&addr), &in_bucket, &env);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert_eq!(sink_rows(&dir.join("out")), expected);
    assert_eq!(sink_rows(&dir.join("joined")), joined);
    let keys: Vec<String> = s3
        .objects("ckpts", "run/")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for op in ["out/state/aggregate", "joined/state/join"] {
        assert!(
            keys.iter().any(|k| *k == format!("run/{op}/partitions"))
                && keys.iter().any(|k| k.starts_with(&format!("run/{op}/p0/"))),
            "{op}: {keys:?}"
        );
    }
    assert!(
        !dir.join("ckpt").exists(),
        "nothing of the checkpoint is local"
    );
}
