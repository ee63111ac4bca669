#!/usr/bin/env bash
# Benchmark every variant and precision of an rsedge bundle on this Jetson (or any CUDA machine).
#
#   benchmarks/bench_device.sh BUNDLE [--nvpmodel MODE] [--jetson-clocks] [--batch 1,8]
#                              [--out DIR | --commit-results] [--] [more rsedge-bench options]
#
# BUNDLE is a bundle folder or the BUNDLE.tar.gz `rsedge bundle --tar` writes. The script
# verifies it, builds the engines this device lacks (FP32, FP16, INT8 where the GPU has fast
# INT8), benchmarks and evaluates each one, and writes <host>-<date>.{json,md}.
#
# options:
#   --nvpmodel MODE    switch to this power mode first (sudo nvpmodel -m MODE); restored on exit
#   --jetson-clocks    lock the clocks at their maximum first (sudo jetson_clocks); restored on exit
#   --batch LIST       batch sizes to time, comma-separated (default: 1,8)
#   --out DIR          folder for the results (default: benchmarks/work/results/, git-ignored)
#   --commit-results   write into benchmarks/results/, the committed results, instead
#   -h, --help         print this help
#   -- ...             everything after -- goes to rsedge-bench (see rsedge-bench --help)
#
# Power mode and clocks are restored even after an error or Ctrl-C. See runtime/README.md
# ("Benchmarking on the device") for the exact commands per JetPack.
set -euo pipefail

usage() {
    # the comment block above, without its '#'
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit "${1:-0}"
}

BUNDLE=""
MODE=""
CLOCKS=0
BATCH="1,8"
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT=""
COMMIT=0
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage 0 ;;
        --nvpmodel) MODE="$2"; shift 2 ;;
        --jetson-clocks) CLOCKS=1; shift ;;
        --batch) BATCH="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --commit-results) COMMIT=1; shift ;;
        --) shift; EXTRA+=("$@"); break ;;
        -*) echo "unknown option $1 (put rsedge-bench options after --)" >&2; usage 2 ;;
        *) if [ -z "$BUNDLE" ]; then BUNDLE="$1"; shift; else echo "one bundle at a time" >&2; usage 2; fi ;;
    esac
done
[ -n "$BUNDLE" ] || usage 2
case "$BUNDLE" in
    *.tar.gz|*.tgz|*.tar) [ -f "$BUNDLE" ] || { echo "error: $BUNDLE does not exist" >&2; exit 2; } ;;
    *) [ -f "$BUNDLE/manifest.json" ] || { echo "error: $BUNDLE has no manifest.json: not an rsedge bundle" >&2; exit 2; } ;;
esac
if [ -n "$OUT" ] && [ "$COMMIT" -eq 1 ]; then
    echo "error: give --out DIR or --commit-results, not both" >&2
    exit 2
fi
if [ -z "$OUT" ]; then
    if [ "$COMMIT" -eq 1 ]; then OUT="$HERE/results"; else OUT="$HERE/work/results"; fi
fi

if command -v rsedge-bench >/dev/null 2>&1; then
    BENCH=(rsedge-bench)
else
    BENCH=(python3 -m rsedge.runtime)
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

OLD_MODE=""
CLOCK_STORE=""
restore() {
    status=$?
    if [ -n "$CLOCK_STORE" ]; then
        echo "restoring clocks" >&2
        $SUDO jetson_clocks --restore "$CLOCK_STORE" || echo "warning: could not restore clocks" >&2
        rm -f "$CLOCK_STORE"
    fi
    if [ -n "$OLD_MODE" ]; then
        echo "restoring nvpmodel mode $OLD_MODE" >&2
        $SUDO nvpmodel -m "$OLD_MODE" </dev/null || echo "warning: could not restore nvpmodel mode $OLD_MODE" >&2
    fi
    exit "$status"
}
trap restore EXIT
trap 'exit 130' INT TERM

if [ -n "$MODE" ]; then
    command -v nvpmodel >/dev/null || { echo "error: --nvpmodel needs nvpmodel (a Jetson)" >&2; exit 2; }
    # `nvpmodel -q` prints "NV Power Mode: <name>" and then the mode id on its own line.
    OLD_MODE="$(nvpmodel -q 2>/dev/null | awk '/^[0-9]+$/ {id=$1} END {print id}')"
    echo "nvpmodel: $OLD_MODE -> $MODE" >&2
    # Some mode changes on Orin ask for a reboot; answering from /dev/null declines it.
    $SUDO nvpmodel -m "$MODE" </dev/null
fi
if [ "$CLOCKS" -eq 1 ]; then
    command -v jetson_clocks >/dev/null || { echo "error: --jetson-clocks needs jetson_clocks (a Jetson)" >&2; exit 2; }
    CLOCK_STORE="$(mktemp /tmp/rsedge-clocks.XXXXXX)"
    $SUDO jetson_clocks --store "$CLOCK_STORE"
    $SUDO jetson_clocks
    sleep 2  # let the clocks settle before the first warm-up
fi

mkdir -p "$OUT"
STEM="$OUT/$(hostname)-$(date -u +%Y%m%dT%H%M%SZ)"
echo "running: ${BENCH[*]} $BUNDLE --eval --batch $BATCH ${EXTRA[*]:-}" >&2
"${BENCH[@]}" "$BUNDLE" --eval --batch "$BATCH" --json "$STEM.json" --md "$STEM.md" "${EXTRA[@]}"
echo "results: $STEM.json $STEM.md" >&2
