// SPDX-License-Identifier: GPL-2.0
/*
 * `cgpolicy learn`: observation programs, one per hook cgpolicy enforces. Every one of them
 * allows (returns 1) and counts the action exactly in a hash map keyed by what a rule can
 * express: one entry per distinct thing, with a count (atomic add), when it was first and
 * last seen, and up to CGL_COMMS executables (comm) that did it. An action that finds its
 * map full (or out of memory) is counted in `learn_stats` as lost, per hook, so the report
 * can say that it is incomplete; every action is counted as seen there too.
 *
 * All programs of one learning session share one set of maps (the kernel layer creates
 * them once, cgpolicy/kernel/learn.py). Nothing here denies anything: with
 * BPF_F_ALLOW_MULTI semantics (links), enforcing programs on the same hooks decide as
 * before.
 *
 * Packets and who started the connection. The packet hooks keep no connection state, so a
 * policy must allow return traffic by address without ports (docs/policy.md). Which half a
 * packet is follows from its local port: a port some socket of the workload bound
 * explicitly (bind() with a port other than 0, seen by the bind4/6 programs and kept in
 * `learn_servers`), or that a connection request reached a listening TCP socket on, is a
 * server's; every other local port is ephemeral (a connection or datagram the workload
 * started). So:
 *  - ingress to a server port: a connection made to the workload: (remote, local port);
 *  - ingress to another port: a reply to the workload: (remote), no port;
 *  - egress from a server port: a response: (remote), no port;
 *  - egress from another port: the workload's own: (remote, remote port).
 * The same holds for connect() and sendmsg() from a server port (a UDP server answering
 * with sendto()): they are responses, kept without the peer's port. Ephemeral ports
 * therefore never appear in what is learned.
 *
 * Packets run in softirq context, where the current task is anyone's: their executable is
 * the one that bound the server port, else the one recorded for the socket's cookie at
 * socket(), bind(), connect() or sendmsg() (`learn_sockcomm`, an LRU: a lost entry only
 * loses the name, never a count).
 *
 * DNS answers (UDP from port 53 that reach the workload as return traffic) are copied to the
 * ring buffer `learn_dns`, for user space to write a name instead of an address the answer
 * gave. A full ring buffer loses the answer (counted), never a count.
 *
 * The structs and constants are stated again in cgpolicy/kernel/learn.py (LAYOUTS,
 * C_CONSTANTS); tests/kernel/test_learn.py checks both against the compiler.
 */
#include "common.h"
#include "packet.h"

#define CGL_COMMS 4
#define CGL_SYSCTL_NAME 256

/* cgl_net_key.kind */
#define CGL_NET_PORT 0    /* tcp/udp with the port a rule names */
#define CGL_NET_REPLY 1   /* tcp/udp return traffic: no port */
#define CGL_NET_ICMP 2    /* icmp/icmpv6 with its type */
#define CGL_NET_BARE 3    /* protocol known, no L4 header (a later fragment) or another protocol */
#define CGL_NET_UNKNOWN 4 /* protocol unknown (IPv6 extension headers too many or cut) */

/* cgl_addr_key.op */
#define CGL_OP_BIND 0
#define CGL_OP_CONNECT 1
#define CGL_OP_SENDMSG 2
#define CGL_OP_RESPONSE 3 /* connect or sendmsg from a server port: to a peer's ephemeral port */

#define CGL_STAT_SLOTS 16 /* indexed by CGP_HOOK_* */
#define CGL_STAT_DNS 12   /* DNS answers: seen = copied to learn_dns, lost = no room */

#define CGL_DNS_COPY 1024 /* bytes of a DNS answer copied at most: a power of 2 (a mask) */

/* An executable's name (comm), as two words: compared and copied in two moves. */
struct cgl_comm {
	__u64 w[2];
};

struct cgl_value {
	__u64 count;
	__u64 first_ns; /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 last_ns;
	struct cgl_comm comm[CGL_COMMS]; /* executables that did it; zero: a free slot */
	__u32 more_comms;         /* more than CGL_COMMS did it */
	__u32 pad;
};

struct cgl_net_key {
	__u8 addr[16]; /* the remote address; IPv4 in the first 4 bytes */
	__u16 port;    /* CGL_NET_PORT: remote port (egress), local port (ingress) */
	__u8 family;   /* 4 or 6 */
	__u8 proto;
	__u8 kind;      /* CGL_NET_* */
	__u8 icmp_type; /* CGL_NET_ICMP */
	__u8 pad[2];
};

