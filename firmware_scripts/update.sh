#!/usr/bin/env bash
# Update the edge appliance to a new release, beside the running one, with automatic
# rollback:
#   1. install /opt/edge/<new> (virtualenv + pip) while <old> keeps serving
#   2. the TensorRT engines for <new>, of the precision the service loads: `engines verify`
#      probes the cache (never builds); none yet -> build, then verify; on failure stop,
#      nothing switched
#   3. switch /opt/edge/current to <new> atomically (rename), keep /opt/edge/previous
#   4. restart edge.service and run the health check, with retries for --health-timeout s
#   5. unhealthy: switch current back to <old>, restart, check again; exit 1
# `update.sh --rollback` switches back to /opt/edge/previous by hand.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$SCRIPT_DIR/lib.sh"

usage() {
    cat <<EOF
Usage: update.sh [options]          install this source tree as the new release
       update.sh --rollback [options]  go back to the previous release

Options:
  --source DIR          new release's source tree (default: $(dirname "$SCRIPT_DIR"))
  --release NAME        install as /opt/edge/NAME (default: version in setup.cfg)
  --root DIR            act on DIR instead of / (tests, images); no restarts
  --dry-run             print every action without doing it
  --python PATH         base interpreter for the virtualenv (default: $DEFAULT_PYTHON)
  --extras LIST         pip extras (default: tensorrt, which pins $CUDA_PYTHON_PIN;
                        "" for none)
  --wheelhouse DIR      install offline from wheels in DIR
  --precision P         engine precision: fp16, fp32, int8 (default: the config's
                        [models] precision, else fp16); every build/verify uses it
  --calibration DIR     INT8 calibration tensors (.npy), needed with --precision int8
                        (default with int8 from the config: its calibration_dir)
  --health-timeout S    how long the new release has to become healthy (default 60)
  --health-cmd CMD      health check command (default: the new release's
                        healthcheck.sh --config /etc/edge/edge.toml)
  --no-pip              do not create a virtualenv or pip install (tests)
  --no-engines          do not build or verify engines
  --force               reinstall even when NAME is already the current release
  -h, --help            this help

Exit status: 0 updated (or nothing to do), 1 failed (the old release is running
again when a rollback was possible), 3 the rollback failed as well.
EOF
}

DEFAULT_PYTHON=python3
[[ -x /usr/bin/python3 ]] && DEFAULT_PYTHON=/usr/bin/python3
SOURCE="$(dirname "$SCRIPT_DIR")"
RELEASE=""
PYTHON="$DEFAULT_PYTHON"
EXTRAS="tensorrt"
WHEELHOUSE=""
PRECISION=""      # unset: the config's [models] precision, else fp16
CALIBRATION=""
HEALTH_TIMEOUT=60
HEALTH_CMD=""
ROLLBACK=0
FORCE=0
DO_PIP=1
DO_ENGINES=1

while [[ $# -gt 0 ]]; do
    case "$1" in
        --source) need_value "$@"; SOURCE="$2"; shift 2 ;;
        --release) need_value "$@"; RELEASE="$2"; shift 2 ;;
        --root) need_value "$@"; ROOT="${2%/}"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --python) need_value "$@"; PYTHON="$2"; shift 2 ;;
        --extras) [[ $# -ge 2 ]] || die "option --extras needs a value"; EXTRAS="$2"; shift 2 ;;
        --wheelhouse) need_value "$@"; WHEELHOUSE="$2"; shift 2 ;;
        --precision) need_value "$@"; PRECISION="$2"; shift 2 ;;
        --calibration) need_value "$@"; CALIBRATION="$2"; shift 2 ;;
        --health-timeout) need_value "$@"; HEALTH_TIMEOUT="$2"; shift 2 ;;
        --health-cmd) need_value "$@"; HEALTH_CMD="$2"; shift 2 ;;
        --rollback) ROLLBACK=1; shift ;;
        --force) FORCE=1; shift ;;
        --no-pip) DO_PIP=0; shift ;;
        --no-engines) DO_ENGINES=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

