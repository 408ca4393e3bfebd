#!/usr/bin/env bash
# Coverage-guided fuzzing of every reader of outside bytes (cargo-fuzz + libFuzzer, nightly).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s, every target)
#
# Each target runs for SECONDS_PER_TARGET from its committed seeds (fuzz/seeds/<target>) and
# regressions (fuzz/regressions/<target>) plus the corpus earlier runs grew (fuzz/corpus/<target>,
# not committed), in libFuzzer's fork mode so that one crash does not end the run: crashing,
# timing-out and out-of-memory inputs land in fuzz/artifacts/<target>/. Prints a table: target,
# runs, seconds, crashes, timeouts, ooms. Exit status 1 if anything was found.
#
# A finding becomes a regression: fix the reader, then copy the input into
# fuzz/regressions/<target>/ so that CI's stable driver (fuzz-targets/tests/fuzz.rs) replays it.
#
# Environment: SANITIZER (address, the default; or none), FUZZ_TIMEOUT (s per input, 5),
# FUZZ_RSS_MB (2048), FUZZ_JOBS (parallel fork jobs, 1).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
SECS=${1:-60}
shift || true
SANITIZER=${SANITIZER:-address}
TIMEOUT=${FUZZ_TIMEOUT:-5}
RSS_MB=${FUZZ_RSS_MB:-2048}
JOBS=${FUZZ_JOBS:-1}

if ! cargo +nightly fuzz --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION"; then
    cargo +nightly install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

if [ $# -gt 0 ]; then
    TARGETS=("$@")
else
    mapfile -t TARGETS < <(cd fuzz && cargo +nightly fuzz list)
fi

# One build of every target first (release with debug assertions and overflow checks, as
# cargo-fuzz builds), so that the time a target gets is fuzzing time.
(cd fuzz && cargo +nightly fuzz build --sanitizer "$SANITIZER") >&2

found=0
rows=()
for t in "${TARGETS[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    dirs=("fuzz/corpus/$t")
    for d in "fuzz/seeds/$t" "fuzz/regressions/$t"; do
        [ -d "$d" ] && dirs+=("$d")
    done
    log="fuzz/artifacts/$t/fuzz.log"
    # A pickle value that contains itself (Rc cycles through the memo) is leaked by design, bounded
    # by the input's size (see worker/src/weights/pickle.rs): LeakSanitizer would stop at each.
    leaks=1
    case "$t" in pickle | torch_checkpoint) leaks=0 ;; esac
    before=$(find "fuzz/artifacts/$t" -type f ! -name fuzz.log | wc -l)
    start=$(date +%s)
    echo "== $t: ${SECS}s" >&2
    (cd fuzz && cargo +nightly fuzz run --sanitizer "$SANITIZER" "$t" "${dirs[@]/#/../}" -- \
        -max_total_time="$SECS" -timeout="$TIMEOUT" -rss_limit_mb="$RSS_MB" -max_len=262144 \
        -fork="$JOBS" -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
        -detect_leaks="$leaks" -artifact_prefix="artifacts/$t/" -print_final_stats=1) >"$log" 2>&1 || true
    secs=$(( $(date +%s) - start ))
    # Fork mode leaves an empty crash-<sha1 of nothing> when the time limit kills its last job:
    # not a finding.
    find "fuzz/artifacts/$t" -type f -empty -name 'crash-*' -delete
    # Fork mode's status lines: "#RUNS: cov: .. oom/timeout/crash: O/T/C time: ..".
    last=$(grep -aE '^#[0-9]+' "$log" | tail -1 || true)
    runs=$(sed -nE 's/^#([0-9]+).*/\1/p' <<<"$last")
    otc=$(sed -nE 's#.*oom/timeout/crash: ([0-9]+)/([0-9]+)/([0-9]+).*#\1 \2 \3#p' <<<"$last")
    read -r ooms timeouts crashes <<<"${otc:-0 0 0}"
    after=$(find "fuzz/artifacts/$t" -type f ! -name fuzz.log | wc -l)
    if [ -z "$runs" ]; then
        runs="?"
        crashes="build/start failed: see $log"
        found=1
    fi
    [ $((ooms + timeouts + ${crashes//[^0-9]/0})) -gt 0 ] 2>/dev/null && found=1
    [ "$after" -gt "$before" ] && found=1
    rows+=("$(printf '%-18s %12s %8s %8s %9s %6s  %s' "$t" "$runs" "$secs" "$crashes" "$timeouts" "$ooms" "$((after - before)) new in fuzz/artifacts/$t")")
done

printf '\n%-18s %12s %8s %8s %9s %6s  %s\n' target runs seconds crashes timeouts ooms artifacts
printf '%s\n' "${rows[@]}"
exit "$found"
