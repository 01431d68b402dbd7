// SPDX-License-Identifier: GPL-2.0
//
// The sockmap copy engine's kernel half (lb-proxy/src/tcp/sockmap.rs is the
// user half). Both sockets of an established flow sit in `socks`, keyed by
// their socket cookie; `flows` says, for each cookie, which socket the bytes
// go to and counts them. The stream verdict runs for every skb a member
// socket receives and redirects it to the egress of the peer, so the payload
// never reaches userspace.
//
// Built by lb-proxy/build.rs:
//   clang -O2 -g -target bpf -c sockmap.bpf.c -o $OUT_DIR/sockmap.bpf.o

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

// One side of a flow; userspace writes `peer` (and zeroes) before inserting
// the socket, the verdict below keeps `bytes` and `last_seen_ns`.
// Must match `FlowSide` in sockmap.rs.
struct flow_side {
	__u64 peer;         // the socket cookie the bytes go to
	__u64 bytes;        // payload bytes redirected to the peer
	__u64 last_seen_ns; // bpf_ktime_get_ns (CLOCK_MONOTONIC) of the last redirect
	__u64 stranded;     // payload bytes left on this socket (sticky once non-zero)
};

// 65,536 flows, two sockets (and two flow_side entries) each; a flow that
// finds the maps full is copied by userspace instead.
#define MAX_SOCKETS 131072

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u64);
	__type(value, __u32); // the socket's fd, on insert
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u64);
	__type(value, struct flow_side);
	// Entries are allocated as flows join, not 10 MiB up front.
	__uint(map_flags, BPF_F_NO_PREALLOC);
} flows SEC(".maps");

SEC("sk_skb/stream_verdict")
int redirect(struct __sk_buff *skb)
{
	// A FIN arriving alone is an skb without payload. Redirected, the
	// peer's psock backlog would send 0 bytes, take that for a broken pipe
	// and stop the peer (EPIPE). The FIN itself is already recorded on this
	// socket (userspace sees end of stream and passes it on), so the empty
	// skb is dropped.
	if (skb->len == 0)
		return SK_DROP;
	__u64 me = bpf_get_socket_cookie(skb);
	struct flow_side *side = bpf_map_lookup_elem(&flows, &me);
	if (!side)
		// Not ours (cannot happen: the entry is written before the
		// insert and deleted after the removal): leave it to the reader.
		return SK_PASS;
	// Once one skb of this side stayed on the socket, every later one
	// does too: all of the direction's bytes wait, in order, in the
	// socket's ingress queue, and userspace copies that direction.
	if (side->stranded) {
		__sync_fetch_and_add(&side->stranded, skb->len);
		return SK_PASS;
	}
	__u64 peer = side->peer;
	if (bpf_sk_redirect_hash(skb, &socks, &peer, 0) != SK_PASS) {
		// The peer is not in the map (yet: the backend joins first, and
		// a server that speaks first may send before the client joins).
		// Keep the bytes on this socket rather than drop them, and say so.
		__sync_fetch_and_add(&side->stranded, skb->len);
		return SK_PASS;
	}
	__sync_fetch_and_add(&side->bytes, skb->len);
	side->last_seen_ns = bpf_ktime_get_ns();
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