[[ "$HEALTH_TIMEOUT" =~ ^[0-9]+$ ]] || die "--health-timeout: '$HEALTH_TIMEOUT' is not a number of seconds"
if [[ -n "$ROOT" ]]; then
    [[ -d "$ROOT" ]] || die "--root: $ROOT does not exist"
    ROOT="$(cd "$ROOT" && pwd)"
fi
if [[ -z "$ROOT" && "$DRY_RUN" != 1 && "$(id -u)" != 0 ]]; then
    die "run as root (sudo $0 ...), or use --dry-run to see the plan"
fi

PREFIX="$ROOT$EDGE_PREFIX"
CONFIG_ON_BOX="$EDGE_ETC/edge.toml"
OLD="$(readlink "$PREFIX/current" 2>/dev/null || true)"
[[ -n "$OLD" ]] || die "no installation found ($PREFIX/current missing); run install.sh first"
PREVIOUS_BEFORE="$(readlink "$PREFIX/previous" 2>/dev/null || true)"

# restart_service: restart edge.service on the running system; not under --root.
restart_service() {
    if [[ -n "$ROOT" ]]; then
        skip "restart $EDGE_UNIT (--root)"
        return 0
    fi
    act "restart $EDGE_UNIT" systemctl restart "$EDGE_UNIT"
}

# install_unit RELEASE_DIR: the unit file shipped with a release, reloaded when it changed.
install_unit() {
    CHANGED=0
    ensure_file "$1/firmware_scripts/$EDGE_UNIT" "$ROOT/etc/systemd/system/$EDGE_UNIT" 0644
    if [[ "$CHANGED" == 1 && -z "$ROOT" ]]; then
        act "reload systemd units" systemctl daemon-reload
    fi
}

# wait_healthy RELEASE: run the health check until it passes or HEALTH_TIMEOUT runs out.
wait_healthy() {
    local release=$1 deadline=$((SECONDS + HEALTH_TIMEOUT)) cmd
    cmd="${HEALTH_CMD:-$PREFIX/$release/firmware_scripts/healthcheck.sh --config $ROOT$CONFIG_ON_BOX}"
    if [[ "$DRY_RUN" == 1 ]]; then
        printf 'would: run the health check until it passes, for up to %s s: %s\n' "$HEALTH_TIMEOUT" "$cmd"
        return 0
    fi
    while true; do
        if bash -c "$cmd" >/dev/null 2>&1; then
            ok "release $release healthy"
            return 0
        fi
        if (( SECONDS >= deadline )); then
            bash -c "$cmd" || true   # show which check failed
            return 1
        fi
        sleep 3
    done
}

# switch_to RELEASE PREVIOUS: current -> RELEASE, previous -> PREVIOUS (none: removed).
switch_to() {
    local release=$1 previous=$2
    [[ -d "$PREFIX/$release" || "$DRY_RUN" == 1 ]] || die "release $release not found in $PREFIX"
    if [[ -n "$previous" ]]; then
        act "remember $previous as the previous release" switch_symlink "$previous" "$PREFIX/previous"
    elif [[ -L "$PREFIX/previous" ]]; then
        act "forget the previous release" rm -f "$PREFIX/previous"
    fi
    act "switch $PREFIX/current -> $release" switch_symlink "$release" "$PREFIX/current"
    install_unit "$PREFIX/$release"
    restart_service
}

# rollback BAD GOOD: back to GOOD, with the previous link as it was before the update.
rollback() {
    local bad=$1 good=$2
    echo "rollback: $bad is not healthy; switching back to $good" >&2
    switch_to "$good" "$PREVIOUS_BEFORE"
    if wait_healthy "$good"; then
        echo "rolled back: $good is running; $bad stays in $PREFIX/$bad for inspection" >&2
        exit 1
    fi
    echo "error: $good is not healthy either; see: journalctl -u $EDGE_UNIT -n 200" >&2
    exit 3
}

