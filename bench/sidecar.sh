#!/usr/bin/env bash
# The retraining sidecar end to end on the tiny models, as a user runs it:
#   1. serve models/tiny-zeda with capture on;  2. load it with locust for 60 s;
#   3. zeda retrain on the captured traffic, promoting into the running server if the gate passes.
# Usage: bash bench/sidecar.sh [OUT_DIR]   (needs build/data: `zeda data build --out build/data`)
set -euo pipefail
out=${1:-build/sidecar}
port=${PORT:-8011}
key=sidecar-admin
rm -rf "$out" && mkdir -p "$out"
zeda serve --model models/tiny-zeda --port "$port" --capture-db "$out/capture.db" --admin-key "$key" \
  > "$out/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do sleep 1; done
locust -f loadtest/locustfile.py --headless -H "http://127.0.0.1:$port" -u 8 -r 8 --run-time 60s \
  --stop-timeout 60 --only-summary > "$out/locust.log" 2>&1
zeda capture export --db "$out/capture.db" --out "$out/captured.jsonl"
start=$(date +%s)
zeda retrain --capture "$out/capture.db" --base models/tiny-zeda --out "$out/retrain" \
  --server "http://127.0.0.1:$port" --admin-key "$key" 2> "$out/retrain.err" | tee "$out/retrain.log"
echo "retrain wall time: $(( $(date +%s) - start )) s"
curl -sf -H "Authorization: Bearer $key" "http://127.0.0.1:$port/admin/status" | tee "$out/status.json"
echo
