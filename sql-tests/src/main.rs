//! Runs every `.slt` file under `sql-tests/slt/` (or those whose path
//! contains one of the arguments), each in a fresh database and temporary
//! directory, and prints `N passed, N failed`.
//!
//! Every file also runs as a *restart variant* (a `RESTART`, a fresh context
//! recovering every query from its checkpoint as after a crash, after each
//! `RUN ALL` / `RUN BATCH`) and a *random-splits variant* (input split into
//! random smaller micro-batches, seeded from the file name or `SLT_SEED`; the
//! seed is printed), and every run ends by checking each sink against the
//! same query run as one batch query (see the library's docs). Files marked
//! `# variant: cluster` also run on a Ballista cluster started here, once,
//! on first use (a scheduler and two executors on 127.0.0.1).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::sync::Arc;

use sluice::PlanRunner;
use sluice_cluster::{ClusterRunner, Scheduler};
use sluice_sql_tests::{SluiceDb, Variant, transform, variants};

/// Starts a scheduler and two executors on 127.0.0.1, working in `work`,
/// and returns the scheduler (it serves while it lives) and a runner for
/// it. The executors run until the process ends.
async fn start_cluster(work: &Path) -> Result<(Scheduler, Arc<dyn PlanRunner>), String> {
    let scheduler = sluice_cluster::start_local(2, 2, work)
        .await
        .map_err(|e| format!("starting a cluster: {e}"))?;
    let runner: Arc<dyn PlanRunner> = Arc::new(ClusterRunner::new(&scheduler.addr().to_string()));
    Ok((scheduler, runner))
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect(&p, out);
        } else if p.extension().is_some_and(|e| e == "slt") {
            out.push(p);
        }
    }
}

fn main() -> ExitCode {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("slt");
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut files = Vec::new();
    collect(&root, &mut files);
    files.retain(|f| {
        filters.is_empty()
            || filters
                .iter()
                .any(|x| f.to_string_lossy().contains(x.as_str()))
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let (mut passed, mut failed) = (0, 0);
    let cluster_dir = tempfile::tempdir().expect("a temporary directory");
    let mut cluster: Option<(Scheduler, Arc<dyn PlanRunner>)> = None;
    for file in &files {
        let shown = file
            .strip_prefix(&root)
            .unwrap_or(file)
            .display()
            .to_string();
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                println!("FAILED {shown}: cannot read it: {e}");
                failed += 1;
                continue;
            }
        };
        for variant in variants(&shown, &text) {
            let runner = match variant {
                Variant::Cluster => match &cluster {
                    Some((_, r)) => Some(Arc::clone(r)),
                    None => match runtime.block_on(start_cluster(cluster_dir.path())) {
                        Ok((scheduler, r)) => {
                            cluster = Some((scheduler, Arc::clone(&r)));
                            Some(r)
                        }
                        Err(e) => {
                            println!("FAILED {shown}{variant}: {e}");
                            failed += 1;
                            continue;
                        }
                    },
                },
                _ => None,
            };
            let outcome = runtime.block_on(async {
                let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
                let script = dir.path().join("test.slt");
                std::fs::write(&script, transform(&text, variant)?).map_err(|e| e.to_string())?;
                let path = dir.path().to_path_buf();
                let mut runner = sqllogictest::Runner::new(move || {
                    let path = path.clone();
                    let db = match &runner {
                        Some(r) => SluiceDb::with_runner(&path, Arc::clone(r)),
                        None => SluiceDb::new(&path),
                    };
                    async move { Ok::<_, sluice_sql_tests::TestError>(db) }
                });
                runner
                    .run_file_async(&script)
                    .await
                    .map_err(|e| e.display(true).to_string())
            });
            match outcome {
                Ok(()) => {
                    println!("ok     {shown}{variant}");
                    passed += 1;
                }
                Err(e) => {
                    println!("FAILED {shown}{variant}\n{e}\n");
                    failed += 1;
                }
            }
        }
    }
    println!("slt: {passed} passed, {failed} failed");
    if failed > 0 || files.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