struct cgl_create_key {
	__u32 family;
	__u32 type;
	__u32 protocol;
};

struct cgl_addr_key {
	__u8 addr[16]; /* bind: the local address; connect, sendmsg: the remote one */
	__u16 port;
	__u8 family; /* 4 or 6 */
	__u8 proto;
	__u8 op; /* CGL_OP_* */
	__u8 pad[3];
};

struct cgl_device_key {
	__u32 type;
	__u32 major;
	__u32 minor;
	__u32 access;
};

struct cgl_sysctl_key {
	char name[CGL_SYSCTL_NAME]; /* slash form, NUL-padded */
	__u32 write;
	__u32 truncated; /* the name did not fit: not expressible */
};

struct cgl_server_key {
	__u8 proto;
	__u8 pad;
	__u16 port;
};

/* A DNS answer as it reached the workload (UDP from port 53, return traffic), for user
 * space to read names from: an address it gives that the workload then uses is written
 * as the name. */
struct cgl_dns_answer {
	__u64 time_ns;  /* bpf_ktime_get_ns() */
	__u32 len;      /* bytes in data */
	__u32 full_len; /* the UDP payload's length (more than len: cut) */
	__u8 server[16];
	__u8 family; /* 4 or 6 */
	__u8 pad[7];
	__u8 data[CGL_DNS_COPY];
};

struct cgl_stat {
	__u64 seen;
	__u64 lost; /* not recorded: the map was full */
};

/* Sizes are set by the kernel layer; these are the templates'. */
BPF_F_TABLE("hash", struct cgl_net_key, struct cgl_value, learn_egress, 1, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct cgl_net_key, struct cgl_value, learn_ingress, 1, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct cgl_create_key, struct cgl_value, learn_create, 1, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct cgl_addr_key, struct cgl_value, learn_addr, 1, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct cgl_device_key, struct cgl_value, learn_device, 1, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct cgl_sysctl_key, struct cgl_value, learn_sysctl, 1, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct cgl_server_key, struct cgl_comm, learn_servers, 1, BPF_F_NO_PREALLOC);
BPF_TABLE("lru_hash", __u64, struct cgl_comm, learn_sockcomm, 1);
BPF_PERCPU_ARRAY(learn_stats, struct cgl_stat, CGL_STAT_SLOTS);
BPF_PERCPU_ARRAY(learn_scratch, struct cgl_sysctl_key, 1);
BPF_RINGBUF_OUTPUT(learn_dns, 1);

/* Count one more of an entry: the count exactly (atomic), the last time, the executable. */
static __always_inline void cgl_touch(struct cgl_value *v, const struct cgl_comm *comm, __u64 now)
{
	int i;

	__sync_fetch_and_add(&v->count, 1);
	v->last_ns = now;
	if (!(comm->w[0] | comm->w[1]))
		return; /* not known */
#pragma unroll
	for (i = 0; i < CGL_COMMS; i++) {
		struct cgl_comm *slot = &v->comm[i];

		if (slot->w[0] == comm->w[0] && slot->w[1] == comm->w[1])
			return;
		if (!(slot->w[0] | slot->w[1])) {
			*slot = *comm; /* two racing CPUs may both take it: one name is kept */
			return;
		}
	}
	v->more_comms = 1;
}

static __always_inline void cgl_stat(__u32 hook, int lost)
{
	struct cgl_stat *s = learn_stats.lookup(&hook);

	if (!s)
		return;
	s->seen++; /* per CPU: no other CPU writes it */
	if (lost)
		s->lost++;
}

/* One function per map: bcc rewrites map calls only where the map is named. Each returns
 * whether the action was recorded. */
#define CGL_NEW(now) {.first_ns = (now), .last_ns = (now)}

static __always_inline int cgl_egress_add(struct cgl_net_key *k, const struct cgl_comm *comm, __u64 now)
{
	struct cgl_value init = CGL_NEW(now), *v = learn_egress.lookup(k);

	if (!v) {
		learn_egress.insert(k, &init); /* a racer's insert wins: looked up again */
		v = learn_egress.lookup(k);
		if (!v)
			return 0;
	}
	cgl_touch(v, comm, now);
	return 1;
}

static __always_inline int cgl_ingress_add(struct cgl_net_key *k, const struct cgl_comm *comm, __u64 now)
{
	struct cgl_value init = CGL_NEW(now), *v = learn_ingress.lookup(k);

	if (!v) {
		learn_ingress.insert(k, &init);
		v = learn_ingress.lookup(k);
		if (!v)
			return 0;
	}
	cgl_touch(v, comm, now);
	return 1;
}

