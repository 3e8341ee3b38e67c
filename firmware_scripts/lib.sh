#!/usr/bin/env bash
# Shared helpers for install.sh and update.sh (sourced, not run).
# The settings below are used by the scripts that source this file.
# shellcheck disable=SC2034
#
# Every step follows the same pattern so a second run changes nothing:
#   check first -> "ok: ..." when already done
#   otherwise   -> "would: ..." with --dry-run, or do it and print "done: ..."
# Paths are prefixed with $ROOT so tests can work on a temporary tree.

EDGE_PREFIX=/opt/edge
EDGE_ETC=/etc/edge
EDGE_DATA=/var/lib/edge
EDGE_LOGS=/var/log/edge
EDGE_UNIT=edge.service
EDGE_PERF_UNIT=edge-performance.service

# Owner of the files root owns on a real install. Only a --root run (image build, tests)
# can be unprivileged; its files then belong to the caller.
ADMIN_UID=0
ADMIN_GID=0
if [[ "$(id -u)" != 0 ]]; then
    ADMIN_UID="$(id -u)"
    ADMIN_GID="$(id -g)"
fi

# What the appliance runs on: JetPack 6.1 or newer (L4T R36.4+) for TensorRT 10; CUDA 12.x,
# because the `tensorrt` extra pins the cuda-python 12 line (cuda-python>=12.2,<13).
# JetPack 6.0 (L4T R36.2/R36.3) has TensorRT 8.6 and is refused.
MIN_L4T=36.4
MIN_TENSORRT=10
CUDA_MAJOR=12
CUDA_PYTHON_PIN="cuda-python>=12.2,<13"
PRECISIONS="fp16 fp32 int8"
DEFAULT_PRECISION=fp16

ROOT="${ROOT:-}"
DRY_RUN="${DRY_RUN:-0}"
SERVICE_USER="${SERVICE_USER:-edge}"

