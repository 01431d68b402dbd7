#!/usr/bin/env bash
# Side-by-side TCP benchmark: direct to one backend, lb-proxy, HAProxy (mode tcp).
# Same three nginx backends, same hey load, interleaved rounds; prints medians.
#
#   lb-bench/scripts/tcp-compare.sh [ROUNDS] [WORKERS]
#
# Needs: hey, nginx, haproxy, iperf3, python3, and a release build of lb-proxy
# (cargo build --release -p lb-proxy). Everything runs on 127.0.0.0/8 and stops by itself.
set -euo pipefail
ROUNDS=${ROUNDS:-${1:-3}}
WORKERS=${WORKERS:-${2:-1}}
KA_N=${KA_N:-50000}
NEW_N=${NEW_N:-20000}
CONC=${CONC:-50}
IDLE_CONNS=${IDLE_CONNS:-9000}
BULK_SECS=${BULK_SECS:-5}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LB=${LB:-$ROOT/target/release/lb-proxy}
WORK=$(mktemp -d /tmp/lb-compare.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

ulimit -n 20000 || true

# --- backends: three nginx servers answering a small body, and an iperf3 sink --
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 19000; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  client_header_timeout 300s;
  server { listen 127.0.0.1:9101 reuseport; location / { add_header X-Node node-1; return 200 "node-1\n"; } }
  server { listen 127.0.0.1:9102 reuseport; location / { add_header X-Node node-2; return 200 "node-2\n"; } }
  server { listen 127.0.0.1:9103 reuseport; location / { add_header X-Node node-3; return 200 "node-3\n"; } }
}
EOF
nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" & pids+=($!)
iperf3 -s -B 127.0.0.1 -p 9201 >/dev/null 2>&1 & pids+=($!)
wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
# Backends first: the balancers' first probes must find them up.
for p in 9101 9102 9103 9201; do wait_port $p; done

# --- lb-proxy ------------------------------------------------------------------
# ACCEPT=shared runs every lb-proxy variant with one listener shared by its workers.
ACCEPT=${ACCEPT:-reuseport}
cat >"$WORK/lb.toml" <<EOF
workers = $WORKERS
[admin]
listen = "127.0.0.1:9280"
[[frontends]]
name = "http"
listen = "127.0.0.1:9181"
accept = "$ACCEPT"
[frontends.health]
kind = "tcp"
[[frontends.backends]]
name = "node-1"
address = "127.0.0.1:9101"
[[frontends.backends]]
name = "node-2"
address = "127.0.0.1:9102"
[[frontends.backends]]
name = "node-3"
address = "127.0.0.1:9103"
[[frontends]]
name = "bulk"
listen = "127.0.0.1:9182"
[[frontends.backends]]
name = "iperf"
address = "127.0.0.1:9201"
EOF
"$LB" --log warn run --config "$WORK/lb.toml" & LB_PID=$!; pids+=($LB_PID)
# The same balancer with splice(2) instead of the userspace copy, to compare the two.
sed -e 's/^name = "http"/name = "http"\ncopy = "splice"/' -e 's/^name = "bulk"/name = "bulk"\ncopy = "splice"/' \
    -e 's/127.0.0.1:9280/127.0.0.1:9281/' -e 's/127.0.0.1:9181/127.0.0.1:9183/' -e 's/127.0.0.1:9182/127.0.0.1:9184/' \
    "$WORK/lb.toml" >"$WORK/lb-splice.toml"
"$LB" --log warn run --config "$WORK/lb-splice.toml" & SPLICE_PID=$!; pids+=($SPLICE_PID)
# And with the plain userspace copy (the default, `auto`, switches to splice for bulk runs).
sed -e 's/^name = "http"/name = "http"\ncopy = "userspace"/' -e 's/^name = "bulk"/name = "bulk"\ncopy = "userspace"/' \
    -e 's/127.0.0.1:9280/127.0.0.1:9282/' -e 's/127.0.0.1:9181/127.0.0.1:9185/' -e 's/127.0.0.1:9182/127.0.0.1:9186/' \
    "$WORK/lb.toml" >"$WORK/lb-userspace.toml"
"$LB" --log warn run --config "$WORK/lb-userspace.toml" & USER_PID=$!; pids+=($USER_PID)

# --- HAProxy, mode tcp, 5-tuple-like hash ---------------------------------------
cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread $WORKERS
  maxconn 9900
defaults
  mode tcp
  timeout connect 5s
  timeout client 300s
  timeout server 300s
frontend http
  bind 127.0.0.1:9191
  default_backend nodes
backend nodes
  # Every client is on 127.0.0.1, so hashing the source port is the 5-tuple hash here.
  balance hash src_port
  hash-type consistent
  server node-1 127.0.0.1:9101
  server node-2 127.0.0.1:9102
  server node-3 127.0.0.1:9103
frontend bulk
  bind 127.0.0.1:9192
  default_backend iperf
backend iperf
  server iperf 127.0.0.1:9201
EOF
haproxy -f "$WORK/haproxy.cfg" -db >/dev/null 2>&1 & HA_PID=$!; pids+=($HA_PID)

for p in 9181 9183 9185 9191; do wait_port $p; done