static __always_inline int cgl_create_add(struct cgl_create_key *k, const struct cgl_comm *comm, __u64 now)
{
	struct cgl_value init = CGL_NEW(now), *v = learn_create.lookup(k);

	if (!v) {
		learn_create.insert(k, &init);
		v = learn_create.lookup(k);
		if (!v)
			return 0;
	}
	cgl_touch(v, comm, now);
	return 1;
}

static __always_inline int cgl_addr_add(struct cgl_addr_key *k, const struct cgl_comm *comm, __u64 now)
{
	struct cgl_value init = CGL_NEW(now), *v = learn_addr.lookup(k);

	if (!v) {
		learn_addr.insert(k, &init);
		v = learn_addr.lookup(k);
		if (!v)
			return 0;
	}
	cgl_touch(v, comm, now);
	return 1;
}

static __always_inline int cgl_device_add(struct cgl_device_key *k, const struct cgl_comm *comm, __u64 now)
{
	struct cgl_value init = CGL_NEW(now), *v = learn_device.lookup(k);

	if (!v) {
		learn_device.insert(k, &init);
		v = learn_device.lookup(k);
		if (!v)
			return 0;
	}
	cgl_touch(v, comm, now);
	return 1;
}

static __always_inline int cgl_sysctl_add(struct cgl_sysctl_key *k, const struct cgl_comm *comm, __u64 now)
{
	struct cgl_value init = CGL_NEW(now), *v = learn_sysctl.lookup(k);

	if (!v) {
		learn_sysctl.insert(k, &init);
		v = learn_sysctl.lookup(k);
		if (!v)
			return 0;
	}
	cgl_touch(v, comm, now);
	return 1;
}

/* --- packets ------------------------------------------------------------------------------ */

/* Is the packet for a listening TCP socket (a connection request)? Then its local port is a
 * server's even if no bind() named it (listen() on the port the kernel picked, or a server
 * that bound before learning began). */
static __always_inline int cgl_listening(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;

	if (!sk)
		return 0;
	sk = bpf_sk_fullsock(sk);
	return sk && sk->state == BPF_TCP_LISTEN;
}

/* Note a server port found at ingress, with the listener's executable when known. */
static __always_inline struct cgl_comm *cgl_new_server(struct __sk_buff *skb,
						       struct cgl_server_key *server)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct cgl_comm none = {}, *known = learn_sockcomm.lookup(&cookie);

	learn_servers.update(server, known ? known : &none);
	return learn_servers.lookup(server);
}

/* Copy the DNS answer at `offset` (the UDP payload) to learn_dns. */
static __always_inline void cgl_dns_copy(struct __sk_buff *skb, const struct cgl_net_key *k,
					 __u32 offset)
{
	struct cgl_dns_answer *a;
	__u32 full = skb->len > offset ? skb->len - offset : 0, len = full;

	if (len > CGL_DNS_COPY - 1)
		len = CGL_DNS_COPY - 1;
	/* The mask the verifier needs to bound the copy; clang would drop it as redundant
	 * after the clamp, so it may not see through the empty asm. */
	asm volatile("" : "+r"(len));
	len &= CGL_DNS_COPY - 1;
	if (len < 12) /* not even a DNS header */
		return;
	a = learn_dns.ringbuf_reserve(sizeof(*a));
	if (!a) {
		cgl_stat(CGL_STAT_DNS, 1);
		return;
	}
	a->time_ns = bpf_ktime_get_ns();
	a->len = len;
	a->full_len = full;
	a->family = k->family;
	__builtin_memcpy(a->server, k->addr, 16);
	if (bpf_skb_load_bytes(skb, offset, a->data, len)) {
		learn_dns.ringbuf_discard(a, 0);
		return;
	}
	learn_dns.ringbuf_submit(a, 0);
	cgl_stat(CGL_STAT_DNS, 0);
}

