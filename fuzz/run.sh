#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 60), at most PARALLEL (default 2) at once, niced and
# single-job so other work on the machine keeps its CPU. New inputs that add coverage are merged
# into the committed corpus (fuzz/corpus/<target>); crashes land in fuzz/artifacts/<target>/.
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
#   fuzz/run.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
shift || true
parallel="${PARALLEL:-2}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
cargo +nightly fuzz build -O
mkdir -p logs
run_one() {
    local t="$1" secs="$2"
    mkdir -p "corpus-new/$t" "corpus/$t" "artifacts/$t"
    local start=$SECONDS
    # -rss_limit_mb bounds a leak; -timeout flags a hang (10 s for one input).
    nice -n 19 cargo +nightly fuzz run -O "$t" "corpus-new/$t" "corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 \
        -max_len=8192 -print_final_stats=1 >"logs/$t.log" 2>&1 || echo "$t: FAILED (see fuzz/logs/$t.log)"
    local ran=$((SECONDS - start))
    # Keep only inputs that add coverage over the committed corpus.
    nice -n 19 cargo +nightly fuzz run -O "$t" "corpus/$t" "corpus-new/$t" -- -merge=1 \
        >>"logs/$t.log" 2>&1 || true
    local execs
    execs=$(grep -h 'stat::number_of_executed_units' "logs/$t.log" | tail -1 | awk '{print $2}')
    echo "$t: ${ran}s, ${execs:-?} execs, corpus $(ls "corpus/$t" | wc -l) files, artifacts $(ls "artifacts/$t" | wc -l)"
}
export -f run_one
printf '%s\n' "${targets[@]}" | xargs -P "$parallel" -I{} bash -c "run_one {} $secs"
