// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
//
// Socket-level load balancing for svcproxy: cgroup sock_addr programs that pick a service
// port's endpoint when a client calls connect() or sends an unconnected UDP datagram, and make
// replies and getpeername() show the service address again.
//
// The maps are written by the svcproxy-socklb crate from the published table (see its
// module docs for the protocol). A destination with no frontend entry is left alone: the
// userspace proxy, listening at the service address, serves it.
//
// Rebuild with socket-lb/bpf/build.sh; CI checks that the checked-in object is current.

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include <bpf/bpf_helpers.h>

#define ECONNREFUSED 111
#define AF_INET 2
#define AF_INET6 10

// An address and port in network byte order; IPv4 uses addr[0] only.
struct endpoint {
	__u32 addr[4];
	__u16 port;
	__u8 family;
	__u8 pad;
};

struct frontend_key {
	struct endpoint service;
	__u8 protocol;
	__u8 pad[3];
};

// Flags of a frontend.
#define FRONTEND_RANDOM 1

struct frontend {
	// Stable for the frontend's life: keys its cursor, affinity, flows and counters.
	__u32 id;
	// The slots and members of this revision are complete before the entry points at them.
	__u32 rev;
	__u32 count;
	__u32 flags;
	// ClientIP affinity timeout; 0 without affinity.
	__u64 affinity_ns;
	// The entry's own key. A hash map hands a replaced or deleted element to a later update
	// at once, so a program reading through a lookup's pointer may find another key's value
	// there: it copies the value and checks the key.
	struct frontend_key key;
};

struct slot_key {
	__u32 rev;
	__u32 index;
};

// A slot's endpoint, with the slot's key (checked as the frontend's is).
struct slot {
	struct endpoint endpoint;
	struct slot_key key;
};

struct member_key {
	__u32 rev;
	struct endpoint endpoint;
};

struct cursor {
	__u64 next;
};

// Under affinity the client is its network namespace: the source address is not chosen yet
// at connect().
struct affinity_key {
	__u64 netns;
	__u32 id;
	__u32 pad;
};

struct affinity {
	struct endpoint endpoint;
	__u32 pad;
	__u64 used_ns;
};

// An unconnected UDP socket's flow to one frontend.
struct flow_key {
	__u64 cookie;
	__u32 id;
	__u32 pad;
};

// Its endpoint, and the frontend revision it was last found eligible in (a datagram under the
// same revision needs no membership lookup).
struct flow {
	struct endpoint endpoint;
	__u32 rev;
};

struct reverse_key {
	__u64 cookie;
	struct endpoint endpoint;
	__u32 pad;
};

struct stat_key {
	__u32 id;
	// All zero for the frontend's own counters (refusals).
	struct endpoint endpoint;
};

struct stat {
	__u64 connections;
	__u64 datagrams;
	__u64 refused;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct frontend_key);
	__type(value, struct frontend);
} frontends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 524288);
	__type(key, struct slot_key);
	__type(value, struct slot);
} slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 524288);
	__type(key, struct member_key);
	__type(value, __u32);
} members SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct cursor);
} cursors SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct affinity_key);
	__type(value, struct affinity);
} affinities SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct flow_key);
	__type(value, struct flow);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct reverse_key);
	__type(value, struct endpoint);
} reverse SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct stat_key);
	__type(value, struct stat);
} stats SEC(".maps");

static __always_inline void count(__u32 id, const struct endpoint *endpoint, __u64 connections,
				  __u64 datagrams, __u64 refused)
{
	struct stat_key key = { .id = id };
	if (endpoint)
		key.endpoint = *endpoint;
	struct stat *s = bpf_map_lookup_elem(&stats, &key);
	if (!s) {
		struct stat zero = {};
		bpf_map_update_elem(&stats, &key, &zero, BPF_NOEXIST);
		s = bpf_map_lookup_elem(&stats, &key);
		if (!s)
			return;
	}
	// Per-CPU values: plain adds.
	s->connections += connections;
	s->datagrams += datagrams;
	s->refused += refused;
}