# ---------------------------------------------------------------- manual rollback
if [[ "$ROLLBACK" == 1 ]]; then
    PREV="$(readlink "$PREFIX/previous" 2>/dev/null || true)"
    [[ -n "$PREV" && -d "$PREFIX/$PREV" ]] || die "no previous release recorded in $PREFIX/previous"
    [[ "$PREV" != "$OLD" ]] || die "previous and current are both $OLD; nothing to roll back to"
    echo "rolling back: $OLD -> $PREV"
    switch_to "$PREV" "$OLD"
    wait_healthy "$PREV" || die "$PREV is not healthy after the rollback; see: journalctl -u $EDGE_UNIT"
    [[ "$DRY_RUN" == 1 ]] || echo "rolled back: $PREV is running"
    exit 0
fi

# ---------------------------------------------------------------- update
[[ -f "$SOURCE/setup.cfg" ]] || die "--source: $SOURCE has no setup.cfg; is it the project tree?"
SOURCE="$(cd "$SOURCE" && pwd)"
[[ -n "$RELEASE" ]] || RELEASE="$(project_version "$SOURCE")"
[[ "$RELEASE" =~ ^[A-Za-z0-9][A-Za-z0-9._+-]*$ ]] || die "--release: '$RELEASE' is not a usable directory name"
if [[ "$RELEASE" == "$OLD" && "$FORCE" != 1 ]]; then
    ok "release $RELEASE is already current; nothing to do (--force to reinstall it)"
    exit 0
fi
[[ "$RELEASE" != "$OLD" ]] || die "--force cannot reinstall the release that is running; use another --release name"
choose_precision "$ROOT$CONFIG_ON_BOX"   # sets PRECISION, CALIBRATION and ENGINE_ARGS
NEW_DIR="$PREFIX/$RELEASE"
VENV="$NEW_DIR/venv"
echo "updating: $OLD -> $RELEASE (from $SOURCE)"

# A leftover directory of this name is not running: start it afresh.
if [[ -e "$NEW_DIR" ]]; then
    act "remove the earlier, not running copy of $NEW_DIR" rm -rf "$NEW_DIR"
fi
if [[ "$DO_PIP" == 1 ]]; then
    ensure_venv "$VENV" "$PYTHON"
    ensure_package "$VENV" "$SOURCE" "$RELEASE" "$EXTRAS" "$WHEELHOUSE"
else
    skip "virtualenv and pip install (--no-pip)"
    act "create $NEW_DIR" mkdir -p "$NEW_DIR"
fi
NEW_SCRIPTS="$SOURCE/firmware_scripts"
[[ -f "$NEW_SCRIPTS/healthcheck.sh" ]] || NEW_SCRIPTS="$SCRIPT_DIR"
act "copy $NEW_SCRIPTS to $NEW_DIR/firmware_scripts" copy_tree "$NEW_SCRIPTS" "$NEW_DIR/firmware_scripts"
if [[ -f "$SOURCE/docs/DEPLOY.md" ]]; then
    act "copy DEPLOY.md to $NEW_DIR" install -m 0644 "$SOURCE/docs/DEPLOY.md" "$NEW_DIR/DEPLOY.md"
fi

# Engines for the new release, built while the old one serves (the cache is keyed by model
# hash, TensorRT version, GPU and precision, so unchanged models are not rebuilt).
if [[ "$DO_ENGINES" != 1 ]]; then
    skip "TensorRT engines (--no-engines)"
elif [[ -n "$ROOT" ]]; then
    skip "TensorRT engines for $RELEASE must be built on the target machine (--root); there run: $(engines_on_target)"
elif [[ "$DRY_RUN" == 1 ]]; then
    engines_plan "$VENV/bin/edge" "$CONFIG_ON_BOX"
else
    rc=0
    ensure_engines_built "$VENV/bin/edge" "$CONFIG_ON_BOX" || rc=$?
    [[ "$rc" == 0 ]] || die "engines for $RELEASE: $ENGINE_PROBLEM. Nothing was switched, $OLD is still running"
fi

switch_to "$RELEASE" "$OLD"
if [[ "$DRY_RUN" == 1 ]]; then
    wait_healthy "$RELEASE"
    printf 'would: on a failed health check, switch back to %s and restart (rollback)\n' "$OLD"
    printf 'dry run: nothing was changed\n'
    exit 0
fi
wait_healthy "$RELEASE" || rollback "$RELEASE" "$OLD"
echo "updated: $OLD -> $RELEASE; roll back with: $0 --rollback"
