#!/usr/bin/env bash
# Health check of a running edge appliance: the DICOM listener, the web server and the
# journal. Prints one line per check and exits 0 only when all three are healthy.
# Used by update.sh (rollback decision), install.sh, and monitoring (e.g. a cron job or
# a Prometheus blackbox/textfile exporter).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: healthcheck.sh [options]

  --config FILE       read ports, AE title and data dir from the appliance's TOML config
                      (options given explicitly win)
  --host HOST         host of both listeners (default 127.0.0.1)
  --dicom-port PORT   DICOM port (default 11112)
  --web-port PORT     web port (default 8080)
  --ae-title AET      called AE title of the appliance (default EDGE_AI)
  --calling-aet AET   our AE title in the C-ECHO (default EDGE_HEALTH)
  --data-dir DIR      storage dir holding journal.sqlite3 (default /var/lib/edge)
  --timeout SECONDS   per network check (default 5)
  --tcp-only          check the DICOM port with a TCP connect instead of a C-ECHO
Exit status: 0 healthy, 1 a check failed, 2 bad usage.
EOF
}

bad_usage() { echo "error: $*" >&2; exit 2; }

declare -A opt=()
CONFIG=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --config|--host|--dicom-port|--web-port|--ae-title|--calling-aet|--data-dir|--timeout)
            [[ $# -ge 2 && -n "$2" ]] || bad_usage "option $1 needs a value"
            if [[ "$1" == --config ]]; then CONFIG="$2"; else opt[${1#--}]="$2"; fi
            shift 2 ;;
        --tcp-only) opt[tcp-only]=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; bad_usage "unknown option: $1" ;;
    esac
done

DICOM_HOST=127.0.0.1
WEB_HOST=127.0.0.1
DICOM_PORT=11112
WEB_PORT=8080
WEB_SCHEME=http
AE_TITLE=EDGE_AI
CALLING_AET=EDGE_HEALTH
DATA_DIR=/var/lib/edge
TIMEOUT=5
TCP_ONLY=0

# A listener bound to every address is checked on the loopback address.
local_host() {
    case "$1" in
        ""|0.0.0.0|::|"[::]") echo 127.0.0.1 ;;
        *) echo "$1" ;;
    esac
}

pick_python() {
    local p
    for p in /opt/edge/current/venv/bin/python python3; do
        if command -v "$p" >/dev/null 2>&1; then echo "$p"; return 0; fi
    done
    return 1
}

read_config() {
    local python key value
    [[ -r "$CONFIG" ]] || bad_usage "--config: cannot read $CONFIG"
    python="$(pick_python)" || bad_usage "--config needs python3 to read TOML"
    while IFS='=' read -r key value; do
        case "$key" in
            dicom_host) DICOM_HOST="$(local_host "$value")" ;;
            web_host) WEB_HOST="$(local_host "$value")" ;;
            dicom_port) DICOM_PORT="$value" ;;
            web_port) WEB_PORT="$value" ;;
            ae_title) AE_TITLE="$value" ;;
            data_dir) DATA_DIR="$value" ;;
            tls) TCP_ONLY=1 ;;
            web_tls) WEB_SCHEME=https ;;
        esac
    done < <("$python" - "$CONFIG" <<'PY'
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
with open(sys.argv[1], "rb") as fh:
    cfg = tomllib.load(fh)
node, web, storage = cfg.get("node", {}), cfg.get("web", {}), cfg.get("storage", {})
values = {
    "dicom_host": node.get("host"), "dicom_port": node.get("port"),
    "ae_title": node.get("ae_title"), "web_host": web.get("host"),
    "web_port": web.get("port"), "data_dir": storage.get("dir"),
    "tls": "1" if node.get("tls_cert") else None,
    "web_tls": "1" if web.get("tls_cert") else None,
}
for key, value in values.items():
    if value is not None and "\n" not in str(value):
        print(f"{key}={value}")
PY
    ) || bad_usage "--config: $CONFIG is not readable TOML"
}

[[ -n "$CONFIG" ]] && read_config
[[ -n "${opt[host]:-}" ]] && { DICOM_HOST="${opt[host]}"; WEB_HOST="${opt[host]}"; }
DICOM_PORT="${opt[dicom-port]:-$DICOM_PORT}"
WEB_PORT="${opt[web-port]:-$WEB_PORT}"
AE_TITLE="${opt[ae-title]:-$AE_TITLE}"
CALLING_AET="${opt[calling-aet]:-$CALLING_AET}"
DATA_DIR="${opt[data-dir]:-$DATA_DIR}"
TIMEOUT="${opt[timeout]:-$TIMEOUT}"
TCP_ONLY="${opt[tcp-only]:-$TCP_ONLY}"
for n in "$DICOM_PORT" "$WEB_PORT" "$TIMEOUT"; do
    [[ "$n" =~ ^[0-9]+$ ]] || bad_usage "not a number: $n (ports and --timeout)"