static __always_inline int eligible(const struct frontend *fe, const struct endpoint *endpoint)
{
	struct member_key key = { .rev = fe->rev, .endpoint = *endpoint };
	return bpf_map_lookup_elem(&members, &key) != NULL;
}

// Picks the endpoint for a new connection or flow. Returns 1 with *out set, 0 when the
// userspace proxy should serve it (a slot vanished under a concurrent publish).
static __always_inline int pick(void *ctx, const struct frontend *fe, struct endpoint *out)
{
	struct affinity_key akey = {};
	__u64 now = 0;
	if (fe->affinity_ns) {
		akey.netns = bpf_get_netns_cookie(ctx);
		akey.id = fe->id;
		now = bpf_ktime_get_ns();
		struct affinity *a = bpf_map_lookup_elem(&affinities, &akey);
		if (a && now - a->used_ns < fe->affinity_ns && eligible(fe, &a->endpoint)) {
			a->used_ns = now;
			*out = a->endpoint;
			return 1;
		}
	}
	__u32 index;
	if (fe->flags & FRONTEND_RANDOM) {
		index = bpf_get_prandom_u32() % fe->count;
	} else {
		struct cursor *c = bpf_map_lookup_elem(&cursors, &fe->id);
		if (!c)
			return 0;
		index = __sync_fetch_and_add(&c->next, 1) % fe->count;
	}
	struct slot_key skey = { .rev = fe->rev, .index = index };
	struct slot *found = bpf_map_lookup_elem(&slots, &skey);
	if (!found)
		return 0;
	struct slot slot = *found;
	if (slot.key.rev != skey.rev || slot.key.index != skey.index)
		return 0;
	*out = slot.endpoint;
	if (fe->affinity_ns) {
		struct affinity a = { .endpoint = slot.endpoint, .used_ns = now };
		bpf_map_update_elem(&affinities, &akey, &a, BPF_ANY);
	}
	return 1;
}

static __always_inline void read_destination(const struct bpf_sock_addr *ctx, int family,
					     struct endpoint *e)
{
	e->family = family;
	e->port = (__u16)ctx->user_port;
	if (family == AF_INET) {
		e->addr[0] = ctx->user_ip4;
	} else {
		e->addr[0] = ctx->user_ip6[0];
		e->addr[1] = ctx->user_ip6[1];
		e->addr[2] = ctx->user_ip6[2];
		e->addr[3] = ctx->user_ip6[3];
	}
}

// The program's family is a constant, so that the verifier sees only the fields of that
// family written.
static __always_inline void write_destination(struct bpf_sock_addr *ctx, int family,
					      const struct endpoint *e)
{
	ctx->user_port = e->port;
	if (family == AF_INET) {
		ctx->user_ip4 = e->addr[0];
	} else {
		ctx->user_ip6[0] = e->addr[0];
		ctx->user_ip6[1] = e->addr[1];
		ctx->user_ip6[2] = e->addr[2];
		ctx->user_ip6[3] = e->addr[3];
	}
}

static __always_inline int same_endpoint(const struct endpoint *a, const struct endpoint *b)
{
	return a->addr[0] == b->addr[0] && a->addr[1] == b->addr[1] && a->addr[2] == b->addr[2] &&
	       a->addr[3] == b->addr[3] && a->port == b->port && a->family == b->family;
}

// Copies the frontend of the destination into *fe. 0 when there is none, or when the element
// read had been reused for another frontend meanwhile: the userspace proxy serves that one.
static __always_inline int frontend_of(const struct bpf_sock_addr *ctx, int family,
				       struct endpoint *service, struct frontend *fe)
{
	read_destination(ctx, family, service);
	struct frontend_key key = { .service = *service, .protocol = ctx->protocol };
	struct frontend *found = bpf_map_lookup_elem(&frontends, &key);
	if (!found)
		return 0;
	*fe = *found;
	return fe->key.protocol == key.protocol && same_endpoint(&fe->key.service, &key.service);
}

static __always_inline void remember_reverse(struct bpf_sock_addr *ctx,
					     const struct endpoint *endpoint,
					     const struct endpoint *service)
{
	struct reverse_key key = { .cookie = bpf_get_socket_cookie(ctx), .endpoint = *endpoint };
	bpf_map_update_elem(&reverse, &key, service, BPF_ANY);
}

