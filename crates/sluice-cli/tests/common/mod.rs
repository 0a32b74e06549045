//! What the CLI's tests share. Each test binary uses part of it.
#![allow(dead_code)]

use std::fs;
use std::path::Path;
use std::process::Output;

/// A small deterministic generator (xorshift64*), so a seed replays a run.
pub struct Rng(pub u64);

impl Rng {
    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Runs a pipeline again and again, each attempt killed at a random I/O step
/// below `range` (`run(step)` runs it with `SLUICE_IO_FAULT=crash:<step>`),
/// until an attempt finishes; returns how many were killed. `ctx` (seed and
/// run) heads every failure message. At most 40 attempts.
pub fn kill_until_done(
    rng: &mut Rng,
    range: u64,
    ctx: &str,
    mut run: impl FnMut(u64) -> Output,
) -> u64 {
    let mut kills = 0;
    for attempt in 0..40 {
        let at = 1 + rng.below(range);
        let out = run(at);
        match out.status.code() {
            Some(86) => kills += 1,
            Some(0) => return kills,
            other => panic!(
                "{ctx}, attempt {attempt}, kill at step {at}: exit {other:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
    panic!("{ctx}: never finished in 40 attempts");
}

/// The rows of every visible file in a file sink's directory and its
/// subdirectories (late rows go to one per query), sorted; none if it does
/// not exist.
pub fn sink_rows(dir: &Path) -> Vec<String> {
    let mut rows = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return rows;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('_') || name.starts_with('.') {
            continue;
        }
        if e.path().is_dir() {
            rows.extend(sink_rows(&e.path()));
        } else {
            rows.extend(
                fs::read_to_string(e.path())
                    .unwrap()
                    .lines()
                    .map(str::to_string),
            );
        }
    }
    rows.sort();
    rows
}
