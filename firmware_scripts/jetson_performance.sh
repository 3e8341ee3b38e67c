#!/usr/bin/env bash
# Set the Jetson power mode (nvpmodel) and pin clocks (jetson_clocks) for the lowest and
# steadiest inference latency.
#
# Trade-off: mode 0 (MAXN) with pinned clocks draws the most power and heat even when idle
# (clocks no longer scale down between images). A fixed X-ray room on mains power should
# use it. A screening van on battery, or a box in a hot closed cabinet, may prefer a lower
# mode (--mode N, see `nvpmodel -p --verbose` or /etc/nvpmodel.conf for this module's
# modes) and --no-clocks: latency goes up (measure with benchmarks/), power and heat down.
# The nvpmodel mode persists across reboots; jetson_clocks does not (edge-performance.service
# re-applies it at boot with --clocks-only).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: jetson_performance.sh [--mode N] [--no-clocks | --clocks-only] [--dry-run]

  --mode N        nvpmodel power mode (default 0 = MAXN, highest clocks and power)
  --no-clocks     set the mode only; let clocks scale with load (saves power)
  --clocks-only   only run jetson_clocks (used at boot by edge-performance.service)
  --dry-run       print what would be done
Skips (exit 0) with a message when nvpmodel or jetson_clocks is not installed.
EOF
}

MODE=0
DRY_RUN=0
DO_MODE=1
DO_CLOCKS=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --mode)
            [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || { echo "error: --mode needs a mode number" >&2; exit 1; }
            MODE="$2"; shift 2 ;;
        --no-clocks) DO_CLOCKS=0; shift ;;
        --clocks-only) DO_MODE=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; echo "error: unknown option: $1" >&2; exit 1 ;;
    esac
done

if [[ "$DRY_RUN" != 1 && "$(id -u)" != 0 ]]; then
    echo "error: run as root (sudo), or use --dry-run" >&2
    exit 1
fi

# The current mode number: `nvpmodel -q` prints "NV Power Mode: MAXN" then the number.
current_mode() {
    nvpmodel -q 2>/dev/null | awk '/^[0-9]+$/ { mode = $1 } END { print mode }'
}

set_mode() {
    if ! command -v nvpmodel >/dev/null 2>&1; then
        echo "skip: nvpmodel not found (not a Jetson?); power mode unchanged"
        return 0
    fi
    local now
    now="$(current_mode)"
    if [[ "$now" == "$MODE" ]]; then
        echo "ok: power mode $MODE already set"
        return 0
    fi
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "would: set power mode ${now:-?} -> $MODE (nvpmodel -m $MODE)"
        return 0
    fi
    # Some mode changes ask "reboot now? YES/NO": answer NO, and say a reboot is needed.
    local out
    if ! out="$(printf 'NO\n' | nvpmodel -m "$MODE" 2>&1)"; then
        printf '%s\n' "$out" >&2
        echo "error: nvpmodel -m $MODE failed; list this module's modes with: nvpmodel -p --verbose" >&2
        return 1
    fi
    if grep -qi reboot <<<"$out"; then
        echo "warning: power mode $MODE takes effect after a reboot (reboot when no study is in progress)" >&2
    fi
    echo "done: set power mode $MODE"
}

pin_clocks() {
    if ! command -v jetson_clocks >/dev/null 2>&1; then
        echo "skip: jetson_clocks not found (not a Jetson?); clocks unchanged"
        return 0
    fi
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "would: pin CPU/GPU/EMC clocks to the mode's maximum (jetson_clocks)"
        return 0
    fi
    jetson_clocks
    echo "done: pinned clocks to the maximum of the current power mode (jetson_clocks)"
}

if [[ "$DO_MODE" == 1 ]]; then
    set_mode
fi
if [[ "$DO_CLOCKS" == 1 ]]; then
    pin_clocks
else
    echo "skip: clocks left to scale with load (--no-clocks)"
fi