static __always_inline int refuse(const struct frontend *fe)
{
	count(fe->id, NULL, 0, 0, 1);
	bpf_set_retval(-ECONNREFUSED);
	return 0;
}

// connect(): TCP connections and connected UDP sockets.
static __always_inline int on_connect(struct bpf_sock_addr *ctx, int family)
{
	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return 1;
	struct endpoint service = {};
	struct frontend copy;
	const struct frontend *fe = &copy;
	if (!frontend_of(ctx, family, &service, &copy))
		return 1;
	if (fe->count == 0)
		return refuse(fe);
	struct endpoint endpoint = {};
	if (!pick(ctx, fe, &endpoint) || endpoint.family != family)
		return 1;
	remember_reverse(ctx, &endpoint, &service);
	write_destination(ctx, family, &endpoint);
	count(fe->id, &endpoint, 1, 0, 0);
	return 1;
}

// sendmsg() with a destination on an unconnected UDP socket: each datagram. The socket keeps
// its endpoint per frontend while that endpoint stays eligible.
static __always_inline int on_sendmsg(struct bpf_sock_addr *ctx, int family)
{
	struct endpoint service = {};
	struct frontend copy;
	const struct frontend *fe = &copy;
	if (!frontend_of(ctx, family, &service, &copy))
		return 1;
	if (fe->count == 0)
		return refuse(fe);
	struct flow_key fkey = { .cookie = bpf_get_socket_cookie(ctx), .id = fe->id };
	struct endpoint endpoint = {};
	struct flow *flow = bpf_map_lookup_elem(&flows, &fkey);
	if (flow && (flow->rev == fe->rev || eligible(fe, &flow->endpoint))) {
		flow->rev = fe->rev;
		endpoint = flow->endpoint;
		count(fe->id, &endpoint, 0, 1, 0);
	} else {
		if (!pick(ctx, fe, &endpoint) || endpoint.family != family)
			return 1;
		struct flow fresh = { .endpoint = endpoint, .rev = fe->rev };
		bpf_map_update_elem(&flows, &fkey, &fresh, BPF_ANY);
		remember_reverse(ctx, &endpoint, &service);
		count(fe->id, &endpoint, 1, 1, 0);
	}
	write_destination(ctx, family, &endpoint);
	return 1;
}

// recvmsg() and getpeername(): an endpoint this socket was sent to shows as the service.
static __always_inline int on_peer(struct bpf_sock_addr *ctx, int family)
{
	struct reverse_key key = { .cookie = bpf_get_socket_cookie(ctx) };
	read_destination(ctx, family, &key.endpoint);
	struct endpoint *service = bpf_map_lookup_elem(&reverse, &key);
	if (service)
		write_destination(ctx, family, service);
	return 1;
}

SEC("cgroup/connect4")
int connect4(struct bpf_sock_addr *ctx)
{
	return on_connect(ctx, AF_INET);
}

SEC("cgroup/connect6")
int connect6(struct bpf_sock_addr *ctx)
{
	return on_connect(ctx, AF_INET6);
}

SEC("cgroup/sendmsg4")
int sendmsg4(struct bpf_sock_addr *ctx)
{
	return on_sendmsg(ctx, AF_INET);
}

SEC("cgroup/sendmsg6")
int sendmsg6(struct bpf_sock_addr *ctx)
{
	return on_sendmsg(ctx, AF_INET6);
}

SEC("cgroup/recvmsg4")
int recvmsg4(struct bpf_sock_addr *ctx)
{
	return on_peer(ctx, AF_INET);
}

SEC("cgroup/recvmsg6")
int recvmsg6(struct bpf_sock_addr *ctx)
{
	return on_peer(ctx, AF_INET6);
}

SEC("cgroup/getpeername4")
int getpeername4(struct bpf_sock_addr *ctx)
{
	return on_peer(ctx, AF_INET);
}

SEC("cgroup/getpeername6")
int getpeername6(struct bpf_sock_addr *ctx)
{
	return on_peer(ctx, AF_INET6);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
