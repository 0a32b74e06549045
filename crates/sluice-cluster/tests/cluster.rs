//! Micro-batches on a Ballista cluster started in this process on
//! 127.0.0.1: a scheduler and two executors, each on free ports. The same
//! query runs once in one process and once on the cluster, over the same
//! files in the same micro-batches; the outputs must be equal.

use std::path::Path;
use std::sync::Arc;

use sluice::prelude::*;
use sluice::{Outcome, PlanRunner};
use sluice_cluster::{ClusterRunner, Scheduler};

/// A scheduler and `executors` executors on 127.0.0.1.
async fn cluster(executors: usize, work: &Path) -> Scheduler {
    sluice_cluster::start_local(executors, 2, work)
        .await
        .expect("the cluster starts")
}

/// 20 files of clicks, one per micro-batch, and a CSV of users.
fn write_inputs(dir: &Path) {
    let clicks = dir.join("clicks");
    std::fs::create_dir_all(&clicks).unwrap();
    for f in 0..20 {
        let mut text = String::new();
        for r in 0..25 {
            let n = f * 25 + r;
            text.push_str(&format!(
                "{{\"user_id\": {}, \"url\": \"/p/{}\", \"ms_on_page\": {}, \"ts\": \"2026-01-01T00:{:02}:{:02}\"}}\n",
                n % 7,
                n % 11,
                (n * 137) % 3000,
                f,
                r
            ));
        }
        std::fs::write(clicks.join(format!("{f:03}.json")), text).unwrap();
    }
    // Impressions of ads, one file per batch beside each file of clicks.
    let shown = dir.join("shown");
    std::fs::create_dir_all(&shown).unwrap();
    for f in 0..20 {
        let mut text = String::new();
        for r in 0..10 {
            let n = f * 10 + r;
            text.push_str(&format!(
                "{{\"user_id\": {}, \"ad\": \"ad{}\", \"ts\": \"2026-01-01T00:{:02}:{:02}\"}}\n",
                n % 9,
                n % 4,
                f,
                (r * 6 + 3) % 60
            ));
        }
        std::fs::write(shown.join(format!("{f:03}.json")), text).unwrap();
    }
    let mut users = String::from("user_id,name\n");
    for u in 0..5 {
        users.push_str(&format!("{u},user{u}\n"));
    }
    std::fs::write(dir.join("users.csv"), users).unwrap();
}

fn script(dir: &Path, query: &str, mode: &str) -> String {
    format!(
        "CREATE SOURCE clicks (user_id BIGINT, url VARCHAR, ms_on_page BIGINT, ts TIMESTAMP, \
           WATERMARK FOR ts AS ts - INTERVAL '10' SECOND) \
         WITH (connector = 'file', path = '{}', format = 'json', max_files_per_trigger = 1);
         CREATE SOURCE shown (user_id BIGINT, ad VARCHAR, ts TIMESTAMP, \
           WATERMARK FOR ts AS ts - INTERVAL '10' SECOND) \
         WITH (connector = 'file', path = '{}', format = 'json', max_files_per_trigger = 1);
         CREATE EXTERNAL TABLE users STORED AS CSV LOCATION '{}' OPTIONS ('format.has_header' 'true');
         CREATE SINK out WITH (connector = 'memory', output_mode = '{mode}') AS {query};",
        dir.join("clicks").display(),
        dir.join("shown").display(),
        dir.join("users.csv").display()
    )
}

/// Runs `query` over the inputs in `dir` until every file is read, on
/// `runner` or (without one) in this process; returns its rows, sorted,
/// as text, and the number of batches.
async fn run(
    dir: &Path,
    query: &str,
    runner: Option<Arc<dyn PlanRunner>>,
    name: &str,
) -> sluice::Result<(String, u64)> {
    run_mode(dir, query, runner, name, "append").await
}

/// [`run`] with the sink in output mode `mode`.
async fn run_mode(
    dir: &Path,
    query: &str,
    runner: Option<Arc<dyn PlanRunner>>,
    name: &str,
    mode: &str,
) -> sluice::Result<(String, u64)> {
    run_script(dir, &script(dir, query, mode), runner, name).await
}