done

FAILED=0
pass() { echo "ok: $*"; }
fail() { echo "FAIL: $*"; FAILED=1; }
first_line() { tr -s '\n' ' ' | cut -c1-200; }

# DCMTK's echoscu: pynetdicom installs an app of the same name into the virtual
# environment's bin folder, first on PATH when that environment is activated
dcmtk_echoscu() {
    local candidate
    while IFS= read -r candidate; do
        if "$candidate" --version 2>/dev/null | grep -qi dcmtk; then
            echo "$candidate"
            return 0
        fi
    done < <(type -ap echoscu)
    return 1
}

check_dicom() {
    local where="$AE_TITLE@$DICOM_HOST:$DICOM_PORT" out echoscu
    if [[ "$TCP_ONLY" != 1 ]] && echoscu="$(dcmtk_echoscu)"; then
        if out="$("$echoscu" -aet "$CALLING_AET" -aec "$AE_TITLE" -to "$TIMEOUT" -ta "$TIMEOUT" \
                -td "$TIMEOUT" "$DICOM_HOST" "$DICOM_PORT" 2>&1)"; then
            pass "dicom: C-ECHO to $where answered"
        else
            fail "dicom: C-ECHO to $where failed: $(first_line <<<"$out")"
        fi
        return 0
    fi
    # shellcheck disable=SC2016  # $1 and $2 expand in the inner bash
    if timeout "$TIMEOUT" bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$DICOM_HOST" "$DICOM_PORT" 2>/dev/null; then
        pass "dicom: $DICOM_HOST:$DICOM_PORT accepts connections (TCP only)"
    else
        fail "dicom: nothing accepts connections on $DICOM_HOST:$DICOM_PORT"
    fi
}

check_web() {
    # Over HTTPS the box's certificate names the box, not 127.0.0.1: this local check does
    # not verify it (-k); it asks whether the service is healthy, not who it is.
    local url="$WEB_SCHEME://$WEB_HOST:$WEB_PORT/healthz" out
    if command -v curl >/dev/null 2>&1; then
        if out="$(curl -fsSk -m "$TIMEOUT" -o /dev/null "$url" 2>&1)"; then
            pass "web: $url answered 200"
        else
            fail "web: $url: $(first_line <<<"$out")"
        fi
        return 0
    fi
    if out="$(python3 - "$url" "$TIMEOUT" <<'PY' 2>&1
import ssl, sys, urllib.request
local = ssl.create_default_context()
local.check_hostname, local.verify_mode = False, ssl.CERT_NONE
with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]), context=local) as resp:
    sys.exit(0 if resp.status == 200 else 1)
PY
    )"; then
        pass "web: $url answered 200"
    else
        fail "web: $url: $(tail -n 1 <<<"$out" | first_line)"
    fi
}

# Opening a WAL database can create its -wal/-shm files: run as the data dir's owner, so
# root never leaves files the service cannot open.
as_owner() {
    local owner
    owner="$(stat -c %U "$DATA_DIR" 2>/dev/null || echo root)"
    if [[ "$(id -u)" == 0 && "$owner" != root && "$owner" != UNKNOWN ]]; then
        runuser -u "$owner" -- "$@"
    else
        "$@"
    fi
}

check_journal() {
    local journal="$DATA_DIR/journal.sqlite3" out
    if [[ ! -f "$journal" ]]; then
        fail "journal: $journal not found"
        return 0
    fi
    if command -v sqlite3 >/dev/null 2>&1; then
        out="$(as_owner timeout 60 sqlite3 -readonly "$journal" 'PRAGMA busy_timeout=5000; PRAGMA quick_check;' 2>&1 || true)"
    else
        out="$(as_owner timeout 60 python3 - "$journal" <<'PY' 2>&1 || true
import sqlite3, sys
con = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, timeout=5)
print("\n".join(row[0] for row in con.execute("PRAGMA quick_check")))
PY
        )"
    fi
    # sqlite3 echoes busy_timeout's value first; the check's answer is the last line.
    if [[ "$(tail -n 1 <<<"$out")" == ok ]]; then
        pass "journal: $journal quick_check ok"
    else
        fail "journal: $journal: $(first_line <<<"$out")"
    fi
}

check_dicom
check_web
check_journal
exit "$FAILED"
