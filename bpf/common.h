/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shared by every cgpolicy program: types and the (map-free) verdict logic.
 *
 * A section has at most 64 rules, so a set of rules is a __u64 (bit i = rule i, in the
 * compiler's canonical rule order). Each program computes `matched`, the set of rules whose
 * every condition holds, and cgp_decide() applies the policy language's semantics:
 * a matching deny rule wins, else a matching allow rule, else the section default.
 *
 * bcc rewrites map accesses (map.lookup()) only in the main source file, never in an
 * included header, and it refuses them inside a macro too ("cannot use map function
 * inside a macro"), so this header holds no map access: each program file declares its
 * maps and repeats the short cgp_verdict() and cgp_event_reserve() that use them.
 *
 * Template maps are declared with max_entries 1 (or their fixed size): the kernel layer
 * creates the real maps from the compiler's MapSpecs and rewrites the map fds in the
 * compiled instructions. Tests that fill bcc's template maps directly raise the sizes with
 * -DCGP_*_MAX=N.
 *
 * Every struct and constant the Python shares with the programs is here, the layouts of
 * each program's maps included (end of file): cgpolicy/contract.py states the same for the
 * Python side, and tests/kernel/test_contract.py compiles static assertions of every field
 * offset, size and type and every constant against this header. Change both together.
 */
#ifndef CGP_COMMON_H
#define CGP_COMMON_H

#define CGP_MAX_RULES 64
/* Counter slot of "no rule matched, the section default decided". */
#define CGP_DEFAULT_SLOT CGP_MAX_RULES
#define CGP_COUNTER_SLOTS (CGP_MAX_RULES + 1)

/* Head of every program's config value (array map "config", one entry). */
struct cgp_verdict {
	__u64 allow_mask;    /* rules with action allow */
	__u64 deny_mask;     /* rules with action deny */
	__u32 default_allow; /* section default: 1 allow, 0 deny */
	__u32 audit;         /* mode audit: count would-be denials, deny nothing */
};

/* Value of the per-CPU array "counters": slots 0..63 = rule index, 64 = section default.
 * In audit mode a would-be denial is counted in `denied` although the action goes through. */
struct cgp_counter {
	__u64 allowed;
	__u64 denied;
};

struct cgp_decision {
	__u32 slot;    /* deciding rule, or CGP_DEFAULT_SLOT */
	__u32 allowed; /* the policy's verdict, before audit mode */
};

/* Index of the lowest set bit of a non-zero mask: the deciding rule. BPF has no ctz
 * instruction and clang would lower __builtin_ctzll to a table in .rodata, which bcc does
 * not relocate, so binary search. */
static __always_inline __u32 cgp_lowest_bit(__u64 mask)
{
	__u32 index = 0;

	mask &= -mask;
	if (!(mask & 0xffffffffULL)) { index += 32; mask >>= 32; }
	if (!(mask & 0xffffULL)) { index += 16; mask >>= 16; }
	if (!(mask & 0xffULL)) { index += 8; mask >>= 8; }
	if (!(mask & 0xfULL)) { index += 4; mask >>= 4; }
	if (!(mask & 0x3ULL)) { index += 2; mask >>= 2; }
	if (!(mask & 0x1ULL)) { index += 1; }
	return index;
}

static __always_inline struct cgp_decision cgp_decide(const struct cgp_verdict *v, __u64 matched)
{
	__u64 deny = matched & v->deny_mask;
	__u64 allow = matched & v->allow_mask;
	struct cgp_decision d;

	if (deny) {
		d.slot = cgp_lowest_bit(deny);
		d.allowed = 0;
	} else if (allow) {
		d.slot = cgp_lowest_bit(allow);
		d.allowed = 1;
	} else {
		d.slot = CGP_DEFAULT_SLOT;
		d.allowed = v->default_allow ? 1 : 0;
	}
	return d;
}

/* Count a decision and return the program's return value (1 allow, 0 deny). Each program
 * file's cgp_verdict() emits a deny event (below) next to this call, for enforced and
 * audit-mode denials alike, with d->slot naming the rule. */
static __always_inline int cgp_count(const struct cgp_verdict *v, const struct cgp_decision *d,
				     struct cgp_counter *counter)
{
	if (counter) {
		/* Per-CPU value: no other CPU writes it, a plain increment is enough. */
		if (d->allowed)
			counter->allowed++;
		else
			counter->denied++;
	}
	/* Return constants: the verifier insists on a provable 0 or 1. */
	if (d->allowed || v->audit)
		return 1;
	return 0;
}

/*
 * Deny events. Every program of a policy writes to one ring buffer map ("events", created
 * once per policy and pinned at <policy>/events), only on a denial, so the allow path pays
 * nothing. A flood cannot swamp the host or the reader: each program has a per-CPU window
 * ("ratelimit", one entry) that lets at most `limit` events per second per CPU through;
 * the rest, and any event the ring buffer has no room for, are counted in `dropped`.
 * cgpolicy/events/decode.py decodes the record (its layout: cgpolicy/contract.py EVENT).
 */

/* enum of the hook that denied (cgpolicy/contract.py HOOK_PROGRAMS). */
#define CGP_HOOK_INGRESS 1
#define CGP_HOOK_EGRESS 2
#define CGP_HOOK_SOCK_CREATE 3
#define CGP_HOOK_BIND4 4
#define CGP_HOOK_BIND6 5
#define CGP_HOOK_CONNECT4 6
#define CGP_HOOK_CONNECT6 7
#define CGP_HOOK_SENDMSG4 8
#define CGP_HOOK_SENDMSG6 9
#define CGP_HOOK_DEVICE 10
#define CGP_HOOK_SYSCTL 11

/* cgp_event.flags */
#define CGP_EV_AUDIT 1     /* audit mode: would have been denied, was allowed */
#define CGP_EV_TASK 2      /* pid, tid and comm are set (the hook runs in task context) */
#define CGP_EV_WRITE 4     /* sysctl: a write (else a read) */
#define CGP_EV_TRUNCATED 8 /* sysctl: the name did not fit `name` */
#define CGP_EV_CONNECT 16  /* network.egress: refused at connect(), before any packet */
#define CGP_EV_SENDMSG 32  /* network.egress: refused at an unconnected UDP sendmsg() */

#define CGP_EVENT_NAME_MAX 128
#define CGP_NSEC_PER_SEC 1000000000ULL

struct cgp_event {
	__u64 time_ns;   /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 cgroup_id; /* the acting process's cgroup (skb: the socket's cgroup) */
	__u32 pid;       /* tgid */
	__u32 tid;
	__u32 hook;      /* CGP_HOOK_* */
	__u32 rule;      /* counter slot: rule index, CGP_DEFAULT_SLOT for the default */
	__u32 flags;     /* CGP_EV_* */
	__u32 family;    /* AF_INET / AF_INET6 (network and socket hooks) */
	__u32 type;      /* socket type (sock_create, sock_addr); device type (device) */
	__u32 protocol;  /* IP protocol (network, sock_addr); socket protocol (sock_create) */
	__u32 major;     /* device */
	__u32 minor;     /* device */
	__u32 access;    /* device: BPF_DEVCG_ACC_* bits */
	__u16 sport;     /* host byte order; skb: source port */
	__u16 dport;     /* host byte order; skb: destination port; sock_addr: the syscall's port */
	__u8 saddr[16];  /* network order, IPv4 in the first 4 bytes; skb: source */
	__u8 daddr[16];  /* skb: destination; sock_addr: the syscall's address */
	char comm[16];
	char name[CGP_EVENT_NAME_MAX]; /* sysctl name, slash form */
};

/* Value of the per-CPU array "ratelimit" (one entry). */
struct cgp_ratelimit {
	__u64 window_start; /* ns, start of the current one-second window on this CPU */
	__u64 dropped;      /* events not emitted: over the limit, or the ring buffer full */
	__u32 sent;         /* events emitted in the current window */
	__u32 limit;        /* events per second per CPU (set by the compiler) */
};

/* May one more event go out on this CPU now? Counts the refusal in `dropped`. On a flood
 * every denial passes here, so callers pass the cheap bpf_ktime_get_coarse_ns() (a tick's
 * resolution is plenty for a one-second window) where the hook offers it. */
static __always_inline int cgp_ratelimit_take(struct cgp_ratelimit *rl, __u64 now)
{
	if (now - rl->window_start >= CGP_NSEC_PER_SEC) {
		rl->window_start = now;
		rl->sent = 0;
	}
	if (rl->sent >= rl->limit) {
		rl->dropped++;
		return 0;
	}
	rl->sent++;
	return 1;
}

/* The event's time is the precise clock, read only for an event that goes out. */
static __always_inline void cgp_event_init(struct cgp_event *e, const struct cgp_verdict *v,
					   __u32 slot, __u32 hook)
{
	__builtin_memset(e, 0, sizeof(*e));
	e->time_ns = bpf_ktime_get_ns();
	e->hook = hook;
	e->rule = slot;
	e->flags = v->audit ? CGP_EV_AUDIT : 0;
}

/* pid, tid, comm and cgroup of the current task: for hooks that run in task context
 * (sock, sock_addr, device, sysctl; not cgroup_skb). */
static __always_inline void cgp_event_task(struct cgp_event *e)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	e->pid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	e->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	e->flags |= CGP_EV_TASK;
}

/*
 * The map layouts of each program: the config value, keys and index entries the compiler
 * fills (cgpolicy/compiler/), and the constants it shares with the program.
 */

/* net.c: network.ingress/egress (cgroup_skb) and sockets.bind/connect (cgroup_sock_addr). */

/* Index into cgp_net_config.proto. */
#define CGP_PROTO_TCP 0
#define CGP_PROTO_UDP 1
#define CGP_PROTO_ICMP 2
#define CGP_PROTO_ICMPV6 3
#define CGP_PROTO_OTHER 4 /* any other protocol: exactly the rules with protocol "any" */
#define CGP_PROTO_N 5

struct cgp_net_config {
	struct cgp_verdict v;
	__u64 any_cidr;  /* rules without cidrs and without fqdns */
	__u64 any_port;  /* rules without ports */
	__u64 any_icmp;  /* rules without icmpTypes (skb only) */
	__u64 any_iface; /* rules without interfaces (skb only) */
	__u64 proto[CGP_PROTO_N];
	__u64 fqdn_rules; /* rules naming fqdns: their address matches through `learned` only */
	__u32 dns_slot;   /* this section's slot in cgp_learned.rules (CGP_DNS_SLOT_*) */
	__u32 dns_learn;  /* ingress: learn from DNS answers to queries egress saw; egress: see them */
	__u32 min_ttl;    /* seconds: an answer's TTL is raised to this */
	__u32 max_ttl;    /* and cut to this */
	__u32 dns_any_server; /* egress: note queries to any server, not only dns_servers' */
	__u32 pad;
};

/* DNS names (net.c): addresses learned from DNS answers, per cgroup. */
#define CGP_DNS_LABELS 32          /* labels of a question name at most */
#define CGP_DNS_NAME_BYTES 256     /* a question name's wire form at most, and the scratch */
#define CGP_DNS_ANSWERS 16         /* answer records read per answer at most */
#define CGP_DNS_ANSWERS_PER_RUN 2  /* per program run: more and the verifier refuses */
#define CGP_DNS_JUMP_QUESTION 0    /* dns_jump slots */
#define CGP_DNS_JUMP_ANSWERS 1
#define CGP_DNS_JUMP_LEARN 2
#define CGP_DNS_JUMPS 3
/* The sections whose rules may name fqdns, each with its own rule numbering: a learned
 * address carries the matching rules of each. */
#define CGP_DNS_SLOT_EGRESS 0
#define CGP_DNS_SLOT_INGRESS 1
#define CGP_DNS_SLOT_CONNECT 2
#define CGP_DNS_SLOTS 3

struct cgp_learned_key {
	__u64 cgroup_id; /* the target cgroup at or above the socket the answer reached */
	__u8 addr[16];   /* IPv6, or IPv4 as ::ffff:a.b.c.d */
};
/* A DNS query seen at egress, waiting for its answer: an answer no socket of the cgroup
 * asked for (another id, another socket, another server) teaches nothing. */
struct cgp_pending_key {
	__u64 cookie; /* the socket's (bpf_get_socket_cookie) */
	__u32 id;     /* the query's DNS id */
	__u32 pad;
};
struct cgp_pending {
	__u64 expires_ns;
	__u8 server[16]; /* where the query went: the answer must come from there */
};
#define CGP_DNS_PENDING_NS 30000000000ULL /* an answer later than 30 s teaches nothing */

struct cgp_learned {
	__u64 expires_ns;            /* bpf_ktime_get_coarse_ns() clock */
	__u64 learned_ns;            /* when the last answer for it arrived (same clock) */
	__u64 rules[CGP_DNS_SLOTS];  /* per section: the fqdns rules the answers' names matched */
	__u64 netns;                 /* the network namespace (cookie) of the socket it reached */
	__u32 name_id;               /* the last answer's most specific pattern (1-based id) */
	__u32 pad;
};
/* dns_names: SipHash-1-3 of a name (or of the domain of a "*." pattern) -> rules. */
struct cgp_name_entry {
	__u64 exact[CGP_DNS_SLOTS];    /* per section: rules naming this name */
	__u64 wildcard[CGP_DNS_SLOTS]; /* rules whose "*." pattern has this for domain */
	__u32 exact_name;              /* ids of the pattern texts (cgp_learned.name_id), 0: none */
	__u32 wildcard_name;
};
/* dns_scope: where the policy's target cgroups are, so that an address learned in a cgroup
 * below a target counts for the whole target (the key of `learned` is the target's id). */
#define CGP_DNS_TARGET_LEVELS 8 /* distinct depths of target cgroups at most */
struct cgp_dns_scope {
	__u32 count;                        /* depths in use */
	__u32 level[CGP_DNS_TARGET_LEVELS]; /* the target cgroups' depths (root: 0), deepest first */
	__u32 pad;
};
/* dns_seen: a bit per address slot (cgp_seen_slot()), set before an address in the slot is
 * learned and never cleared while the load lasts: a clear bit spares the lookup in
 * `learned` (most packets of a cgroup go to addresses no answer gave). */
#define CGP_DNS_SEEN_WORDS 1024 /* 65,536 bits */
/* dns_clock (per CPU, per program): bpf_ktime_get_coarse_ns() as read at `jiffies`. */
struct cgp_clock {
	__u64 jiffies;
	__u64 ns;
};
/* dns_stats (per CPU): what learning did, for audit and metrics. */
struct cgp_dns_stats {
	__u64 learned;  /* addresses written or refreshed */
	__u64 full;     /* addresses not learned because `learned` was full: they stay refused */
	__u64 unasked;  /* answers to no query noted (another server, too late, forged): unlearned */
};
struct cgp_dns_key {
	__u64 k0, k1; /* drawn at random for each load; only the kernel keeps it */
};

/* What the DNS programs hand each other (per CPU; a tail call stays on its CPU). Values go
 * through here on purpose: the verifier tracks none read back from a map, so the many
 * ways out of a parsing loop continue as one state (see cgp_dns_question). */
struct cgp_dns_scratch {
	__u8 name[CGP_DNS_NAME_BYTES + 64]; /* the slack: 8-byte reads near the end */
	__u64 label_hash[CGP_DNS_LABELS];
	__u64 rules[CGP_DNS_SLOTS];
	__u32 labels, len, off, answers_left;
	__u32 cname_ttl; /* the shortest TTL of the CNAMEs read so far: an address lasts no longer */
	__u32 name_id; /* the question's most specific matching pattern (cgp_learned.name_id) */
	__u32 base;    /* where the DNS message starts in the packet */
	__u32 alias;   /* where the last CNAME's target name starts in the message, 0: none */
	__u32 found;   /* addresses read so far, learned once every record read is whole */
	__u32 ttl[CGP_DNS_ANSWERS];
	__u8 addr[CGP_DNS_ANSWERS * 16]; /* the addresses read, 16 bytes each */
};

/* A value of the rule map `ports` (net.c cgp_port_mask), one per 256 ports (by the port's
 * high byte): with `block` 0, `mask` holds the rules whose ports contain all 256; else
 * (blocks count from 1) their masks are port by port in `port_blocks`, from entry
 * (block - 1) * 256 of the copy, `copy_size` being the entries of one copy of it. */
struct cgp_port_hi {
	__u64 mask;
	__u32 block;
	__u32 copy_size;
};
/* spec.dns.servers: one copy (a change of names reloads the policy). */
struct cgp_server_lpm {
	__u32 prefixlen;
	__u8 addr[16];
};
struct cgp_iface_key {
	__u32 ifindex;
	__u32 gen;
};

/* The prefix indexes, IPv6 and IPv4 (net.c, above cgp_cidr_index()): an IPv4 address is
 * the index address's top 32 bits. */
#define CGP_CIDR4_PROBES 6 /* lengths probed at most per IPv4 address */
#define CGP_CIDR6_PROBES 8 /* lengths probed at most per IPv6 address */
#define CGP_CIDR6_SPAN 8    /* slots scanned at most per probe, from the key's home slot */
#define CGP_CIDR6_LIST 7    /* bytes of a list: at most 6 lengths, then 0 */
#define CGP_CIDR6_HASH_MUL 0x5851F42D4C957F2DULL
#define CGP_CIDR6_HASH_LO 0x14057B7EF767814FULL

/* Subprograms (net.c cgp_cidr_walk4): a program calls one as the helper number
 * CGP_SUBPROG_BASE + its index in cgpolicy/contract.py SUBPROGRAMS, and the loader makes
 * that a BPF-to-BPF call. Far above any helper number the kernel has. */
#define CGP_SUBPROG_BASE 0x7c000000
#define CGP_SUBPROG_CIDR_WALK4 (CGP_SUBPROG_BASE + 0)
/* What a program hands cgp_cidr_walk4: the address (hi:lo, host order) and the copy. */
struct cgp_cidr_args {
	__u64 hi, lo;
	__u32 gen, pad;
};

struct cgp_root6 {
	__u64 mask;                 /* rules listing ::/0 (0.0.0.0/0) */
	__u8 shift;                 /* 64 - log2(table slots) */
	__u8 next[CGP_CIDR6_LIST];  /* lengths to probe first, longest first, 0-terminated */
};
struct cgp_slot6 {
	__u8 addr[16];              /* the address masked to len, a little-endian 128-bit
				     * integer: bits 63..0 (lo), then bits 127..64 (hi) */
	__u64 mask;                 /* OR-propagated over every stored prefix containing it */
	__u8 len;                   /* 1..128; 0: an empty slot */
	__u8 next[CGP_CIDR6_LIST];  /* lengths to probe inside it, longest first */
};

/* sock.c: sockets.create (cgroup_sock). */

#define CGP_FAMILY_SLOTS 64
#define CGP_TYPE_SLOTS 16
#define CGP_PROTOCOL_SLOTS 256

struct cgp_create_config {
	struct cgp_verdict v;
	__u64 any_family;   /* rules with family any */
	__u64 any_type;     /* rules with type any */
	__u64 any_protocol; /* rules with protocol any */
	__u64 family[CGP_FAMILY_SLOTS];
	__u64 type[CGP_TYPE_SLOTS];
	__u64 protocol[CGP_PROTOCOL_SLOTS];
};

/* device.c: devices (cgroup_device). */

#define CGP_DEV_ANY 0xffffffffU /* wildcard major/minor ('*') */
#define CGP_DEV_TYPE_ANY 0      /* otherwise BPF_DEVCG_DEV_BLOCK (1) or _CHAR (2) */

struct cgp_dev_rule {
	__u64 bit;    /* 1 << rule index; see cgp_device() */
	__u32 type;   /* CGP_DEV_TYPE_ANY, BPF_DEVCG_DEV_BLOCK or BPF_DEVCG_DEV_CHAR */
	__u32 major;  /* or CGP_DEV_ANY */
	__u32 minor;  /* or CGP_DEV_ANY */
	__u32 access; /* BPF_DEVCG_ACC_MKNOD (1) | _READ (2) | _WRITE (4) */
};

struct cgp_dev_config {
	struct cgp_verdict v;
	__u32 nrules;
	__u32 pad;
	struct cgp_dev_rule rules[CGP_MAX_RULES];
};

/* sysctl.c: sysctl (cgroup_sysctl). */

#define CGP_SYSCTL_DEAD 0  /* no pattern can match any more */
#define CGP_SYSCTL_START 1 /* nothing read yet */

struct cgp_sysctl_config {
	struct cgp_verdict v;
	__u64 read_mask;  /* rules whose access includes read */
	__u64 write_mask; /* rules whose access includes write */
	__u32 nclasses;
	__u8 byte_class[256];
};

#endif /* CGP_COMMON_H */
