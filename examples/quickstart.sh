#!/bin/sh
# Runs a real job end to end against the simulator that ships with batcher: no API key, no cost.
# Usage: sh examples/quickstart.sh [PORT]
set -eu
port="${1:-8765}"
here="$(cd "$(dirname "$0")" && pwd)"
out="${BATCHER_QUICKSTART_OUT:-out}"
mkdir -p "$out"
batcher simulate --port "$port" --latency-ms 50 &
sim=$!
trap 'kill $sim 2>/dev/null || true' EXIT INT TERM
python3 - "$port" <<'PY'
import socket, sys, time
deadline = time.time() + 20
while time.time() < deadline:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=0.5).close()
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("simulator did not start")
PY
batcher estimate "$here/prompts.jsonl" --model gpt-4o-mini -p max_tokens=64
batcher run "$here/prompts.jsonl" -o "$out/answers.parquet" \
    --base-url "http://127.0.0.1:$port/v1" --model gpt-4o-mini -p max_tokens=64 --no-progress
batcher status "$out/answers.parquet"
python3 - "$out/answers.parquet" <<'PY'
import sys
import pyarrow.parquet as pq
table = pq.read_table(sys.argv[1], columns=["id", "status", "finish_reason", "total_tokens", "output"])
for row in table.slice(0, 3).to_pylist():
    print(row)
print(f"{table.num_rows} rows in {sys.argv[1]}")
PY
