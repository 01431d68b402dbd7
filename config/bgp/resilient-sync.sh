#!/bin/sh
# The resilient variant's controller (issue 15), run in the router namespace
# next to BIRD with bird-kernel-resilient.conf: BIRD 2.0 cannot install kernel
# nexthop objects, so BIRD puts the VIP's merged ECMP route in kernel table 100
# and this loop mirrors that route's next hops into a resilient nexthop group,
# which the main table's VIP route uses:
#
#   ip nexthop replace id GROUP group A/B type resilient buckets 128 idle_timer 1
#   ip route replace 10.77.255.1/32 nhid GROUP
#
# Replacing a resilient group keeps every bucket whose next hop stays, so a
# join moves only idle buckets (no packet for idle_timer seconds) to the new
# member: established flows that keep talking stay where they are. A member
# that leaves loses its buckets at once (they must go somewhere).
#
#   resilient-sync.sh [INTERVAL_SECONDS]   (default 0.1; runs until killed)
#
# No `set -e`: a transient `ip` failure must not end the loop and leave the
# VIP on a stale group; sync_once logs it and the next tick retries.
set -u

VIP=10.77.255.1/32
TABLE=100
GROUP=1000
BUCKETS=128
# 1 s suits the lab, whose long flows talk every 100 ms and whose joins should
# take buckets quickly; in production set it above the longest quiet gap of the
# flows you want to keep, since an idle bucket is one a join may take.
IDLE_TIMER=1
INTERVAL=${1:-0.1}

# Prints "GATEWAY DEV" per next hop of the VIP's route in $TABLE (one line for
# a single-path route, one per "nexthop" line for a multipath one).
next_hops() {
    ip -4 route show table "$TABLE" "$VIP" 2>/dev/null |
        sed -n 's/.*via \([0-9.]*\) dev \([^ ]*\).*/\1 \2/p'
}

# A nexthop object per gateway, its id from the address's last two octets
# (10.77.11.2 -> 11*256+2), so ids are stable across changes.
nexthop_id() {
    echo "$1" | awk -F. '{ print $3 * 256 + $4 }'
}

# Installs the group of next hops $1 ("GATEWAY DEV" lines) as members $2
# ("ID/ID..."), or removes the VIP's route when there are none; fails if any
# `ip` command does.
install() {
    if [ -z "$2" ]; then
        # Deleting what is already gone is not a failure.
        ip route del "$VIP" 2>/dev/null || true
        ip nexthop del id "$GROUP" 2>/dev/null || true
        return 0
    fi
    # Members' nexthop objects first (replacing one that is not in the group
    # yet changes nothing that routes). The loop runs in a subshell: its
    # `exit 1` is the pipeline's status.
    echo "$1" | while read -r gw dev; do
        ip nexthop replace id "$(nexthop_id "$gw")" via "$gw" dev "$dev" || exit 1
    done || return 1
    ip nexthop replace id "$GROUP" group "$2" type resilient \
        buckets "$BUCKETS" idle_timer "$IDLE_TIMER" || return 1
    ip route replace "$VIP" nhid "$GROUP"
}

sync_once() {
    members=""
    hops=$(next_hops)
    for gw in $(echo "$hops" | awk '{ print $1 }'); do
        members="${members:+$members/}$(nexthop_id "$gw")"
    done
    if [ "$members" = "${last:-}" ]; then
        return
    fi
    if ! install "$hops" "$members"; then
        # Forget what was installed so the next tick tries again.
        echo "resilient-sync: installing members ${members:-none} failed; retrying" >&2
        last="(failed)"
        return
    fi
    echo "resilient-sync: members ${members:-none}"
    last=$members
}

while true; do
    sync_once
    sleep "$INTERVAL"
done
