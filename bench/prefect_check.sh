#!/usr/bin/env bash
# End-to-end check of the Prefect deployment path on loopback:
#   prefect server (SQLite in a temp PREFECT_HOME) -> serve the deployment -> prefect deployment run.
# Usage: bench/prefect_check.sh [--param use_ray=false ...]   (extra args go to `deployment run`)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export PREFECT_HOME="$(mktemp -d /tmp/bireal-prefect.XXXX)"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 PREFECT_SERVER_API_HOST=127.0.0.1
port=${PREFECT_PORT:-4200}
export PREFECT_API_URL="http://127.0.0.1:$port/api"
cleanup() { kill -TERM ${runner:-} ${server:-} 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
prefect server start --host 127.0.0.1 --port "$port" > "$PREFECT_HOME/server.log" 2>&1 &
server=$!
for _ in $(seq 60); do curl -sf "$PREFECT_API_URL/health" >/dev/null && break; sleep 1; done
python -m pipeline.serve_flow > "$PREFECT_HOME/runner.log" 2>&1 &
runner=$!
for _ in $(seq 60); do prefect deployment ls 2>/dev/null | grep -q "bireal-pipeline/demo" && break; sleep 1; done
time prefect deployment run 'bireal-pipeline/demo' --watch "$@"
prefect flow-run ls --limit 1
