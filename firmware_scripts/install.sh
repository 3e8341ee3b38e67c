#!/usr/bin/env bash
# Install the edge appliance on a Jetson (JetPack 6), or on a development machine with
# --allow-unsupported. Safe to run again: every step checks first and prints "ok: ..."
# when there is nothing to do; --dry-run prints "would: ..." for each planned action.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$SCRIPT_DIR/lib.sh"

usage() {
    cat <<EOF
Usage: install.sh [options]

Installs the appliance from this source tree into /opt/edge/<version>, with
/opt/edge/current pointing at it, and the edge.service systemd unit.

Options:
  --root DIR            install into DIR instead of / (image building, tests);
                        services are enabled offline and not started
  --dry-run             print every action without doing it
  --allow-unsupported   go on when the platform is not JetPack 6 with TensorRT and CUDA
  --source DIR          project source tree (default: $(dirname "$SCRIPT_DIR"))
  --release NAME        install as /opt/edge/NAME (default: version in setup.cfg)
  --python PATH         base interpreter for the virtualenv (default: $DEFAULT_PYTHON)
  --extras LIST         pip extras to install (default: tensorrt; "" for none)
  --wheelhouse DIR      install offline from wheels in DIR (pip --no-index)
  --calibration DIR     INT8 calibration tensors (.npy), needed with --precision int8
  --precision P         TensorRT engine precision: fp16 (default), fp32 or int8
  --performance-mode N  nvpmodel mode (default 0 = MAXN); see jetson_performance.sh
  --no-clocks           do not pin clocks with jetson_clocks (saves power)
  --no-performance      leave power mode and clocks alone
  --no-pip              skip virtualenv creation and pip install
  --no-engines          skip building and verifying the TensorRT engines
  --no-systemctl        install unit files but do not call systemctl at all
  -h, --help            this help

Exit status: 0 installed (or nothing to do), 1 a step failed, 2 unsupported platform.
EOF
}

DEFAULT_PYTHON=python3
[[ -x /usr/bin/python3 ]] && DEFAULT_PYTHON=/usr/bin/python3
SOURCE="$(dirname "$SCRIPT_DIR")"
RELEASE=""
PYTHON="$DEFAULT_PYTHON"
EXTRAS="tensorrt"
WHEELHOUSE=""
PRECISION="fp16"
CALIBRATION=""
PERF_MODE=0
ALLOW_UNSUPPORTED=0
DO_CLOCKS=1
DO_PERFORMANCE=1
DO_PIP=1
DO_ENGINES=1
DO_SYSTEMCTL=1

while [[ $# -gt 0 ]]; do
    case "$1" in
        --root) need_value "$@"; ROOT="${2%/}"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --allow-unsupported) ALLOW_UNSUPPORTED=1; shift ;;
        --source) need_value "$@"; SOURCE="$2"; shift 2 ;;
        --release) need_value "$@"; RELEASE="$2"; shift 2 ;;
        --python) need_value "$@"; PYTHON="$2"; shift 2 ;;
        --extras) [[ $# -ge 2 ]] || die "option --extras needs a value"; EXTRAS="$2"; shift 2 ;;
        --wheelhouse) need_value "$@"; WHEELHOUSE="$2"; shift 2 ;;
        --precision) need_value "$@"; PRECISION="$2"; shift 2 ;;
        --calibration) need_value "$@"; CALIBRATION="$2"; shift 2 ;;
        --performance-mode) need_value "$@"; PERF_MODE="$2"; shift 2 ;;
        --no-clocks) DO_CLOCKS=0; shift ;;
        --no-performance) DO_PERFORMANCE=0; shift ;;
        --no-pip) DO_PIP=0; shift ;;
        --no-engines) DO_ENGINES=0; shift ;;
        --no-systemctl) DO_SYSTEMCTL=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

case "$PRECISION" in fp16|fp32|int8) ;; *) die "--precision: '$PRECISION' is not fp16, fp32 or int8" ;; esac
BUILD_ARGS=(--precision "$PRECISION")
if [[ -n "$CALIBRATION" ]]; then
    [[ -d "$CALIBRATION" ]] || die "--calibration: $CALIBRATION is not a directory"
    BUILD_ARGS+=(--calibration "$(cd "$CALIBRATION" && pwd)")
elif [[ "$PRECISION" == int8 ]]; then
    die "--precision int8 needs --calibration DIR (model-input tensors as .npy files)"
