#!/usr/bin/env bash
# Cost of the hop model: keep-alive req/s and new connections/s through plain
# backends vs the node hop with SNAT (Cluster policy, cross-node SNAT binds every
# cross-node connection to a node IP), same three nginx pods, interleaved rounds.
#
#   lb-bench/scripts/hop-bench.sh [ROUNDS]
set -euo pipefail
ROUNDS=${1:-3}
KA_N=${KA_N:-50000}
NEW_N=${NEW_N:-20000}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LB=${LB:-$ROOT/target/release/lb-proxy}
WORK=$(mktemp -d /tmp/lb-hop.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<NGX
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.2.1:9401; listen 127.0.2.2:9401; listen 127.0.2.3:9401; location / { return 200 "pod\n"; } }
}
NGX
nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" & pids+=($!)
wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/$1/$2) 2>/dev/null && return 0; sleep 0.05; done; echo "$1:$2 never opened" >&2; exit 1; }
for i in 1 2 3; do wait_port 127.0.2.$i 9401; done

cat >"$WORK/plain.toml" <<CFG
workers = 1
[admin]
listen = "127.0.0.1:9480"
[[frontends]]
name = "plain"
listen = "127.0.0.1:9481"
[frontends.health]
kind = "tcp"
[[frontends.backends]]
name = "pod-1"
address = "127.0.2.1:9401"
[[frontends.backends]]
name = "pod-2"
address = "127.0.2.2:9401"
[[frontends.backends]]
name = "pod-3"
address = "127.0.2.3:9401"
CFG
cat >"$WORK/hop.toml" <<CFG
workers = 1
[admin]
listen = "127.0.0.1:9482"
[[frontends]]
name = "hop"
listen = "127.0.0.1:9483"
client_address = "snat"
[frontends.service]
external_traffic_policy = "Cluster"
snat = "cross-node"
[frontends.health]
kind = "tcp"
[[frontends.nodes]]
name = "node-1"
address = "127.0.1.1"
endpoints = ["127.0.2.1:9401"]
[[frontends.nodes]]
name = "node-2"
address = "127.0.1.2"
endpoints = ["127.0.2.2:9401"]
[[frontends.nodes]]
name = "node-3"
address = "127.0.1.3"
endpoints = ["127.0.2.3:9401"]
CFG
"$LB" --log warn run --config "$WORK/plain.toml" & pids+=($!)
"$LB" --log warn run --config "$WORK/hop.toml" & pids+=($!)
wait_port 127.0.0.1 9481; wait_port 127.0.0.1 9483

for r in $(seq 1 "$ROUNDS"); do
  for t in plain:9481 hop:9483; do
    rps=$(hey -n "$KA_N" -c 50 "http://127.0.0.1:${t#*:}/" | awk '/Requests\/sec/ {print $2}')
    echo "${t%%:*} ka $rps"
  done
  for t in plain:9481 hop:9483; do
    rps=$(hey -disable-keepalive -n "$NEW_N" -c 50 "http://127.0.0.1:${t#*:}/" | awk '/Requests\/sec/ {print $2}')
    echo "${t%%:*} new $rps"
  done
done | tee "$WORK/res.txt"
python3 - "$WORK/res.txt" <<'PY'
import sys, statistics, collections
d = collections.defaultdict(list)
for l in open(sys.argv[1]):
    t, m, v = l.split(); d[(t, m)].append(float(v))
for m, name in [("ka", "keep-alive req/s"), ("new", "new connections/s")]:
    p, h = statistics.median(d[("plain", m)]), statistics.median(d[("hop", m)])
    print(f"{name}: plain {p:.0f}, hop+SNAT {h:.0f}, hop/plain {h/p:.3f}")
PY
