//! What the CLI's kill tests share.

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