fi
[[ "$PERF_MODE" =~ ^[0-9]+$ ]] || die "--performance-mode: '$PERF_MODE' is not a mode number"
[[ -f "$SOURCE/setup.cfg" ]] || die "--source: $SOURCE has no setup.cfg; is it the project tree?"
SOURCE="$(cd "$SOURCE" && pwd)"
[[ -n "$RELEASE" ]] || RELEASE="$(project_version "$SOURCE")"
[[ "$RELEASE" =~ ^[A-Za-z0-9][A-Za-z0-9._+-]*$ ]] || die "--release: '$RELEASE' is not a usable directory name"
if [[ -n "$ROOT" ]]; then
    mkdir -p "$ROOT"
    ROOT="$(cd "$ROOT" && pwd)"
fi
if [[ -z "$ROOT" && "$DRY_RUN" != 1 && "$(id -u)" != 0 ]]; then
    die "run as root (sudo $0 ...), or use --dry-run to see the plan"
fi
LIVE=0   # 1: acting on the running system (not --root, not --dry-run)
[[ -z "$ROOT" && "$DRY_RUN" != 1 ]] && LIVE=1

PREFIX="$ROOT$EDGE_PREFIX"
RELEASE_DIR="$PREFIX/$RELEASE"
VENV="$RELEASE_DIR/venv"
CONFIG="$ROOT$EDGE_ETC/edge.toml"
printf 'installing xray-edge %s from %s into %s\n' "$RELEASE" "$SOURCE" "${ROOT:-/}"

# ---------------------------------------------------------------- platform
# JetPack 6 = L4T R36. The release file reads "# R36 (release), REVISION: 3.0, ...".
l4t_version() {
    local file="$ROOT/etc/nv_tegra_release" ver
    if [[ -f "$file" ]]; then
        sed -n 's/^# R\([0-9]\{1,\}\) (release), REVISION: \([0-9.]\{1,\}\).*/\1.\2/p' "$file" | head -n 1
        return 0
    fi
    if command -v dpkg-query >/dev/null 2>&1; then
        ver="$(dpkg-query --admindir="$ROOT/var/lib/dpkg" -W -f='${Version}' nvidia-l4t-core 2>/dev/null || true)"
        [[ -n "$ver" ]] && printf '%s\n' "${ver%%-*}"
    fi
    return 0
}

has_tensorrt() {
    if [[ -n "$ROOT" ]]; then
        compgen -G "$ROOT/usr/lib/python3*/dist-packages/tensorrt/__init__.py" >/dev/null
    else
        "$PYTHON" -c 'import tensorrt' >/dev/null 2>&1
    fi
}

