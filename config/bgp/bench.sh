#!/bin/sh
# The scale-out benchmark (issue 15): the lab of lab.sh with BIRD's multipath
# route, lb-proxy + ExaBGP on one instance and then on two (the shipped
# configs), three `lb-bench serve http` backends, and `hey` in the client
# namespace through the router. Prints, per instance count: new connections/s
# (hey -disable-keepalive), keep-alive requests/s, and each lb-proxy's CPU time
# per connection and per request (utime + stime from /proc/PID/stat over the
# run, divided by the connections its /metrics counted).
#
#   sudo config/bgp/bench.sh [SECONDS_PER_RUN] [CONCURRENCY]    (default 10 s, 32)
#
# Binaries: $LB_PROXY and $LB_BENCH, else the newer of target/release and target/debug.
# Needs root, iproute2, bird2, exabgp, curl, hey.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SECS=${1:-10}
CONC=${2:-32}
NAME="lbbench$$"
# The VIP and the admin endpoint, from the files that define them (lab.sh
# builds the VIP; lb-proxy.toml's [admin] listen), not repeated here.
VIP=$(sed -n 's/^VIP=//p' "$HERE/lab.sh")
ADMIN=$(sed -n '/^\[admin\]/,/^\[\[/s/^listen = "\(.*\)"/\1/p' "$HERE/lb-proxy.toml")
TICKS=$(getconf CLK_TCK)

# pick NAME: the newer of target/release/NAME and target/debug/NAME (a stale
# release binary may not know the shipped config's fields).
pick() {
    p=$(ls -t "$ROOT/target/release/$1" "$ROOT/target/debug/$1" 2>/dev/null | head -n 1)
    [ -n "$p" ] || { echo "no $1 binary: cargo build --release -p $1" >&2; exit 1; }
    echo "$p"
}
LB_PROXY=${LB_PROXY:-$(pick lb-proxy)}
LB_BENCH=${LB_BENCH:-$(pick lb-bench)}

# Cleanup runs once, on exit; a signal only exits (which runs it). WORK is
# made after the trap, so an interrupt at any point leaves nothing behind.
WORK=""
cleanup() { sh "$HERE/lab.sh" down "$NAME"; [ -z "$WORK" ] || rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
WORK=$(mktemp -d)

in_ns() { ns=$1; shift; ip netns exec "$NAME-$ns" "$@"; }

# until_ok SECONDS CMD...: retry CMD every 0.1 s for up to SECONDS.
until_ok() {
    n=$(($1 * 10)); shift
    while ! "$@" >/dev/null 2>&1; do
        n=$((n - 1)); [ "$n" -gt 0 ] || { echo "timed out: $*" >&2; exit 1; }
        sleep 0.1
    done
}

# vip_paths: the number of next hops of the router's VIP route.
vip_paths() { in_ns router ip -4 route show "$VIP" | grep -o 'via 10.77.1' | wc -l; }
has_paths() { [ "$(vip_paths)" -eq "$1" ]; }

start_lab() {
    sh "$HERE/lab.sh" up "$NAME"
    cp "$HERE/bird.conf" "$HERE/bird-kernel.conf" "$WORK/"
    in_ns router bird -c "$WORK/bird.conf" -s "$WORK/bird.ctl" -P "$WORK/bird.pid"
    in_ns backends "$LB_BENCH" serve http:backend-1=10.77.100.1:8000 \
        http:backend-2=10.77.100.2:8000 http:backend-3=10.77.100.3:8000 \
        >"$WORK/backends.log" 2>&1 &
}

# start_instance N: lb-proxy and ExaBGP in instance N's namespace.
start_instance() {
    i=$1
    # ip netns exec execs lb-proxy: $! is lb-proxy's pid (through a shell function it would not be).
    ip netns exec "$NAME-i$i" "$LB_PROXY" run --config "$HERE/lb-proxy.toml" >"$WORK/lb-proxy-$i.log" 2>&1 &
    echo $! >"$WORK/lb-proxy-$i.pid"
    sed -e "s/@SELF@/10.77.1$i.2/" -e "s/@ROUTER@/10.77.1$i.1/" "$HERE/exabgp.conf" >"$WORK/exabgp-$i.conf"
    in_ns "i$i" exabgp --env "$HERE/exabgp.env" "$WORK/exabgp-$i.conf" >"$WORK/exabgp-$i.log" 2>&1 &
}

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
connections() {
    in_ns "i$1" curl -s "http://$ADMIN/metrics" |
        awk '/^lb_frontend_connections_total/ { s += $2 } END { print s + 0 }'
}

# run LABEL INSTANCES HEY_FLAGS...: one hey run, then a line per instance.
run() {
    label=$1; instances=$2; shift 2
    for i in $instances; do
        eval "cpu0_$i=\$(cpu_ticks \$(cat $WORK/lb-proxy-$i.pid)) conn0_$i=\$(connections $i)"
    done
    rps=$(in_ns client hey -z "${SECS}s" -c "$CONC" "$@" "http://$VIP/" |
        awk '/Requests\/sec/ { print $2 }')
    printf '%-24s %10s req/s\n' "$label" "$rps"
    total=0
    for i in $instances; do
        cpu1=$(cpu_ticks "$(cat "$WORK/lb-proxy-$i.pid")"); conn1=$(connections "$i")
        eval "cpu0=\$cpu0_$i conn0=\$conn0_$i"
        total=$((total + cpu1 - cpu0))
        awk -v c="$((cpu1 - cpu0))" -v n="$((conn1 - conn0))" -v t="$TICKS" -v i="$i" -v s="$SECS" 'BEGIN {
            printf "  instance %d: %7d connections, CPU %5.2f s (%3.0f%% of a core)", i, n, c / t, 100 * c / t / s
            # Per connection only where connections are the work (not 32 keep-alive ones).
            if (n >= 1000) printf ", %6.1f us per connection", 1e6 * c / t / n
            printf "\n" }'
    done
    awk -v c="$total" -v t="$TICKS" -v r="$rps" -v s="$SECS" 'BEGIN {
        printf "  all instances: %.1f us of proxy CPU per request\n", r ? 1e6 * c / t / (r * s) : 0 }'
}

start_lab
echo "scale-out bench: $SECS s per run, $CONC concurrent, $(nproc) cores, lb-proxy $LB_PROXY"
for count in 1 2; do
    start_instance "$count"
    until_ok 30 has_paths "$count"
    instances=$(seq 1 "$count" | tr '\n' ' ')
    echo "--- $count instance(s) announced; router: $(in_ns router ip -4 route show "$VIP" | tr -s ' \n\t' ' ')"
    run "new connections/s" "$instances" -disable-keepalive
    run "keep-alive requests/s" "$instances"
done