/// [`run`] of the query of `sql`, a whole script whose sink is `out`, a
/// memory sink.
async fn run_script(
    dir: &Path,
    sql: &str,
    runner: Option<Arc<dyn PlanRunner>>,
    name: &str,
) -> sluice::Result<(String, u64)> {
    let ctx = StreamContext::new();
    let mut pending = None;
    for outcome in ctx.sql(sql).await? {
        if let Outcome::Query(q) = outcome {
            pending = Some(q);
        }
    }
    let pending = pending.expect("the script defines a query");
    let checkpoint = dir.join(format!("checkpoint-{name}"));
    let q = pending
        .map_writer(|w| {
            let w = w.trigger(Trigger::AvailableNow).checkpoint(checkpoint);
            match runner {
                Some(r) => w.runner(r),
                None => w,
            }
        })
        .start()
        .await?;
    q.await_termination().await?;
    let batches = q.last_progress().map(|p| p.batch_id + 1).unwrap_or(0);
    let rows = ctx
        .session()
        .sql("SELECT * FROM out")
        .await
        .map_err(sluice::Error::from)?
        .collect()
        .await
        .map_err(sluice::Error::from)?;
    // Sorted by every column: rows equal in the first three can come in
    // either order.
    let text = datafusion::arrow::util::pretty::pretty_format_batches(&rows)
        .unwrap()
        .to_string();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    Ok((lines.join("\n"), batches))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stateless_join_runs_on_the_cluster_as_in_one_process() {
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    let scheduler = cluster(2, &dir.path().join("work")).await;
    let runner: Arc<dyn PlanRunner> = Arc::new(ClusterRunner::new(&scheduler.addr().to_string()));
    // A stream joined with a static table, filtered and projected: the
    // static table's scan is read by the executors.
    let query = "SELECT c.ts, c.user_id, u.name, c.url, c.ms_on_page * 2 AS doubled \
                 FROM clicks c LEFT JOIN users u ON c.user_id = u.user_id \
                 WHERE c.ms_on_page >= 1000";
    let (local, local_batches) = run(dir.path(), query, None, "local").await.unwrap();
    let (remote, remote_batches) = run(dir.path(), query, Some(runner), "cluster")
        .await
        .unwrap();
    assert_eq!(local_batches, 20);
    assert_eq!(remote_batches, 20);
    assert!(local.lines().count() > 100, "{local}");
    assert_eq!(local, remote);
    // The executors ran the batches' jobs: their work directories hold the
    // jobs' result files (kept for a while after each job).
    let mut jobs = 0;
    for e in std::fs::read_dir(dir.path().join("work")).unwrap() {
        jobs += std::fs::read_dir(e.unwrap().path()).unwrap().count();
    }
    assert!(jobs > 0, "no job ran on the executors");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aggregates_run_on_the_cluster_with_their_state_in_partitions() {
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    let scheduler = cluster(2, &dir.path().join("work")).await;
    let runner = |n: usize| -> Arc<dyn PlanRunner> {
        Arc::new(ClusterRunner::new(&scheduler.addr().to_string()).with_state_partitions(n))
    };
    // A windowed aggregate in append mode: each minute's window is emitted
    // once the watermark (10 s behind) passes it, one batch later.
    let windowed = "SELECT window_start, window_end, user_id, count(*) AS n, sum(ms_on_page) AS total \
                    FROM TUMBLE(clicks, ts, INTERVAL '1' MINUTE) \
                    GROUP BY window_start, window_end, user_id";
    let (local, _) = run(dir.path(), windowed, None, "w-local").await.unwrap();
    let (remote, batches) = run(dir.path(), windowed, Some(runner(3)), "w-cluster")
        .await
        .unwrap();
    assert_eq!(batches, 20);
    // 19 closed minutes of 7 users (the last minute is still open).
    assert_eq!(local.lines().count(), 19 * 7 + 4, "{local}");
    assert_eq!(local, remote);
    let state = dir.path().join("checkpoint-w-cluster/state/aggregate");
    for k in 0..3 {
        assert!(
            state.join(format!("p{k}/19.delta")).exists(),
            "partition {k}"
        );
    }
    assert!(!state.join("p3").exists());

    // A global aggregate (one partition) and a keyed one without a window,
    // whose state is never evicted.
    for (name, query) in [
        (
            "g",
            "SELECT count(*) AS n, max(ms_on_page) AS m, min(url) AS u FROM clicks",
        ),
        (
            "k",
            "SELECT url, count(*) AS n, avg(ms_on_page) AS a FROM clicks GROUP BY url",
        ),
    ] {
        let (local, _) = run_mode(dir.path(), query, None, &format!("{name}-local"), "update")
            .await
            .unwrap();
        let (remote, _) = run_mode(
            dir.path(),
            query,
            Some(runner(4)),
            &format!("{name}-cluster"),
            "update",
        )
        .await
        .unwrap();
        assert_eq!(local, remote, "{name}");
    }

    // The record of the windowed aggregate's partitions says where 32
    // probe keys of its key types go. A build that hashes keys
    // differently (here: a record whose probes went elsewhere) is refused
    // before its first batch, naming the file; a record without probes
    // (an older checkpoint) is given this build's.
    use sluice::deps::sluice_common::durable::{Durability, read_json, write_json};
    let record_path = state.join("partitions");
    let record: serde_json::Value = read_json(&record_path).unwrap();
    assert_eq!(record["partitions"], 3);
    let check: Vec<u64> = serde_json::from_value(record["hash_check"].clone()).unwrap();
    assert_eq!(check.len(), 32, "{record}");
    assert!(check.iter().all(|p| *p < 3) && check.iter().any(|p| *p != check[0]));
    let moved: Vec<u64> = check.iter().map(|p| (p + 1) % 3).collect();
    write_json(
        &record_path,
        &serde_json::json!({"partitions": 3, "hash_check": moved}),
        Durability::Fsync,
    )
    .unwrap();
    // One more file, so that a batch runs.
    std::fs::copy(
        dir.path().join("clicks/019.json"),
        dir.path().join("clicks/020.json"),
    )
    .unwrap();
    let err = run(dir.path(), windowed, Some(runner(3)), "w-cluster")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("computes differently"), "{err}");
    assert!(err.contains("partitions"), "{err}");
    write_json(
        &record_path,
        &serde_json::json!({"partitions": 3}),
        Durability::Fsync,
    )
    .unwrap();
    let (_, batches) = run(dir.path(), windowed, Some(runner(3)), "w-cluster")
        .await
        .unwrap();
    assert_eq!(batches, 21);
    let record: serde_json::Value = read_json(&record_path).unwrap();
    let again: Vec<u64> = serde_json::from_value(record["hash_check"].clone()).unwrap();
    assert_eq!(again, check);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_sources_are_read_by_the_executors_with_the_same_watermarks() {
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    let scheduler = cluster(2, &dir.path().join("work")).await;
    let addr = scheduler.addr().to_string();
    // A windowed aggregate and a join: what they emit depends on the
    // watermark, which the driver computes from what the executors count.
    for (name, query) in [
        (
            "windowed",
            "SELECT window_start, window_end, user_id, count(*) AS n, sum(ms_on_page) AS total \
             FROM TUMBLE(clicks, ts, INTERVAL '1' MINUTE) \
             GROUP BY window_start, window_end, user_id",
        ),
        (
            "joined",
            "SELECT s.user_id, s.ad, s.ts AS shown, c.url \
             FROM shown s LEFT JOIN clicks c ON c.user_id = s.user_id \
             AND c.ts BETWEEN s.ts AND s.ts + INTERVAL '30' SECOND",
        ),
    ] {
        let executors = Arc::new(ClusterRunner::new(&addr));
        let driver = Arc::new(ClusterRunner::new(&addr).with_sources_read_by_driver());
        let (local, _) = run(dir.path(), query, None, &format!("{name}-local"))
            .await
            .unwrap();
        let (read_there, batches) = run(
            dir.path(),
            query,
            Some(Arc::clone(&executors) as Arc<dyn PlanRunner>),
            &format!("{name}-executors"),
        )
        .await
        .unwrap();
        let (read_here, _) = run(
            dir.path(),
            query,
            Some(Arc::clone(&driver) as Arc<dyn PlanRunner>),
            &format!("{name}-driver"),
        )
        .await
        .unwrap();
        assert_eq!(batches, 20, "{name}");
        assert!(local.lines().count() > 20, "{name}: {local}");
        assert_eq!(local, read_there, "{name}");
        assert_eq!(local, read_here, "{name}");
        // Every batch's files were read by the executors (one range per
        // source a batch), or none.
        let sources = if name == "joined" { 2 } else { 1 };
        assert_eq!(executors.ranges_read(), 20 * sources, "{name}");
        assert_eq!(driver.ranges_read(), 0, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joins_deduplication_top_n_sessions_and_chains_run_on_the_cluster_as_in_one_process() {
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    let scheduler = cluster(2, &dir.path().join("work")).await;
    let runner = || -> Arc<dyn PlanRunner> {
        Arc::new(ClusterRunner::new(&scheduler.addr().to_string()).with_state_partitions(3))
    };
    for (name, query, mode) in [
        // A click within 30 s after an impression for the same user.
        (
            "inner",
            "SELECT c.user_id, c.url, s.ad, c.ts AS clicked, s.ts AS shown \
             FROM clicks c JOIN shown s ON c.user_id = s.user_id \
             AND c.ts BETWEEN s.ts AND s.ts + INTERVAL '30' SECOND",
            "append",
        ),
        // Impressions never clicked within 30 s come out with NULLs once
        // the watermark rules a click out.
        (
            "outer",
            "SELECT s.user_id, s.ad, s.ts AS shown, c.url \
             FROM shown s LEFT JOIN clicks c ON c.user_id = s.user_id \
             AND c.ts BETWEEN s.ts AND s.ts + INTERVAL '30' SECOND",
            "append",
        ),
        // Impressions with no click at all (an anti join).
        (
            "anti",
            "SELECT s.user_id, s.ad, s.ts FROM shown s WHERE NOT EXISTS \
             (SELECT 1 FROM clicks c WHERE c.user_id = s.user_id \
              AND c.ts BETWEEN s.ts AND s.ts + INTERVAL '30' SECOND)",
            "append",
        ),
        // Deduplication, forgotten by the watermark, and kept for ever.
        (
            "distinct-time",
            "SELECT DISTINCT user_id, ts FROM clicks",
            "append",
        ),
        (
            "distinct",
            "SELECT DISTINCT user_id, url FROM clicks",
            "append",
        ),
        // Each user's first click (keep-first top-N).
        (
            "first",
            "SELECT user_id, url, ts FROM (SELECT *, ROW_NUMBER() OVER \
             (PARTITION BY user_id ORDER BY ts) AS rn FROM clicks) WHERE rn = 1",
            "append",
        ),
        // A chain: the two busiest users of each minute, a top-N per window
        // over a windowed aggregate.
        (
            "busiest",
            "SELECT window_start, user_id, n FROM (SELECT *, ROW_NUMBER() OVER \
             (PARTITION BY window_start, window_end ORDER BY n DESC, user_id) AS rn \
             FROM (SELECT window_start, window_end, user_id, count(*) AS n \
                   FROM TUMBLE(clicks, ts, INTERVAL '1' MINUTE) \
                   GROUP BY window_start, window_end, user_id)) WHERE rn <= 2",
            "append",
        ),
        // Session windows, partitioned by their other keys: a user's
        // sessions meet in one partition.
        (
            "sessions",
            "SELECT user_id, window_start, window_end, count(*) AS n \
             FROM SESSION(clicks, ts, INTERVAL '30' SECOND) \
             GROUP BY user_id, window_start, window_end",
            "append",
        ),
    ] {
        let (local, batches) = run_mode(dir.path(), query, None, &format!("{name}-local"), mode)
            .await
            .unwrap();
        let (remote, remote_batches) = run_mode(
            dir.path(),
            query,
            Some(runner()),
            &format!("{name}-cluster"),
            mode,
        )
        .await
        .unwrap();
        assert_eq!(batches, 20, "{name}");
        assert_eq!(remote_batches, 20, "{name}");
        assert!(local.lines().count() > 10, "{name}: {local}");
        assert_eq!(local, remote, "{name}");
        let op = match name {
            "distinct" | "distinct-time" => "dedup",
            "first" | "busiest" => "topn",
            "sessions" => "aggregate",
            _ => "join",
        };
        let state = dir
            .path()
            .join(format!("checkpoint-{name}-cluster/state/{op}"));
        for k in 0..3 {
            assert!(
                state.join(format!("p{k}/19.delta")).exists(),
                "{name}: partition {k}"
            );
        }
    }
}

/// Queries whose answer depends on the order rows arrive in (ties of a
/// keep-first top-N, `first_value` without `ORDER BY`) read a batch's
/// files in order on the cluster as in one process: each batch reads four
/// files, four parts, whose rows tie.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn order_sensitive_queries_read_each_batch_in_order_on_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let ties = dir.path().join("ties");
    std::fs::create_dir_all(&ties).unwrap();
    // File f is read in batch f / 4; the four files of a batch hold the
    // same users at the same times, each with its own url.
    for f in 0..20 {
        let text: String = (0..5)
            .map(|u| {
                format!(
                    "{{\"user_id\": {u}, \"url\": \"/f{f}\", \"ts\": \"2026-01-01T00:{:02}:{:02}\"}}\n",
                    f / 4,
                    u * 3
                )
            })
            .collect();
        std::fs::write(ties.join(format!("{f:03}.json")), text).unwrap();
    }
    let scheduler = cluster(2, &dir.path().join("work")).await;
    let runner = || -> Arc<dyn PlanRunner> {
        Arc::new(ClusterRunner::new(&scheduler.addr().to_string()).with_state_partitions(3))
    };
    for (name, query) in [
        (
            "first",
            "SELECT user_id, url, ts FROM (SELECT *, ROW_NUMBER() OVER \
             (PARTITION BY user_id ORDER BY ts) AS rn FROM ties) WHERE rn = 1",
        ),
        (
            "first-value",
            "SELECT window_start, user_id, first_value(url) AS url, count(*) AS n \
             FROM TUMBLE(ties, ts, INTERVAL '1' MINUTE) \
             GROUP BY window_start, window_end, user_id",
        ),
    ] {
        let sql = format!(
            "CREATE SOURCE ties (user_id BIGINT, url VARCHAR, ts TIMESTAMP, \
               WATERMARK FOR ts AS ts - INTERVAL '10' SECOND) \
             WITH (connector = 'file', path = '{}', format = 'json', max_files_per_trigger = 4);
             CREATE SINK out WITH (connector = 'memory', output_mode = 'append') AS {query};",
            ties.display()
        );
        let (local, batches) = run_script(dir.path(), &sql, None, &format!("{name}-local"))
            .await
            .unwrap();
        assert_eq!(batches, 5, "{name}");
        // The first file of a batch wins every tie.
        assert!(
            local.contains("/f0 ") || local.contains("/f0|"),
            "{name}: {local}"
        );
        assert!(
            !local.contains("/f1 ") && !local.contains("/f1|"),
            "{name}: {local}"
        );
        for attempt in 0..3 {
            let (remote, _) = run_script(
                dir.path(),
                &sql,
                Some(runner()),
                &format!("{name}-cluster-{attempt}"),
            )
            .await
            .unwrap();
            assert_eq!(local, remote, "{name}, cluster run {attempt}");
        }
    }
}

/// A task that fails for a passing reason fails its batch with a transient
/// error (Ballista retried the task, the query retried the batch), and the
/// query goes on once the cause is gone; a damaged state partition stops
/// the query with an error that is not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_passing_task_failure_is_retried_and_a_damaged_partition_stops_the_query() {
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    let scheduler = cluster(2, &dir.path().join("work")).await;
    let runner = || -> Arc<dyn PlanRunner> {
        Arc::new(ClusterRunner::new(&scheduler.addr().to_string()).with_state_partitions(3))
    };
    let windowed = "SELECT window_start, window_end, user_id, count(*) AS n \
                    FROM TUMBLE(clicks, ts, INTERVAL '1' MINUTE) \
                    GROUP BY window_start, window_end, user_id";
    let (local, _) = run(dir.path(), windowed, None, "local").await.unwrap();
    // Partition 1's directory cannot be made: a file is in its place, and
    // every attempt of its task fails with an I/O error.
    let state = dir.path().join("checkpoint-cluster/state/aggregate");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("p1"), "in the way").unwrap();
    let err = run(dir.path(), windowed, Some(runner()), "cluster")
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("batch 0's job"), "{err}");
    std::fs::remove_file(state.join("p1")).unwrap();
    let (remote, batches) = run(dir.path(), windowed, Some(runner()), "cluster")
        .await
        .unwrap();
    assert_eq!(batches, 20);
    assert_eq!(local, remote);

    // Partition 0's last version damaged (its delta and the snapshot
    // written beside it), and one more file to read.
    let mut damaged = 0;
    for name in ["19.delta", "19.snapshot"] {
        if state.join("p0").join(name).exists() {
            std::fs::write(state.join("p0").join(name), "not a state file").unwrap();
            damaged += 1;
        }
    }
    assert!(damaged > 0);
    std::fs::copy(
        dir.path().join("clicks/019.json"),
        dir.path().join("clicks/020.json"),
    )
    .unwrap();
    let err = run(dir.path(), windowed, Some(runner()), "cluster")
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("p0/19."), "{err}");
}