ok()   { printf 'ok: %s\n' "$*"; }
skip() { printf 'skip: %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die()  { printf 'error: %s\n' "$*" >&2; exit 1; }

# act DESCRIPTION COMMAND [ARGS...]: run COMMAND unless --dry-run, and say so.
act() {
    local desc=$1
    shift
    if [[ "$DRY_RUN" == 1 ]]; then
        printf 'would: %s\n' "$desc"
        return 0
    fi
    "$@" || die "failed: $desc"
    printf 'done: %s\n' "$desc"
}

# need_value OPTION VALUE: fail when an option that takes a value got none.
need_value() {
    [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "option $1 needs a value"
}

# project_version SOURCE_DIR: the version in setup.cfg's [metadata] section.
project_version() {
    awk -F'[[:space:]]*=[[:space:]]*' '
        /^\[/ { meta = ($0 ~ /^\[metadata\]/) ; next }
        meta && $1 == "version" { print $2; exit }' "$1/setup.cfg"
}

# user_field NAME FIELD: a field of NAME's entry in $ROOT/etc/passwd (3=uid, 4=gid).
user_field() {
    [[ -f "$ROOT/etc/passwd" ]] || return 1
    awk -F: -v u="$1" -v f="$2" '$1 == u { print $f; found = 1 } END { exit !found }' "$ROOT/etc/passwd"
}

group_exists() {
    [[ -f "$ROOT/etc/group" ]] && awk -F: -v g="$1" '$1 == g { found = 1 } END { exit !found }' "$ROOT/etc/group"
}

user_in_group() {
    awk -F: -v g="$2" -v u="$1" '$1 == g { n = split($4, m, ","); for (i = 1; i <= n; i++) if (m[i] == u) found = 1 }
        END { exit !found }' "$ROOT/etc/group"
}

# ensure_file SRC DEST MODE: copy SRC to DEST when missing or different; sets CHANGED=1
# when it changed something (or would have), so callers know to reload a daemon.
CHANGED=0
ensure_file() {
    local src=$1 dest=$2 mode=$3
    if [[ -f "$dest" ]] && cmp -s "$src" "$dest" && [[ "$(stat -c %a "$dest")" == "${mode#0}" ]]; then
        ok "$dest up to date"
        return 0
    fi
    act "install $dest" install -D -m "$mode" "$src" "$dest"
    CHANGED=1
}

# ensure_dir DIR MODE OWNER_UID OWNER_GID
ensure_dir() {
    local dir=$1 mode=$2 uid=$3 gid=$4
    if [[ -d "$dir" && "$(stat -c '%a %u %g' "$dir")" == "${mode#0} $uid $gid" ]]; then
        ok "$dir exists (mode $mode, owner $uid:$gid)"
        return 0
    fi
    act "create $dir (mode $mode, owner $uid:$gid)" install -d -m "$mode" -o "$uid" -g "$gid" "$dir"
}

# ensure_symlink TARGET LINK: point LINK at TARGET, atomically (rename over the old link).
ensure_symlink() {
    local target=$1 link=$2
    if [[ -L "$link" && "$(readlink "$link")" == "$target" ]]; then
        ok "$link -> $target"
        return 0
    fi
    act "point $link -> $target" switch_symlink "$target" "$link"
}

switch_symlink() {
    local target=$1 link=$2 tmp
    tmp="$(dirname "$link")/.$(basename "$link").tmp.$$"
    mkdir -p "$(dirname "$link")"
    ln -sfn "$target" "$tmp"
    mv -Tf "$tmp" "$link"
}

# ensure_tree SRC_DIR DEST_DIR: copy the scripts directory when it differs.
ensure_tree() {
    local src=$1 dest=$2
    if [[ -d "$dest" ]] && diff -rq "$src" "$dest" >/dev/null 2>&1; then
        ok "$dest up to date"
        return 0
    fi
    act "copy $src to $dest" copy_tree "$src" "$dest"
}

copy_tree() {
    rm -rf "$2"
    mkdir -p "$(dirname "$2")"
    cp -R --preserve=mode,timestamps "$1" "$2"
}

# ensure_venv VENV PYTHON: a virtualenv that also sees the system's site-packages
# (JetPack installs the TensorRT Python bindings there, not on PyPI).
ensure_venv() {
    local venv=$1 python=$2
    if [[ -x "$venv/bin/python" ]]; then
        ok "virtualenv $venv exists"
        return 0
    fi
    if [[ "$DRY_RUN" != 1 ]] && ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
        die "$python cannot create virtualenvs; install the python3-venv package (apt-get install python3-venv)"
    fi
    act "create virtualenv $venv (--system-site-packages)" "$python" -m venv --system-site-packages "$venv"
}

# installed_version VENV: the xray-edge version installed in VENV, or nothing.
installed_version() {
    [[ -x "$1/bin/python" ]] || return 0
    "$1/bin/python" - <<'PY' 2>/dev/null || true
import importlib.metadata as m
try:
    print(m.version("xray-edge"))
except m.PackageNotFoundError:
    pass
PY
}

# ensure_package VENV SOURCE VERSION EXTRAS WHEELHOUSE
ensure_package() {
    local venv=$1 source=$2 version=$3 extras=$4 wheelhouse=$5 spec
    if [[ -x "$venv/bin/edge" && "$(installed_version "$venv")" == "$version" ]]; then
        ok "xray-edge $version installed in $venv"
        return 0
    fi
    spec="$source"
    [[ -n "$extras" ]] && spec="${source}[$extras]"
    local -a pip=("$venv/bin/python" -m pip install --no-cache-dir --disable-pip-version-check)
    [[ -n "$wheelhouse" ]] && pip+=(--no-index --find-links "$wheelhouse")
    act "pip install $spec into $venv" "${pip[@]}" "$spec"
}

# as_service_user CMD...: run CMD as the service user so files it writes (engine cache)
# belong to the service, not to root.
as_service_user() {
    if [[ "$(id -u)" == 0 && -z "$ROOT" ]]; then
        runuser -u "$SERVICE_USER" -- "$@"
    else
        "$@"
    fi
}

# systemctl_root ARGS...: systemctl on the running system, or offline on $ROOT.
systemctl_root() {
    if [[ -n "$ROOT" ]]; then
        systemctl --root="$ROOT" "$@"
    else
        systemctl "$@"
    fi
}

# ---------------------------------------------------------------- platform
# version_ge A B: true when dotted version A >= B (missing fields count as 0).
version_ge() {
    local -a a b
    local i n x y
    IFS=. read -r -a a <<<"$1"
    IFS=. read -r -a b <<<"$2"
    n=$(( ${#a[@]} > ${#b[@]} ? ${#a[@]} : ${#b[@]} ))
    for (( i = 0; i < n; i++ )); do
        x=$(( 10#${a[i]:-0} ))
        y=$(( 10#${b[i]:-0} ))
        (( x > y )) && return 0
        (( x < y )) && return 1
    done
    return 0
}

# l4t_version: the Jetson Linux version ("36.4.3") from $ROOT/etc/nv_tegra_release, which
# reads "# R36 (release), REVISION: 4.3, ...", or from the nvidia-l4t-core package.
# Nothing when this is not a Jetson.
l4t_version() {
    local file="$ROOT/etc/nv_tegra_release" ver
    if [[ -f "$file" ]]; then
        sed -n 's/^# R\([0-9]\{1,\}\) (release), REVISION: \([0-9.]\{1,\}\).*/\1.\2/p' "$file" | head -n 1
        return 0
    fi
    if command -v dpkg-query >/dev/null 2>&1; then
        ver="$(dpkg-query --admindir="$ROOT/var/lib/dpkg" -W -f='${Version}' nvidia-l4t-core 2>/dev/null || true)"
        [[ "$ver" =~ ^([0-9]+(\.[0-9]+)*) ]] && printf '%s\n' "${BASH_REMATCH[1]}"
    fi
    return 0
}

# jetpack_name L4T_VERSION: the JetPack release that ships this Jetson Linux version.
jetpack_name() {
    local v=$1
    if ! version_ge "$v" 36; then printf 'JetPack 5 or older\n'
    elif ! version_ge "$v" 36.2; then printf 'a JetPack 6 developer preview\n'
    elif ! version_ge "$v" 36.4; then printf 'JetPack 6.0\n'
    elif ! version_ge "$v" 36.4.3; then printf 'JetPack 6.1\n'
    elif ! version_ge "$v" 36.4.4; then printf 'JetPack 6.2\n'
    elif ! version_ge "$v" 37; then printf 'JetPack 6.2 or a later 6.x\n'
    else printf 'a release newer than JetPack 6\n'
    fi
}

# tensorrt_version PYTHON: the version of JetPack's TensorRT Python bindings: with --root
# the __version__ in the target's dist-packages/tensorrt/__init__.py, on the running
# system what PYTHON imports. Nothing when they are missing; "unknown" when present but
# without a readable version.
tensorrt_version() {
    local python=$1 init ver=""
    if [[ -n "$ROOT" ]]; then
        for init in "$ROOT"/usr/lib/python3.10/dist-packages/tensorrt/__init__.py \
                    "$ROOT"/usr/lib/python3*/dist-packages/tensorrt/__init__.py; do
            [[ -f "$init" ]] || continue
            ver="$(sed -n "s/^__version__[[:space:]]*=[[:space:]]*[\"']\([0-9][0-9.]*\).*/\1/p" "$init" | head -n 1)"
            printf '%s\n' "${ver:-unknown}"
            return 0
        done
        return 0
    fi
    ver="$("$python" -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null)" || return 0
    if [[ "$ver" =~ ^([0-9]+(\.[0-9]+)*) ]]; then
        printf '%s\n' "${BASH_REMATCH[1]}"
    else
        printf 'unknown\n'
    fi
}

# cuda_version: CUDA's version ("12.6.68") from $ROOT/usr/local/cuda/version.json
# ("cuda": {"version": ...}). Nothing when the file is missing or has no such entry.
cuda_version() {
    local file="$ROOT/usr/local/cuda/version.json" json
    [[ -f "$file" ]] || return 0
    json="$(tr -d '\n\r' <"$file")"
    if [[ "$json" =~ \"cuda\"[[:space:]]*:[[:space:]]*\{[^}]*\"version\"[[:space:]]*:[[:space:]]*\"([0-9]+(\.[0-9]+)*)\" ]]; then
        printf '%s\n' "${BASH_REMATCH[1]}"
    fi
    return 0
}

# ---------------------------------------------------------------- precision and engines
# models_setting FILE KEY: the string value of KEY in FILE's [models] table (set, not a
# comment), or nothing.
models_setting() {
    [[ -f "$1" && -r "$1" ]] || return 0
    awk -v key="$2" '
        /^[[:space:]]*\[/ { models = ($0 ~ /^[[:space:]]*\[models\][[:space:]]*(#.*)?$/); next }
        models && $0 ~ "^[[:space:]]*" key "[[:space:]]*=" {
            if (match($0, /"[^"]*"/)) { print substr($0, RSTART + 1, RLENGTH - 2); exit }
        }' "$1"
}

# choose_precision CONFIG: settle PRECISION and CALIBRATION (the options, unset when not
# given) against the installed CONFIG's [models] precision/calibration_dir, then set
# ENGINE_ARGS, the arguments every `edge engines build` and `edge engines verify` call gets.
# Without --precision the config's choice is kept, so the engines built and verified are
# the ones the service loads; a --precision that differs from the config is warned about.
# Calibration paths are the target's: with --root they are checked under $ROOT.
choose_precision() {
    local config=$1 have have_calibration from="--precision" set_as
    if [[ -f "$config" && ! -r "$config" ]]; then
        warn "cannot read $config (run as root): its [models] precision is not known here"
        config=""
    fi
    have="$(models_setting "$config" precision)"
    have_calibration="$(models_setting "$config" calibration_dir)"
    set_as="${have:-$DEFAULT_PRECISION}"
    if [[ -z "$PRECISION" ]]; then
        PRECISION="$set_as"
        if [[ -n "$have" ]]; then
            from="$config [models] precision"
            ok "precision $PRECISION, as $config sets"
            if [[ "$PRECISION" == int8 && -z "$CALIBRATION" ]]; then
                CALIBRATION="$have_calibration"
                [[ -n "$CALIBRATION" ]] || die "$config sets [models] precision = \"int8\" without calibration_dir; set it there, or pass --calibration DIR"
            fi
        fi
    elif [[ -f "$config" && "$PRECISION" != "$set_as" ]]; then
        local shown="\"$have\""
        [[ -n "$have" ]] || shown="unset (the default, $DEFAULT_PRECISION)"
        warn "$config has [models] precision $shown," \
             "but --precision is $PRECISION: the engines built and verified now are $PRECISION, the service" \
             "loads $set_as engines. The config is kept as is: set precision = \"$PRECISION\" in its" \
             "[models] table, or run again with --precision $set_as"
    fi
    [[ " $PRECISIONS " == *" $PRECISION "* ]] || die "$from: '$PRECISION' is not fp16, fp32 or int8"
    ENGINE_ARGS=(--precision "$PRECISION")
    if [[ "$PRECISION" != int8 ]]; then
        [[ -z "$CALIBRATION" ]] || die "--calibration is only used with precision int8, not $PRECISION"
        return 0
    fi
    [[ -n "$CALIBRATION" ]] || die "--precision int8 needs --calibration DIR (a folder of model-input tensors as .npy files, readable by $SERVICE_USER); without one use fp16"
    if [[ -n "$ROOT" ]]; then
        [[ "$CALIBRATION" == /* ]] || die "--calibration: with --root give the folder's path on the target (absolute), not $CALIBRATION"
    elif [[ -d "$CALIBRATION" ]]; then
        CALIBRATION="$(cd "$CALIBRATION" && pwd)"
    fi
    [[ "$CALIBRATION" != *[[:cntrl:]\"\\]* ]] || die "--calibration: the path must not hold quotes, backslashes or control characters"
    [[ -d "$ROOT$CALIBRATION" ]] || die "--calibration: $ROOT$CALIBRATION is not a folder"
    compgen -G "$ROOT$CALIBRATION/*.npy" >/dev/null || die "--calibration: $ROOT$CALIBRATION holds no .npy files (model-input tensors)"
    if [[ -f "$config" && "$have" == int8 && "$have_calibration" != "$CALIBRATION" ]]; then
        warn "$config sets [models] calibration_dir = \"$have_calibration\", the engines are built now with" \
             "$CALIBRATION. The config is kept as is: set calibration_dir there so the service loads these engines"
    fi
    ENGINE_ARGS+=(--calibration "$CALIBRATION")
}

# engines_plan EDGE CONFIG: what ensure_engines_built would do (--dry-run).
engines_plan() {
    local cmd="$1 --config $2 engines"
    printf 'would: check the cached %s engines (as %s): %s verify %s; exit 0: keep them, 3: build them, other: report\n' \
        "$PRECISION" "$SERVICE_USER" "$cmd" "${ENGINE_ARGS[*]}"
    printf 'would: build TensorRT engines when none are cached: %s build %s\n' "$cmd" "${ENGINE_ARGS[*]}"
    printf 'would: verify the new engines against ONNX Runtime: %s verify %s\n' "$cmd" "${ENGINE_ARGS[*]}"
}

# engines_on_target: the commands to run on the target, for --root runs that cannot build.
engines_on_target() {
    printf 'edge engines build %s && edge engines verify %s' "${ENGINE_ARGS[*]}" "${ENGINE_ARGS[*]}"
}

# ensure_engines_built EDGE CONFIG: the engines of the chosen precision, built and checked
# against ONNX Runtime. `engines verify` never builds, so it is the probe: exit 0 the
# cached engines are good; 3 none of this precision yet, so build then verify; anything
# else is reported. Returns 0, or the failing command's exit status with ENGINE_PROBLEM
# saying what failed.
ensure_engines_built() {
    local edge_cli=$1 config=$2 rc=0 out
    local -a cmd=("$edge_cli" --config "$config" engines)
    ENGINE_PROBLEM=""
    out="$(as_service_user "${cmd[@]}" verify "${ENGINE_ARGS[@]}" 2>&1)" || rc=$?
    case "$rc" in
        0) ok "$PRECISION engines built and verified against ONNX Runtime"; return 0 ;;
        3) printf 'no %s engines built yet: building them (this takes minutes)\n' "$PRECISION" ;;
        *) [[ -z "$out" ]] || printf '%s\n' "$out" >&2
           ENGINE_PROBLEM="$(engine_problem verify "$rc")"
           return "$rc" ;;
    esac
    rc=0
    as_service_user "${cmd[@]}" build "${ENGINE_ARGS[@]}" || rc=$?
    if [[ "$rc" != 0 ]]; then
        ENGINE_PROBLEM="$(engine_problem build "$rc")"
        return "$rc"
    fi
    as_service_user "${cmd[@]}" verify "${ENGINE_ARGS[@]}" || rc=$?
    if [[ "$rc" != 0 ]]; then
        ENGINE_PROBLEM="$(engine_problem verify "$rc")"
        return "$rc"
    fi
    printf 'done: build and verify %s engines\n' "$PRECISION"
}

# engine_problem build|verify STATUS: what an exit status of `edge engines ...` means.
engine_problem() {
    local what=$1 rc=$2
    case "$what:$rc" in
        verify:1) printf '%s engines differ from ONNX Runtime (edge engines verify exit 1, output above); rebuild them: edge engines build %s --force' "$PRECISION" "${ENGINE_ARGS[*]}" ;;
        verify:3) printf 'edge engines verify finds no %s engine right after the build (exit 3)' "$PRECISION" ;;
        build:1) printf 'a model failed to build as a %s engine (edge engines build exit 1, output above)' "$PRECISION" ;;
        *:2) printf 'TensorRT or the GPU is not usable here, or the request was refused (edge engines %s exit 2, output above)' "$what" ;;
        *) printf 'edge engines %s exited %s' "$what" "$rc" ;;
    esac
}