static __always_inline int cgl_skb(struct __sk_buff *skb, int egress)
{
	struct cgl_net_key k = {};
	struct cgl_comm comm = {}, *known;
	__u64 now = bpf_ktime_get_ns(), cookie;
	__u32 proto = 0, offset = 0, hook = egress ? CGP_HOOK_EGRESS : CGP_HOOK_INGRESS;
	int header = 0, found = 0, ok, dns_source = 0;
	struct cgp_l4 l4 = {};

	if (skb->protocol == bpf_htons(0x0800)) {
		struct cgp_ipv4 ip;

		if (!bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip))) {
			__u32 remote = egress ? ip.daddr : ip.saddr;

			k.family = 4;
			__builtin_memcpy(k.addr, &remote, 4);
			proto = ip.protocol;
			offset = (ip.ver_ihl & 0xf) * 4;
			header = !(ip.frag_off & bpf_htons(0x1fff)) && offset >= 20;
			found = 1;
		}
	} else if (skb->protocol == bpf_htons(0x86DD)) {
		struct cgp_ipv6 ip6;

		if (!bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6))) {
			k.family = 6;
			if (egress)
				__builtin_memcpy(k.addr, ip6.daddr, 16);
			else
				__builtin_memcpy(k.addr, ip6.saddr, 16);
			cgp_ipv6_l4(skb, ip6.nexthdr, &l4);
			found = l4.proto_known;
			proto = l4.proto;
			offset = l4.offset;
			header = l4.header;
			if (!found)
				k.kind = CGL_NET_UNKNOWN;
		}
	} else {
		return 1; /* not IP: no rule can name it */
	}

	k.proto = proto;
	if (found && !k.kind) {
		k.kind = CGL_NET_BARE;
		if ((proto == 6 || proto == 17) && header) {
			__u16 ports[2]; /* source, destination */

			if (!bpf_skb_load_bytes(skb, offset, ports, sizeof(ports))) {
				struct cgl_server_key server = {.proto = proto};
				__u16 local = bpf_ntohs(egress ? ports[0] : ports[1]);
				struct cgl_comm *by;

				server.port = local;
				dns_source = ports[0] == bpf_htons(53);
				by = learn_servers.lookup(&server);
				if (!by && !egress && proto == 6 && cgl_listening(skb))
					by = cgl_new_server(skb, &server);
				if (by)
					comm = *by;
				/* A server port: ingress names it, egress is a response. Any other local
				 * port: egress names the remote port, ingress is a reply. */
				if (!!by != egress) {
					k.kind = CGL_NET_PORT;
					k.port = egress ? bpf_ntohs(ports[1]) : local;
				} else {
					k.kind = CGL_NET_REPLY;
				}
			}
		} else if ((proto == 1 || proto == 58) && header) {
			__u8 type;

			if (!bpf_skb_load_bytes(skb, offset, &type, 1)) {
				k.kind = CGL_NET_ICMP;
				k.icmp_type = type;
			}
		}
	}
	if (!(comm.w[0] | comm.w[1])) {
		cookie = bpf_get_socket_cookie(skb);
		known = learn_sockcomm.lookup(&cookie);
		if (known)
			comm = *known;
	}
	ok = egress ? cgl_egress_add(&k, &comm, now) : cgl_ingress_add(&k, &comm, now);
	cgl_stat(hook, !ok);
	/* An answer from a DNS server to a query the workload made. */
	if (!egress && k.kind == CGL_NET_REPLY && proto == 17 && dns_source)
		cgl_dns_copy(skb, &k, offset + 8);
	return 1;
}

int cgl_ingress(struct __sk_buff *skb)
{
	return cgl_skb(skb, 0);
}

int cgl_egress(struct __sk_buff *skb)
{
	return cgl_skb(skb, 1);
}

/* --- sockets ------------------------------------------------------------------------------ */

static __always_inline void cgl_current_comm(struct cgl_comm *comm)
{
	comm->w[0] = 0;
	comm->w[1] = 0;
	bpf_get_current_comm(comm, sizeof(*comm));
}

/* Remember the socket's executable for its packets; an LRU update costs more than a
 * lookup, so only when it is new or changed. */
static __always_inline void cgl_note_socket(__u64 cookie, const struct cgl_comm *comm)
{
	struct cgl_comm *known = learn_sockcomm.lookup(&cookie);

	if (known && known->w[0] == comm->w[0] && known->w[1] == comm->w[1])
		return;
	learn_sockcomm.update(&cookie, comm);
}

int cgl_sock_create(struct bpf_sock *ctx)
{
	struct cgl_create_key k = {.family = ctx->family, .type = ctx->type,
				   .protocol = ctx->protocol};
	struct cgl_comm comm;
	__u64 now = bpf_ktime_get_ns(), cookie = bpf_get_socket_cookie(ctx);

	cgl_current_comm(&comm);
	cgl_note_socket(cookie, &comm);
	cgl_stat(CGP_HOOK_SOCK_CREATE, !cgl_create_add(&k, &comm, now));
	return 1;
}

