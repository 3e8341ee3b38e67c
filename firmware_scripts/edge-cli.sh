#!/usr/bin/env bash
# /usr/local/bin/edge: the appliance's CLI with the installed config. Run by root, it
# drops to the service user so files it writes (engine cache, journal) stay the service's.
set -euo pipefail

EDGE_BIN=/opt/edge/current/venv/bin/edge
EDGE_CONFIG="${EDGE_CONFIG:-/etc/edge/edge.toml}"
SERVICE_USER=edge

args=("$@")
for arg in "$@"; do
    case "$arg" in
        --config|--config=*|-c) EDGE_CONFIG="" ;;
    esac
done
[[ -n "$EDGE_CONFIG" ]] && args=(--config "$EDGE_CONFIG" "${args[@]}")

if [[ "$(id -u)" == 0 ]]; then
    exec runuser -u "$SERVICE_USER" -- "$EDGE_BIN" "${args[@]}"
fi
exec "$EDGE_BIN" "${args[@]}"
