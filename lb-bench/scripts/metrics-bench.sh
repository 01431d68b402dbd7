#!/usr/bin/env bash
# Metrics cost: (1) /metrics scrape time with 100 backends while hey drives load;
# (2) keep-alive req/s with data-plane byte metrics on vs off, interleaved in one run.
#
#   lb-bench/scripts/metrics-bench.sh [ROUNDS]
#
# Needs hey, nginx, curl and a release build of lb-proxy. Loopback only; stops by itself.
set -euo pipefail
ROUNDS=${1:-3}
KA_N=${KA_N:-50000}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LB=${LB:-$ROOT/target/release/lb-proxy}
WORK=$(mktemp -d /tmp/lb-metrics.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<NGX
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:9301; location / { return 200 "node\n"; } }
}
NGX
nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" & pids+=($!)
wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
wait_port 9301

config() { # admin_port listen_port byte_metrics backends
  printf 'workers = 1\n[admin]\nlisten = "127.0.0.1:%s"\nbyte_metrics = %s\n[[frontends]]\nname = "web"\nlisten = "127.0.0.1:%s"\n[frontends.health]\nkind = "tcp"\ninterval = "1s"\n' "$1" "$3" "$2"
  for i in $(seq 1 "$4"); do printf '[[frontends.backends]]\nname = "node-%03d"\naddress = "127.0.0.1:9301"\n' "$i"; done
}
config 9380 9381 true 100 >"$WORK/hundred.toml"
config 9382 9383 true 3 >"$WORK/on.toml"
config 9384 9385 false 3 >"$WORK/off.toml"
declare -A lbpid
for c in hundred on off; do "$LB" --log warn run --config "$WORK/$c.toml" & pids+=($!); lbpid[$c]=$!; done
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)
for p in 9381 9383 9385; do wait_port $p; done

echo "## scrape time, 100 backends, under load"
hey -z 6s -c 50 http://127.0.0.1:9381/ >/dev/null & HEY=$!
sleep 1
for i in $(seq 1 40); do curl -s -o /dev/null -w '%{time_total}\n' http://127.0.0.1:9380/metrics; sleep 0.1; done >"$WORK/scrapes.txt"
wait $HEY
lines=$(curl -s http://127.0.0.1:9380/metrics | grep -c '^lb_')
python3 - "$WORK/scrapes.txt" "$lines" <<'PY'
import sys, statistics
xs = sorted(float(l) * 1000 for l in open(sys.argv[1]))
print(f"scrapes: {len(xs)}, series lines: {sys.argv[2]}, median {statistics.median(xs):.2f} ms, p90 {xs[int(len(xs)*0.9)-1]:.2f} ms, max {xs[-1]:.2f} ms")
PY

echo "## keep-alive req/s, byte metrics on vs off (hey -n $KA_N -c 50), order alternating"
for r in $(seq 1 "$ROUNDS"); do
  # Alternate the order so neither side always runs second.
  order="on off"; [ $((r % 2)) -eq 0 ] && order="off on"
  for mode in $order; do
    port=$([ $mode = on ] && echo 9383 || echo 9385)
    c0=$(cpu_ticks "${lbpid[$mode]}")
    rps=$(hey -n "$KA_N" -c 50 "http://127.0.0.1:$port/" | awk '/Requests\/sec/ {print $2}')
    c1=$(cpu_ticks "${lbpid[$mode]}")
    echo "$mode $rps $(awk -v a="$c0" -v b="$c1" -v t="$TICK" -v n="$KA_N" 'BEGIN{printf "%.2f", (b-a)/t*1e6/n}')"
  done
done | tee "$WORK/ka.txt"
python3 - "$WORK/ka.txt" <<'PY'
import sys, statistics, collections
d = collections.defaultdict(list); cpu = collections.defaultdict(list)
for l in open(sys.argv[1]):
    m, v, c = l.split(); d[m].append(float(v)); cpu[m].append(float(c))
pairs = sorted(a / b for a, b in zip(d["on"], d["off"]))
print(f"on/off per round: median {statistics.median(pairs):.3f} (min {pairs[0]:.3f}, max {pairs[-1]:.3f})")
on, off = statistics.median(d["on"]), statistics.median(d["off"])
con, coff = statistics.median(cpu["on"]), statistics.median(cpu["off"])
print(f"median on {on:.0f} req/s, off {off:.0f} req/s, on/off {on/off:.3f}")
print(f"proxy CPU per request: on {con:.2f} us, off {coff:.2f} us, on/off {con/coff:.3f}")
PY