static __always_inline int cgl_sock_addr(struct bpf_sock_addr *ctx, int v6, __u32 op, __u32 hook)
{
	struct cgl_addr_key k = {.op = op};
	struct cgl_comm comm;
	__u64 now = bpf_ktime_get_ns(), cookie = bpf_get_socket_cookie(ctx);

	cgl_current_comm(&comm);
	cgl_note_socket(cookie, &comm);
	if (v6) {
		__u32 addr[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2],
				 ctx->user_ip6[3]};

		k.family = 6;
		__builtin_memcpy(k.addr, addr, 16);
	} else {
		__u32 addr4 = ctx->user_ip4;

		k.family = 4;
		__builtin_memcpy(k.addr, &addr4, 4);
	}
	k.proto = ctx->protocol;
	/* user_port holds the port in network byte order in its low 16 bits. */
	k.port = bpf_ntohs((__u16)ctx->user_port);
	if (op != CGL_OP_BIND && (k.proto == 6 || k.proto == 17)) {
		/* From a server port (a UDP server answering with sendto, say): the peer's port
		 * is its ephemeral one, which no rule may name. */
		struct cgl_server_key server = {.proto = k.proto, .port = ctx->sk->src_port};

		if (server.port && learn_servers.lookup(&server)) {
			k.op = CGL_OP_RESPONSE;
			k.port = 0;
		}
	}
	if (op == CGL_OP_BIND && k.port && (k.proto == 6 || k.proto == 17)) {
		struct cgl_server_key server = {.proto = k.proto, .port = k.port};

		/* Full: the port's packets would be taken for return traffic; counted as lost. */
		if (learn_servers.update(&server, &comm)) {
			cgl_stat(hook, 1);
			return 1;
		}
	}
	cgl_stat(hook, !cgl_addr_add(&k, &comm, now));
	return 1;
}

int cgl_bind4(struct bpf_sock_addr *ctx)
{
	return cgl_sock_addr(ctx, 0, CGL_OP_BIND, CGP_HOOK_BIND4);
}

int cgl_bind6(struct bpf_sock_addr *ctx)
{
	return cgl_sock_addr(ctx, 1, CGL_OP_BIND, CGP_HOOK_BIND6);
}

int cgl_connect4(struct bpf_sock_addr *ctx)
{
	return cgl_sock_addr(ctx, 0, CGL_OP_CONNECT, CGP_HOOK_CONNECT4);
}

int cgl_connect6(struct bpf_sock_addr *ctx)
{
	return cgl_sock_addr(ctx, 1, CGL_OP_CONNECT, CGP_HOOK_CONNECT6);
}

int cgl_sendmsg4(struct bpf_sock_addr *ctx)
{
	return cgl_sock_addr(ctx, 0, CGL_OP_SENDMSG, CGP_HOOK_SENDMSG4);
}

int cgl_sendmsg6(struct bpf_sock_addr *ctx)
{
	return cgl_sock_addr(ctx, 1, CGL_OP_SENDMSG, CGP_HOOK_SENDMSG6);
}

/* --- devices and sysctls ------------------------------------------------------------------ */

int cgl_device(struct bpf_cgroup_dev_ctx *ctx)
{
	struct cgl_device_key k = {.type = ctx->access_type & 0xffff,
				   .access = ctx->access_type >> 16,
				   .major = ctx->major,
				   .minor = ctx->minor};
	struct cgl_comm comm;
	__u64 now = bpf_ktime_get_ns();

	cgl_current_comm(&comm);
	cgl_stat(CGP_HOOK_DEVICE, !cgl_device_add(&k, &comm, now));
	return 1;
}

int cgl_sysctl(struct bpf_sysctl *ctx)
{
	struct cgl_sysctl_key *k;
	__u32 zero = 0;
	struct cgl_comm comm;
	__u64 now = bpf_ktime_get_ns();

	k = learn_scratch.lookup(&zero);
	if (!k) {
		cgl_stat(CGP_HOOK_SYSCTL, 1);
		return 1;
	}
	/* The whole key is hashed: the bytes after the name's NUL must be zero. */
	__builtin_memset(k, 0, sizeof(*k));
	k->write = ctx->write;
	if (bpf_sysctl_get_name(ctx, k->name, sizeof(k->name), 0) < 0)
		k->truncated = 1;
	cgl_current_comm(&comm);
	cgl_stat(CGP_HOOK_SYSCTL, !cgl_sysctl_add(k, &comm, now));
	return 1;
}
