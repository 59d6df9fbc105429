#!/usr/bin/env bash
# Upload benchmark: streams one large valid chat dataset through `POST /v1/files` with curl and
# prints one JSON line with the throughput and the server's peak resident memory.
#
#   scripts/bench-upload.sh [SIZE_MIB]        (default 1024)
#
# Uses target/release/ferrotune (or $FERROTUNE_BIN). The server runs with the embedded defaults in
# a temporary data dir unless FERROTUNE_DATABASE_URL / FERROTUNE_STORAGE_URL (and S3 settings) are
# set in the environment, which it then uses.
set -euo pipefail

size_mib=${1:-1024}
bin=${FERROTUNE_BIN:-target/release/ferrotune}
[ -x "$bin" ] || { echo "build first: cargo build --release (or set FERROTUNE_BIN)" >&2; exit 1; }

work=$(mktemp -d)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

python3 - "$work/big.jsonl" "$size_mib" <<'PY'
import json, sys
path, mib = sys.argv[1], int(sys.argv[2])
block = "".join(
    json.dumps({"messages": [{"role": "user", "content": f"Question number {i}?"},
                             {"role": "assistant", "content": f"Answer {i}."}]}) + "\n"
    for i in range(9000)
).encode()
with open(path, "wb") as f:
    written = 0
    while written < mib << 20:
        f.write(block)
        written += len(block)
PY
bytes=$(stat -c %s "$work/big.jsonl")

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
FERROTUNE_DATA_DIR="$work/data" "$bin" --log warn serve --bind "127.0.0.1:$port" --max-upload-size 64GiB &
server_pid=$!
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  sleep 0.1
done

timing=$(curl -s -o "$work/response.json" -w '%{http_code} %{time_total}' \
  -F purpose=fine-tune -F "file=@$work/big.jsonl" "http://127.0.0.1:$port/v1/files")
read -r status seconds <<<"$timing"
peak_kib=$(awk '/VmHWM/ {print $2}' "/proc/$server_pid/status")
[ "$status" = 200 ] || { echo "upload failed: HTTP $status $(head -c 500 "$work/response.json")" >&2; exit 1; }

python3 - "$bytes" "$seconds" "$peak_kib" "$work/response.json" <<'PY'
import json, sys
nbytes, seconds, peak_kib, response = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
file = json.load(open(response))
print(json.dumps({
    "bench": "upload", "bytes": nbytes, "examples": file["examples"], "seconds": round(seconds, 2),
    "mb_per_s": round(nbytes / 1e6 / seconds, 1), "peak_rss_mib": round(peak_kib / 1024, 1),
}))
PY
