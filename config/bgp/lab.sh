#!/bin/sh
# The scale-out lab (issue 15): network namespaces joined by veth pairs, used
# by tests/tests/scale_out.rs and by bench.sh, so both build the same network.
#
#   lab.sh up NAME      create NAME-client, NAME-router, NAME-i1..NAME-i3, NAME-backends
#   lab.sh down NAME    kill every process left in them and delete them
#
#   NAME-client   eth0 10.77.0.2/24, default via the router
#   NAME-router   c0 10.77.0.1/24; iN 10.77.1N.1/24 towards instance N; forwarding on,
#                 fib_multipath_hash_policy=1 (L4: ECMP hashes the 5-tuple); BIRD runs here
#   NAME-iN       eth0 10.77.1N.2/24 (BGP to 10.77.1N.1, default route), be 10.77.2N.2/24
#                 towards the backends; the VIP 10.77.255.1/32 on lo; lb-proxy + ExaBGP run here
#   NAME-backends bN 10.77.2N.1/24 towards instance N; the backends 10.77.100.1..3 on lo
#
# Interfaces are created directly inside their namespaces, so their names never
# meet in the root namespace; only the namespace names carry NAME. Addresses
# exist only inside these namespaces. Needs root and iproute2.
set -eu

VIP=10.77.255.1
INSTANCES="1 2 3"
BACKENDS="1 2 3"

# in NS CMD...: run CMD inside namespace NS.
in_ns() { ns=$1; shift; ip netns exec "$ns" "$@"; }

# Loopback up, and no reverse-path filter (replies and ECMP paths are asymmetric by design).
ns_base() {
    ip netns add "$1"
    in_ns "$1" ip link set lo up
    in_ns "$1" sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
}

# veth NS_A IF_A ADDR_A NS_B IF_B ADDR_B: a veth pair, one end in each namespace.
veth() {
    ip link add "$2" netns "$1" type veth peer name "$5" netns "$4"
    in_ns "$1" ip addr add "$3" dev "$2"
    in_ns "$1" ip link set "$2" up
    in_ns "$4" ip addr add "$6" dev "$5"
    in_ns "$4" ip link set "$5" up
}

up() {
    n=$1
    for ns in client router backends; do ns_base "$n-$ns"; done
    in_ns "$n-router" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.fib_multipath_hash_policy=1
    veth "$n-client" eth0 10.77.0.2/24 "$n-router" c0 10.77.0.1/24
    in_ns "$n-client" ip route add default via 10.77.0.1
    for b in $BACKENDS; do
        in_ns "$n-backends" ip addr add "10.77.100.$b/32" dev lo
    done
    for i in $INSTANCES; do
        ns="$n-i$i"
        ns_base "$ns"
        veth "$n-router" "i$i" "10.77.1$i.1/24" "$ns" eth0 "10.77.1$i.2/24"
        veth "$n-backends" "b$i" "10.77.2$i.1/24" "$ns" be "10.77.2$i.2/24"
        in_ns "$ns" ip addr add "$VIP/32" dev lo
        in_ns "$ns" ip route add default via "10.77.1$i.1"
        in_ns "$ns" ip route add 10.77.100.0/24 via "10.77.2$i.1"
    done
}

down() {
    n=$1
    for ns in client router backends $(for i in $INSTANCES; do printf 'i%s ' "$i"; done); do
        if ip netns pids "$n-$ns" >/dev/null 2>&1; then
            for pid in $(ip netns pids "$n-$ns"); do kill -9 "$pid" 2>/dev/null || true; done
            ip netns del "$n-$ns" 2>/dev/null || true
        fi
    done
}

case "${1:-}" in
    up) up "$2" ;;
    down) down "$2" ;;
    *) echo "usage: $0 up|down NAME" >&2; exit 2 ;;
esac
