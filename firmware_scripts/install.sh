#!/usr/bin/env bash
# Install the edge appliance on a Jetson Orin with JetPack 6.1 or newer (L4T R36.4+,
# TensorRT 10, CUDA 12), or on a development machine with --allow-unsupported. Safe to run
# again: every step checks first and prints "ok: ..." when there is nothing to do;
# --dry-run prints "would: ..." for each planned action.
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
  --allow-unsupported   go on when the platform is not JetPack 6.1+ (L4T R36.4+,
                        TensorRT >= 10, CUDA 12.x); the service then uses ONNX Runtime
  --source DIR          project source tree (default: $(dirname "$SCRIPT_DIR"))
  --release NAME        install as /opt/edge/NAME (default: version in setup.cfg)
  --python PATH         base interpreter for the virtualenv (default: $DEFAULT_PYTHON)
  --extras LIST         pip extras to install (default: tensorrt, which pins
                        $CUDA_PYTHON_PIN for CUDA $CUDA_MAJOR.x; "" for none)
  --wheelhouse DIR      install offline from wheels in DIR (pip --no-index)
  --precision P         TensorRT engine precision: fp16, fp32 or int8 (default: the
                        installed config's [models] precision, else fp16); a new
                        config is written with it, and every engine build/verify uses it
  --calibration DIR     INT8 calibration tensors (.npy), needed with --precision int8
                        (with --root: the folder's path on the target)
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
PRECISION=""      # unset: the installed config's [models] precision, else fp16
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
choose_precision "$CONFIG"   # sets PRECISION, CALIBRATION and ENGINE_ARGS
printf 'installing xray-edge %s from %s into %s\n' "$RELEASE" "$SOURCE" "${ROOT:-/}"

# ---------------------------------------------------------------- platform
# JetPack 6.1 or newer: L4T R36.4+, TensorRT 10 (JetPack 6.0, L4T R36.2/R36.3, has TensorRT
# 8.6, which cannot run the engines), CUDA 12.x (the cuda-python 12 line). With --root the
# target's files are read; otherwise the running system and $PYTHON.
check_platform() {
    local -a problems=()
    local l4t trt cuda jetpack="" where
    l4t="$(l4t_version)"
    trt="$(tensorrt_version "$PYTHON")"
    cuda="$(cuda_version)"
    if [[ -z "$l4t" ]]; then
        problems+=("not a Jetson: no /etc/nv_tegra_release and no nvidia-l4t-core package")
    else
        jetpack="$(jetpack_name "$l4t")"
        if version_ge "$l4t" "$MIN_L4T"; then
            ok "L4T R$l4t ($jetpack)"
        else
            problems+=("L4T R$l4t is $jetpack; JetPack 6.1 or newer (L4T R$MIN_L4T or newer) is required")
        fi
    fi
    where="$PYTHON -c 'import tensorrt' fails"
    [[ -n "$ROOT" ]] && where="no /usr/lib/python3.10/dist-packages/tensorrt/__init__.py"
    if [[ -z "$trt" ]]; then
        problems+=("TensorRT Python bindings missing ($where); install them: sudo apt-get install nvidia-jetpack")
    elif [[ "$trt" == unknown ]]; then
        problems+=("TensorRT Python bindings found, but without a readable __version__; TensorRT $MIN_TENSORRT or newer is required")
    elif ! version_ge "$trt" "$MIN_TENSORRT"; then
        problems+=("TensorRT $trt found; TensorRT $MIN_TENSORRT or newer is required (JetPack 6.1 and 6.2 ship TensorRT 10.3)")
    else
        ok "TensorRT $trt"
    fi
    if [[ -z "$cuda" && ! -d "$ROOT/usr/local/cuda" ]]; then
        problems+=("CUDA not found at /usr/local/cuda; install it: sudo apt-get install nvidia-jetpack")
    elif [[ -z "$cuda" ]]; then
        problems+=("CUDA at /usr/local/cuda has no readable version.json; CUDA $CUDA_MAJOR.x is required")
    elif [[ "${cuda%%.*}" != "$CUDA_MAJOR" ]]; then
        problems+=("CUDA $cuda found; CUDA $CUDA_MAJOR.x is required: the tensorrt extra pins the cuda-python $CUDA_MAJOR line ($CUDA_PYTHON_PIN); JetPack 6.1 and 6.2 ship CUDA 12.6")
    else
        ok "CUDA $cuda (the tensorrt extra's $CUDA_PYTHON_PIN expects CUDA $CUDA_MAJOR.x)"
    fi
    [[ ${#problems[@]} -eq 0 ]] && return 0
    PLATFORM_OK=0
    local p
    for p in "${problems[@]}"; do
        printf 'unsupported: %s\n' "$p" >&2
    done
    local found="no L4T (not a Jetson)"
    [[ -n "$l4t" ]] && found="L4T R$l4t ($jetpack)"
    printf 'found: %s, TensorRT %s, CUDA %s\n' "$found" "${trt:-none}" "${cuda:-none}" >&2
    printf 'needed: JetPack 6.1 or newer: L4T R%s+, TensorRT %s+, CUDA %s.x (JetPack 6.1 and 6.2 ship TensorRT 10.3, CUDA 12.6)\n' \
        "$MIN_L4T" "$MIN_TENSORRT" "$CUDA_MAJOR" >&2
    if [[ -n "$l4t" ]] && version_ge "$l4t" 36 && ! version_ge "$l4t" "$MIN_L4T"; then
        printf 'upgrade: on the box, switch the apt source to r36.4 and install JetPack 6.1+ (then reboot):\n' >&2
        printf '  sudo sed -i "s/r36\\.[0-9]/r36.4/g" /etc/apt/sources.list.d/nvidia-l4t-apt-source.list\n' >&2
        printf '  sudo apt-get update && sudo apt-get dist-upgrade && sudo apt-get install nvidia-jetpack\n' >&2
        printf '  or reflash with JetPack 6.2 (NVIDIA SDK Manager)\n' >&2
    elif [[ -n "$l4t" ]] && ! version_ge "$l4t" "$MIN_L4T"; then
        printf 'upgrade: reflash with JetPack 6.2 (NVIDIA SDK Manager)\n' >&2
    elif [[ -n "$cuda" && "${cuda%%.*}" != "$CUDA_MAJOR" ]]; then
        printf 'fix: point /usr/local/cuda at JetPack'"'"'s CUDA %s.x (sudo update-alternatives --config cuda), or reinstall it: sudo apt-get install nvidia-jetpack\n' "$CUDA_MAJOR" >&2
    elif [[ -n "$l4t" ]]; then
        printf 'fix: install JetPack'"'"'s components: sudo apt-get install nvidia-jetpack\n' >&2
    fi
    if [[ "$ALLOW_UNSUPPORTED" == 1 ]]; then
        warn "platform unsupported, going on (--allow-unsupported): the service will use ONNX Runtime, not TensorRT"
        return 0
    fi
    printf 'error: this appliance needs a Jetson Orin with JetPack 6.1 or newer (TensorRT %s+, CUDA %s.x).\n' \
        "$MIN_TENSORRT" "$CUDA_MAJOR" >&2
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
# The config is written once, from the template, with the chosen [models] precision (and
# calibration_dir for int8); an existing one is kept (choose_precision warned on a mismatch).
ensure_config() {
    local models="precision = \"$PRECISION\""
    [[ "$PRECISION" == int8 ]] && models+=", calibration_dir = \"$CALIBRATION\""
    if [[ -f "$CONFIG" ]]; then
        ok "$CONFIG exists, kept as is (template: $SCRIPT_DIR/edge.toml)"
        return 0
    fi
    act "write config $CONFIG from the template, with [models] $models" write_config "$SCRIPT_DIR/edge.toml" "$CONFIG"
}

write_config() {
    local tmp
    tmp="$(mktemp "$(dirname "$2")/.edge.toml.XXXXXX")"
    if render_config "$1" >"$tmp" && install -m 0640 -o "$ADMIN_UID" -g "$SVC_GID" "$tmp" "$2"; then
        rm -f "$tmp"
        return 0
    fi
    rm -f "$tmp"
    return 1
}

# render_config TEMPLATE: the template with [models] precision (and calibration_dir for
# int8) set: a key already there (set or commented out) gets the value, keeping its
# comment; a missing one is added under [models].
render_config() {
    local calibration=""
    [[ "$PRECISION" == int8 ]] && calibration="$CALIBRATION"
    EDGE_PRECISION="$PRECISION" EDGE_CALIBRATION="$calibration" awk '
        function header(line) { return line ~ /^[[:space:]]*\[/ }
        function is_models(line) { return line ~ /^[[:space:]]*\[models\][[:space:]]*(#.*)?$/ }
        function keyed(line, key) { return line ~ ("^[#[:space:]]*" key "[[:space:]]*=") }
        function setting(line, key, value,   rest) {
            rest = line
            sub("^[#[:space:]]*" key "[[:space:]]*=[[:space:]]*(\"[^\"]*\")?", "", rest)
            return key " = \"" value "\"" rest
        }
        BEGIN {
            keys[++n] = "precision"; want["precision"] = ENVIRON["EDGE_PRECISION"]
            if (ENVIRON["EDGE_CALIBRATION"] != "") { keys[++n] = "calibration_dir"; want["calibration_dir"] = ENVIRON["EDGE_CALIBRATION"] }
        }
        FNR == 1 { models = 0 }
        NR == FNR {   # first pass: which keys [models] has
            if (header($0)) models = is_models($0)
            else if (models) for (i = 1; i <= n; i++) if (keyed($0, keys[i])) has[keys[i]] = 1
            next
        }
        header($0) {
            models = is_models($0)
            print
            if (models) { seen = 1; for (i = 1; i <= n; i++) if (!(keys[i] in has)) print setting("", keys[i], want[keys[i]]) }
            next
        }
        models {
            for (i = 1; i <= n; i++) if (!(keys[i] in done) && keyed($0, keys[i])) {
                print setting($0, keys[i], want[keys[i]]); done[keys[i]] = 1; next
            }
        }
        { print }
        END {
            if (!seen) { print ""; print "[models]"; for (i = 1; i <= n; i++) print setting("", keys[i], want[keys[i]]) }
        }' "$1" "$1"
}

ensure_engines() {
    if [[ "$DO_ENGINES" != 1 ]]; then
        skip "TensorRT engines (--no-engines)"
        return 0
    fi
    if [[ -n "$ROOT" ]]; then
        skip "TensorRT engines must be built on the target machine (--root); there run: $(engines_on_target)"
        return 0
    fi
    local edge_cli="$VENV/bin/edge" rc=0
    if [[ "$DRY_RUN" == 1 ]]; then
        engines_plan "$edge_cli" "$EDGE_ETC/edge.toml"
        return 0
    fi
    ensure_engines_built "$edge_cli" "$EDGE_ETC/edge.toml" || rc=$?
    [[ "$rc" == 0 ]] && return 0
    if [[ "$PLATFORM_OK" != 1 ]]; then
        warn "engines: $ENGINE_PROBLEM; on this unsupported platform the service will use ONNX Runtime"
        return 0
    fi
    die "engines: $ENGINE_PROBLEM. The steps before are kept; fix this and run install.sh again"
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