check_platform() {
    local -a problems=()
    local l4t
    l4t="$(l4t_version)"
    if [[ -z "$l4t" ]]; then
        problems+=("not a Jetson: no /etc/nv_tegra_release and no nvidia-l4t-core package")
    elif [[ "${l4t%%.*}" != 36 ]]; then
        problems+=("JetPack 6 (L4T R36) is required, this is L4T R$l4t; reflash with JetPack 6")
    else
        ok "L4T R$l4t (JetPack 6)"
    fi
    if [[ -d "$ROOT/usr/local/cuda" ]]; then
        ok "CUDA at /usr/local/cuda"
    else
        problems+=("CUDA not found at /usr/local/cuda; install it with: apt-get install nvidia-jetpack")
    fi
    if has_tensorrt; then
        ok "TensorRT Python bindings importable"
    else
        problems+=("TensorRT Python bindings missing ($PYTHON -c 'import tensorrt' fails); install: apt-get install python3-libnvinfer")
    fi
    [[ ${#problems[@]} -eq 0 ]] && return 0
    PLATFORM_OK=0
    local p
    for p in "${problems[@]}"; do
        printf 'unsupported: %s\n' "$p" >&2
    done
    if [[ "$ALLOW_UNSUPPORTED" == 1 ]]; then
        warn "platform unsupported, going on (--allow-unsupported): the service will use ONNX Runtime, not TensorRT"
        return 0
    fi
    printf 'error: this appliance needs a Jetson Orin with JetPack 6, CUDA and TensorRT.\n' >&2
    printf '       Nothing was changed. On a development machine, add --allow-unsupported.\n' >&2
    exit 2
}

# ---------------------------------------------------------------- service user
ensure_user() {
    if user_field "$SERVICE_USER" 3 >/dev/null; then
        ok "service user $SERVICE_USER exists"
    else
        local -a cmd=(useradd --system --user-group --home-dir "$EDGE_DATA" --no-create-home
                      --shell /usr/sbin/nologin --comment "X-ray edge AI appliance")
        [[ -n "$ROOT" ]] && cmd+=(--root "$ROOT")
        act "create service user $SERVICE_USER" "${cmd[@]}" "$SERVICE_USER"
    fi
    # video (and render, where it exists) own the GPU device nodes on Jetson.
    local group
    for group in video render; do
        group_exists "$group" || continue
        if user_in_group "$SERVICE_USER" "$group"; then
            ok "$SERVICE_USER is in group $group"
        else
            local -a cmd=(usermod --append --groups "$group")
            [[ -n "$ROOT" ]] && cmd+=(--root "$ROOT")
            act "add $SERVICE_USER to group $group (GPU access)" "${cmd[@]}" "$SERVICE_USER"
        fi
    done
}

# uid/gid of the service user; placeholders in a dry run where it does not exist yet.
service_ids() {
    SVC_UID="$(user_field "$SERVICE_USER" 3 || true)"
    SVC_GID="$(user_field "$SERVICE_USER" 4 || true)"
    if [[ -z "$SVC_UID" ]]; then
        [[ "$DRY_RUN" == 1 ]] || die "service user $SERVICE_USER not found in $ROOT/etc/passwd"
        SVC_UID="$SERVICE_USER"
        SVC_GID="$SERVICE_USER"
    fi
}

# ---------------------------------------------------------------- steps
ensure_config() {
    if [[ -f "$CONFIG" ]]; then
        ok "$CONFIG exists, kept as is (template: $SCRIPT_DIR/edge.toml)"
        return 0
    fi
    act "write default config $CONFIG" install -m 0640 -o "$ADMIN_UID" -g "$SVC_GID" "$SCRIPT_DIR/edge.toml" "$CONFIG"
}

ensure_engines() {
    if [[ "$DO_ENGINES" != 1 ]]; then
        skip "TensorRT engines (--no-engines)"
        return 0
    fi
    if [[ -n "$ROOT" ]]; then
        skip "TensorRT engines must be built on the target machine (--root); run 'edge engines build' there"
        return 0
    fi
    local edge="$VENV/bin/edge"
    if [[ "$DRY_RUN" == 1 ]]; then
        printf 'would: build TensorRT engines (%s engines build --precision %s, as %s)\n' "$edge" "$PRECISION" "$SERVICE_USER"
        printf 'would: verify engines against ONNX Runtime (%s engines verify)\n' "$edge"
        return 0
    fi
    if as_service_user "$edge" --config "$EDGE_ETC/edge.toml" engines verify >/dev/null 2>&1; then
        ok "engines built and verified"
        return 0
    fi
    if ! as_service_user "$edge" --config "$EDGE_ETC/edge.toml" engines build "${BUILD_ARGS[@]}" \
            || ! as_service_user "$edge" --config "$EDGE_ETC/edge.toml" engines verify; then
        [[ "$PLATFORM_OK" == 1 ]] && die "engine build or verification failed; see the output above"
        warn "engine build/verify failed on this unsupported platform; the service will use ONNX Runtime"
        return 0
    fi
    printf 'done: build and verify engines (%s)\n' "$PRECISION"
}

ensure_performance() {
    if [[ "$DO_PERFORMANCE" != 1 ]]; then
        skip "power mode and clocks (--no-performance)"
        return 0
    fi
    local -a args=(--mode "$PERF_MODE")
    [[ "$DO_CLOCKS" == 1 ]] || args+=(--no-clocks)
    if [[ -n "$ROOT" ]]; then
        skip "power mode and clocks apply to the running machine (--root)"
    elif [[ "$DRY_RUN" == 1 ]]; then
        "$SCRIPT_DIR/jetson_performance.sh" "${args[@]}" --dry-run
    elif ! "$SCRIPT_DIR/jetson_performance.sh" "${args[@]}"; then
        warn "power mode/clocks not set; the service works, with higher or less steady latency"
    fi
    # jetson_clocks does not survive a reboot: a oneshot unit re-applies it at boot.
    if [[ "$DO_CLOCKS" == 1 ]]; then
        ensure_file "$SCRIPT_DIR/$EDGE_PERF_UNIT" "$ROOT/etc/systemd/system/$EDGE_PERF_UNIT" 0644
        ensure_enabled "$EDGE_PERF_UNIT"
    fi
}

ensure_enabled() {
    local unit=$1
    if [[ "$DO_SYSTEMCTL" != 1 ]]; then
        skip "enable $unit (--no-systemctl)"
        return 0
    fi
    if [[ "$LIVE" == 1 && "$CHANGED" == 1 ]]; then
        act "reload systemd units" systemctl daemon-reload
        CHANGED=0
    fi
    if [[ -f "$ROOT/etc/systemd/system/$unit" ]] && systemctl_root is-enabled --quiet "$unit" 2>/dev/null; then
        ok "$unit enabled"
    else
        act "enable $unit" systemctl_root enable --quiet "$unit"
    fi
}

start_service() {
    if [[ "$DO_SYSTEMCTL" != 1 ]]; then
        skip "start $EDGE_UNIT (--no-systemctl)"
        return 0
    fi
    if [[ -n "$ROOT" ]]; then
        skip "start $EDGE_UNIT (--root: it starts at the target's next boot)"
        return 0
    fi
    if [[ "$DRY_RUN" == 1 ]]; then
        printf 'would: start %s and run the health check\n' "$EDGE_UNIT"
        return 0
    fi
    if [[ "$RESTART_NEEDED" == 0 ]] && systemctl is-active --quiet "$EDGE_UNIT"; then
        ok "$EDGE_UNIT running"
    else
        act "restart $EDGE_UNIT" systemctl restart "$EDGE_UNIT"
    fi
    local deadline=$((SECONDS + 60))
    until "$RELEASE_DIR/firmware_scripts/healthcheck.sh" --config "$EDGE_ETC/edge.toml" >/dev/null 2>&1; do
        if (( SECONDS >= deadline )); then
            "$RELEASE_DIR/firmware_scripts/healthcheck.sh" --config "$EDGE_ETC/edge.toml" || true
            die "$EDGE_UNIT is not healthy after 60 s; see: journalctl -u $EDGE_UNIT -n 100"
        fi
        sleep 3
    done
    ok "$EDGE_UNIT healthy"
}

# ---------------------------------------------------------------- main
PLATFORM_OK=1
check_platform

current="$(readlink "$PREFIX/current" 2>/dev/null || true)"
if [[ -n "$current" && "$current" != "$RELEASE" ]]; then
    die "release $current is installed; to change versions use update.sh (it can roll back)"
fi

ensure_user
service_ids
ensure_dir "$PREFIX" 0755 "$ADMIN_UID" "$ADMIN_GID"
ensure_dir "$ROOT$EDGE_ETC" 0750 "$ADMIN_UID" "$SVC_GID"
ensure_dir "$ROOT$EDGE_DATA" 0750 "$SVC_UID" "$SVC_GID"
ensure_dir "$ROOT$EDGE_LOGS" 0750 "$SVC_UID" "$SVC_GID"
ensure_config

RESTART_NEEDED=0
if [[ "$DO_PIP" == 1 ]]; then
    ensure_venv "$VENV" "$PYTHON"
    before="$(installed_version "$VENV")"
    ensure_package "$VENV" "$SOURCE" "$RELEASE" "$EXTRAS" "$WHEELHOUSE"
    [[ "$(installed_version "$VENV")" == "$before" ]] || RESTART_NEEDED=1
else
    skip "virtualenv and pip install (--no-pip)"
fi
ensure_tree "$SCRIPT_DIR" "$RELEASE_DIR/firmware_scripts"
if [[ -f "$SOURCE/docs/DEPLOY.md" ]]; then
    ensure_file "$SOURCE/docs/DEPLOY.md" "$RELEASE_DIR/DEPLOY.md" 0644
fi
ensure_symlink "$RELEASE" "$PREFIX/current"
ensure_file "$SCRIPT_DIR/edge-cli.sh" "$ROOT/usr/local/bin/edge" 0755

ensure_engines
CHANGED=0
ensure_performance

ensure_file "$SCRIPT_DIR/logrotate.edge" "$ROOT/etc/logrotate.d/edge" 0644
CHANGED=0
ensure_file "$SCRIPT_DIR/journald-edge.conf" "$ROOT/etc/systemd/journald.conf.d/50-edge.conf" 0644
if [[ "$CHANGED" == 1 && "$LIVE" == 1 && "$DO_SYSTEMCTL" == 1 ]]; then
    act "restart systemd-journald (new limits)" systemctl restart systemd-journald
fi

CHANGED=0
ensure_file "$SCRIPT_DIR/$EDGE_UNIT" "$ROOT/etc/systemd/system/$EDGE_UNIT" 0644
[[ "$CHANGED" == 1 ]] && RESTART_NEEDED=1
ensure_enabled "$EDGE_UNIT"
start_service

if [[ "$DRY_RUN" == 1 ]]; then
    printf 'dry run: nothing was changed\n'
else
    printf 'installed: xray-edge %s; next: edit %s and see docs/DEPLOY.md\n' "$RELEASE" "$EDGE_ETC/edge.toml"
fi
