#!/usr/bin/env bash
# Bounded fuzzing of every target, from the checked-in corpus:
#   fuzz/run.sh [seconds per target]   (default 30)
# Every checked-in input is replayed first. The fuzzing after it is seeded:
# SLUICE_FUZZ_SEED (default 1) fixes libFuzzer's mutations, so the test
# command explores the same inputs on every run and cannot turn red on a
# finding that depends on luck; SLUICE_FUZZ_SEED=random explores anew (run it
# for minutes, then add what it finds to the corpus with a test).
# Uses the stable toolchain (RUSTC_BOOTSTRAP for cargo-fuzz's flags), no
# sanitizer (-s none: Sluice has no unsafe code of its own; the target is
# panics), and a debug build so it shares most of its compile with nothing
# else. New inputs go to fuzz/work/<target> (not checked in); a crash is saved
# under fuzz/artifacts/<target> and fails the run.
set -euo pipefail
secs="${1:-30}"
cd "$(dirname "$0")"
target_dir="${SLUICE_FUZZ_TARGET_DIR:-$HOME/.cache/sluice/fuzz-target}"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --version 0.13.2 --locked
fi
export RUSTC_BOOTSTRAP=1
seed="${SLUICE_FUZZ_SEED:-1}"
seed_flag=()
if [ "$seed" != random ]; then
    seed_flag=(-seed="$seed")
fi
for t in sql_front_end decoders checkpoint_readers; do
    mkdir -p "work/$t"
    echo "fuzz: $t for ${secs}s, seed $seed (corpus: $(ls "corpus/$t" | wc -l) files)"
    log="work/$t.log"
    status=0
    cargo fuzz run --dev -s none --target-dir "$target_dir" "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=30 -rss_limit_mb=4096 -max_len=8192 -print_final_stats=1 "${seed_flag[@]}" \
        >"$log" 2>&1 || status=$?
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE)' "$log" || true
    if [ "$status" -ne 0 ]; then
        tail -n 40 "$log" >&2
        echo "fuzz: $t FAILED (exit $status); the input is in fuzz/artifacts/$t" >&2
        exit 1
    fi
done
