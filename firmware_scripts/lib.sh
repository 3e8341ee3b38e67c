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