cpu_ticks() { [ "$1" = 0 ] && { echo 0; return; }; awk '{print $14+$15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)

declare -A port=( [direct]=9101 [lb-proxy]=9181 [lb-userspace]=9185 [lb-splice]=9183 [haproxy]=9191 )
declare -A bulkport=( [direct]=9201 [lb-proxy]=9182 [lb-userspace]=9186 [lb-splice]=9184 [haproxy]=9192 )
declare -A pid=( [direct]=0 [lb-proxy]=$LB_PID [lb-userspace]=$USER_PID [lb-splice]=$SPLICE_PID [haproxy]=$HA_PID )
targets=(direct lb-proxy lb-userspace lb-splice haproxy)
RES="$WORK/results.tsv"
: >"$RES"

run_hey() { # target mode n -> appends rps, p99, cpu_us_per_req
  local t=$1 mode=$2 n=$3 extra=()
  [ "$mode" = new ] && extra=(-disable-keepalive)
  local c0; c0=$(cpu_ticks "${pid[$t]}")
  local out; out=$(hey -n "$n" -c "$CONC" "${extra[@]}" "http://127.0.0.1:${port[$t]}/")
  local c1; c1=$(cpu_ticks "${pid[$t]}")
  local rps p99 errs
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '/ 99% in / {print $3*1000}' <<<"$out")
  errs=$(grep -c "Error distribution" <<<"$out" || true)
  local cpu_us; cpu_us=$(awk -v a="$c0" -v b="$c1" -v t="$TICK" -v n="$n" 'BEGIN{printf "%.1f", (b-a)/t*1e6/n}')
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$mode" "$rps" "$p99" "$cpu_us" "$errs" >>"$RES"
}

run_bulk() { # target streams -> Gbit/s
  local t=$1 s=$2 out
  out=$(iperf3 -c 127.0.0.1 -p "${bulkport[$t]}" -P "$s" -t "$BULK_SECS" -J 2>/dev/null || true)
  local g; g=$(python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["end"]["sum_received"]["bits_per_second"]/1e9,2))' <<<"$out" 2>/dev/null || echo nan)
  printf '%s\tbulk%s\t%s\t\t\t\n' "$t" "$s" "$g" >>"$RES"
}

for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS" >&2
  for t in "${targets[@]}"; do run_hey "$t" ka "$KA_N"; done
  for t in "${targets[@]}"; do run_hey "$t" new "$NEW_N"; done
  for t in "${targets[@]}"; do run_bulk "$t" 1; done
  for t in "${targets[@]}"; do run_bulk "$t" 4; done
done

# --- memory per idle connection -------------------------------------------------
idle_mem() { # target -> KiB per idle proxied connection
  local t=$1 p=${pid[$1]}
  python3 - "$p" "${port[$t]}" "$IDLE_CONNS" <<'PY'
import socket, sys, time, resource
pid, port, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
# One warm-up connection so lazily allocated per-thread state is not counted.
w = socket.create_connection(("127.0.0.1", port)); w.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"); w.recv(4096)
before = rss_kib()
socks = []
for i in range(n):
    s = socket.socket(); s.bind((f"127.0.{2 + i // 60000}.{1 + (i // 250) % 250}", 0)); s.connect(("127.0.0.1", port)); socks.append(s)
# Each connection gets one request/response so both legs are established through the proxy.
for s in socks: s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
for s in socks: s.recv(4096)
time.sleep(1)
after = rss_kib()
print(f"{(after - before) / n:.2f}")
for s in socks: s.close()
PY
}
for t in lb-proxy lb-userspace lb-splice haproxy; do
  printf '%s\tidle_kib\t%s\t\t\t\n' "$t" "$(idle_mem "$t")" >>"$RES"
done

python3 - "$RES" "$ROUNDS" "$WORKERS" "$ACCEPT" <<'PY'
import sys, statistics, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
rounds, workers, accept = sys.argv[2], sys.argv[3], sys.argv[4]
d = collections.defaultdict(lambda: collections.defaultdict(list))
for t, mode, a, b, c, errs in rows:
    d[mode][t].append((float(a) if a not in ("", "nan") else float("nan"),
                       float(b) if b else None, float(c) if c else None, int(errs or 0)))
def med(xs):
    xs = [x for x in xs if x is not None and x == x]
    return statistics.median(xs) if xs else float("nan")
print(f"medians of {rounds} interleaved rounds, {workers} worker thread(s), lb-proxy accept = {accept}\n")
T = ["direct", "lb-proxy", "lb-userspace", "lb-splice", "haproxy"]
print("| metric | direct | lb-proxy (auto) | lb-proxy (userspace) | lb-proxy (splice) | haproxy | lb/direct | lb/haproxy |")
print("|---|---|---|---|---|---|---|---|")
names = {"ka": "keep-alive req/s", "new": "new conn req/s", "bulk1": "bulk Gbit/s, 1 stream", "bulk4": "bulk Gbit/s, 4 streams", "idle_kib": "RSS KiB per idle conn"}
f = lambda x: "-" if x is None or x != x else f"{x:.2f}" if x < 100 else f"{x:.0f}"
def ratio(a, b):
    return a / b if b == b and b and a == a else float("nan")
def row(label, v, ratios=True):
    cells = " | ".join(f(v.get(t)) for t in T)
    r1 = f(ratio(v.get("lb-proxy", float("nan")), v.get("direct", float("nan")))) if ratios else ""
    r2 = f(ratio(v.get("lb-proxy", float("nan")), v.get("haproxy", float("nan"))))
    print(f"| {label} | {cells} | {r1} | {r2} |")
for mode in ["ka", "new", "bulk1", "bulk4", "idle_kib"]:
    if mode not in d: continue
    row(names[mode], {t: med([r[0] for r in d[mode].get(t, [])]) for t in T})
    if mode in ("ka", "new"):
        short = names[mode].split(" req")[0]
        row(f"{short} p99 ms", {t: med([r[1] for r in d[mode].get(t, [])]) for t in T}, ratios=False)
        cpu = {t: med([r[2] for r in d[mode].get(t, [])]) for t in T[1:]}
        row(f"{short} proxy CPU µs/req", cpu, ratios=False)
        e = sum(r[3] for t in d[mode] for r in d[mode][t])
        if e: print(f"| {names[mode]} runs with errors | {e} | | | | | | |")
PY
