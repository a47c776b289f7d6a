// SPDX-License-Identifier: GPL-2.0
/*
 * Network programs: cgroup_skb (network.ingress / network.egress: cgp_ingress, cgp_egress)
 * and cgroup_sock_addr (sockets.bind: cgp_bind4/6; sockets.connect: cgp_connect4/6 and
 * cgp_sendmsg4/6 for unconnected UDP; network.egress checked at connect time, to fail
 * fast: cgp_eg_connect4/6 and cgp_eg_sendmsg4/6). They share one mask engine and map
 * layout, so they share this file (bcc cannot put map accesses in a header, see common.h).
 * A cgroup_skb program returns 0 to drop the packet; a sock_addr one to fail the syscall
 * with EPERM.
 *
 * Each condition of a rule is looked up in its own map and yields the set of rules that
 * condition accepts; a rule matches when all its conditions do:
 *
 *   matched = cidr_mask & proto_mask & port_mask [& icmp_mask & iface_mask (skb only)]
 *
 * Rules without a constraint on a condition are in that condition's any_* mask, so every
 * lookup is "any_x | map[x]". Rules live in maps, not code: a rule change is a map write.
 * Ports use a table by the port's high byte, whose entry holds the rules of all 256 ports
 * or points to a block of them port by port (cgp_port_mask). CIDRs use an index whose
 * masks are propagated (the OR of the masks of every stored prefix containing it) that the
 * program hashes itself, one per address family (cgp_cidr_index).
 *
 * Conditions that cannot be evaluated are "unknown": an unknown condition matches every
 * deny rule and no allow rule that constrains it (unknown = any_x | deny_mask). A packet can
 * therefore never slip past a deny rule by hiding its fields, and is never let in by an
 * allow rule it might not satisfy; it falls to a deny rule or to the default.
 */
#include "common.h"
#include "packet.h"

#ifndef CGP_CIDR4_SLOTS_MAX
#define CGP_CIDR4_SLOTS_MAX 1
#endif
#ifndef CGP_CIDR6_SLOTS_MAX
#define CGP_CIDR6_SLOTS_MAX 1
#endif
#ifndef CGP_PORT_BLOCKS_MAX
#define CGP_PORT_BLOCKS_MAX 1
#endif
#ifndef CGP_IFACES_MAX
#define CGP_IFACES_MAX 1
#endif

#define CGP_ETH_P_IP 0x0800
#define CGP_ETH_P_IPV6 0x86DD

/* The layouts of these maps (struct cgp_net_config, cgp_port_hi, cgp_root6, cgp_slot6)
 * and the CGP_PROTO_* slots are in common.h, with every layout the compiler fills. */
/*
 * Two copies of the rules, and a switch. Every map below down to `ifaces` holds two
 * copies of its contents, told apart by a generation (0 or 1): arrays at index
 * gen * (max_entries / 2) + i, hashes by a `gen` field of the key. `generation` (one per policy
 * load, shared by all of its programs) names the copy in force; a program reads it once,
 * first, and makes every lookup in that copy. A change is written into the other copy,
 * then `generation` is flipped with one map update, so a packet or a syscall meets the old
 * rules or the new ones, never a mix, on every hook of the policy at once; after an RCU
 * grace period the old copy is brought level (cgpolicy/kernel/inplace.py).
 */
BPF_ARRAY(generation, __u32, 1);
BPF_ARRAY(config, struct cgp_net_config, 2);
/* The prefix indexes (cgp_cidr_index): IPv4 and IPv6 each a root and a table of slots. */
BPF_ARRAY(cidr4_root, struct cgp_root6, 2);
BPF_ARRAY(cidr4_slots, struct cgp_slot6, CGP_CIDR4_SLOTS_MAX);
BPF_ARRAY(cidr6_root, struct cgp_root6, 2);
BPF_ARRAY(cidr6_slots, struct cgp_slot6, CGP_CIDR6_SLOTS_MAX);
/* Ports (cgp_port_mask): by high byte, then port by port where rules' ports begin or end
 * inside a block of 256. */
BPF_ARRAY(ports, struct cgp_port_hi, 2 * 256);
BPF_ARRAY(port_blocks, __u64, CGP_PORT_BLOCKS_MAX);
/* ICMP/ICMPv6 type -> rules listing it (both protocols share the table; the protocol mask
 * keeps them apart). skb only. */
BPF_ARRAY(icmp_types, __u64, 2 * 256);
/* ifindex -> rules whose interfaces (resolved at compile time) include it. skb only. */
BPF_HASH(ifaces, struct cgp_iface_key, __u64, CGP_IFACES_MAX);
BPF_PERCPU_ARRAY(counters, struct cgp_counter, CGP_COUNTER_SLOTS);

BPF_RINGBUF_OUTPUT(events, 1);
BPF_PERCPU_ARRAY(ratelimit, struct cgp_ratelimit, 1);

/* DNS names (layouts in common.h). One `learned` map and one `dns_jump` per policy load,
 * shared by its programs; the others belong to the ingress program and its tail calls. */
#ifndef CGP_DNS_NAMES_MAX
#define CGP_DNS_NAMES_MAX 1
#endif
#ifndef CGP_LEARNED_MAX
#define CGP_LEARNED_MAX 1
#endif
BPF_HASH(dns_names, __u64, struct cgp_name_entry, CGP_DNS_NAMES_MAX);
BPF_ARRAY(dns_key, struct cgp_dns_key, 1);
/* A plain hash, not an LRU: an LRU lookup costs twice as much per packet, and a full map
 * must refuse new entries (fail closed, counted in dns_stats.full) rather than evict live
 * ones. The service deletes expired entries. */
BPF_F_TABLE("hash", struct cgp_learned_key, struct cgp_learned, learned, CGP_LEARNED_MAX,
	    BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(dns_stats, struct cgp_dns_stats, 1);
#ifndef CGP_DNS_TARGETS_MAX
#define CGP_DNS_TARGETS_MAX 1
#endif
BPF_ARRAY(dns_scope, struct cgp_dns_scope, 1);
BPF_PERCPU_ARRAY(dns_clock, struct cgp_clock, 1);
BPF_ARRAY(dns_seen, __u64, CGP_DNS_SEEN_WORDS);
#ifndef CGP_DNS_SERVERS_MAX
#define CGP_DNS_SERVERS_MAX 1
#endif
/* spec.dns.servers (IPv4 as ::ffff:a.b.c.d/96+n): the only servers whose answers teach,
 * unless config.dns_any_server. The egress program's. */
BPF_LPM_TRIE(dns_servers, struct cgp_server_lpm, __u64, CGP_DNS_SERVERS_MAX);
/* The target cgroups' ids, checked when targets lie at more than one depth. */
BPF_F_TABLE("hash", __u64, __u32, dns_targets, CGP_DNS_TARGETS_MAX, BPF_F_NO_PREALLOC);
BPF_PROG_ARRAY(dns_jump, CGP_DNS_JUMPS);
#ifndef CGP_DNS_PENDING_MAX
#define CGP_DNS_PENDING_MAX 1
#endif
BPF_TABLE("lru_hash", struct cgp_pending_key, struct cgp_pending, dns_pending,
	  CGP_DNS_PENDING_MAX);

BPF_PERCPU_ARRAY(dns_scratch, struct cgp_dns_scratch, 1);

/* The copy of the rules in force (see `generation`): 0 or 1. */
static __always_inline __u32 cgp_generation(void)
{
	__u32 zero = 0, *gen = generation.lookup(&zero);

	return gen ? *gen & 1 : 0;
}

/* Decide and count; *d says what was decided, for the deny event. */
static __always_inline int cgp_verdict(const struct cgp_verdict *v, __u64 matched,
				       struct cgp_decision *d)
{
	*d = cgp_decide(v, matched);
	return cgp_count(v, d, counters.lookup(&d->slot));
}

/* After a denial: an event to fill and pass to events.ringbuf_submit(), or NULL when the
 * rate limit or a full ring buffer stops it (counted in ratelimit.dropped). */
static __always_inline struct cgp_event *cgp_event_reserve(const struct cgp_verdict *v,
							   const struct cgp_decision *d, __u32 hook)
{
	__u32 zero = 0;
	struct cgp_ratelimit *rl;
	struct cgp_event *e;

	if (d->allowed)
		return NULL;
	rl = ratelimit.lookup(&zero);
	if (!rl)
		return NULL;
	if (!cgp_ratelimit_take(rl, bpf_ktime_get_coarse_ns()))
		return NULL;
	e = events.ringbuf_reserve(sizeof(struct cgp_event));
	if (!e) {
		rl->sent--;
		rl->dropped++;
		return NULL;
	}
	cgp_event_init(e, v, d->slot, hook);
	return e;
}

/*
 * CIDRs: an LPM trie lookup walks one node per distinguishing prefix bit (~80 ns with
 * 100,000 entries against ~11 ns with one), and a kernel hash map lookup costs ~30 ns, so
 * prefixes, whatever their number, live in a hash table the program hashes itself, one per
 * address family: cidr4_slots and cidr6_slots, arrays of struct cgp_slot6 (32 B),
 * open-addressed, whose array lookups the verifier inlines (a probe is a multiply, a shift
 * and one or two slot reads). An IPv4 address is the index's 128-bit address with the
 * IPv4 address as its top 32 bits (lengths 0..32); IPv4 and IPv6 lookups never meet each
 * other's entries, being in maps of their own. An entry is a stored prefix or a marker (a
 * prefix leading to longer stored ones), keyed by (len, address masked to len) and found
 * from its home slot (the top bits of cgp_cidr_hash, shift in cidr4_root / cidr6_root)
 * within CGP_CIDR6_SPAN slots; an empty slot ends the scan. It holds the mask
 * OR-propagated over every stored prefix containing it and the list of longer lengths to
 * probe inside it (longest first, at most CGP_CIDR6_LIST - 1).
 *
 * The lookup probes the root's list longest first: a hit takes the hit's mask (it holds
 * every shorter match) and goes on with the hit's own list, a miss with the next length.
 * The compiler (cgpolicy/compiler/cidr6.py) shapes the lists so that no address costs more
 * than CGP_CIDR6_PROBES probes (CGP_CIDR4_PROBES for IPv4's 32 lengths): a root listing
 * every length when there are few (a list of /64s, or of IPv4 /24s and /32s: one or two
 * probes), a bucket (every prefix behind a marker at the shortest length, e.g. per /32)
 * where that splits the list, else a binary search on lengths. Memory: 32 B per slot, at
 * least twice as many slots as entries, rounded up to a power of two, plus CGP_CIDR6_SPAN:
 * 64 to 128 B per stored prefix, twice that for the markers of a list with many lengths
 * (docs/policy.md, "Memory").
 */
static __always_inline __u64 cgp_cidr_hash(__u64 hi, __u64 lo, __u32 len)
{
	return (hi ^ (lo * CGP_CIDR6_HASH_LO) ^ len) * CGP_CIDR6_HASH_MUL;
}

/* The index's mask for the address hi:lo (host-order 64-bit halves); `v4` (a constant):
 * the IPv4 index (cidr4_root, cidr4_slots; the address in hi's top 32 bits, lo 0), else
 * the IPv6 one. The list being probed is kept as the 8 bytes it was read as (the root's
 * shift or the hit slot's len, then its lengths, then at least one 0) and rotated a byte
 * at a time, never narrowed: the verifier, which knows nothing of a value read from a
 * map, then sees every way out of a probe (hit, empty slot, end of the scan) continue as
 * one state. A byte counter instead gave it a state per count: 4 times the verifier steps
 * (connect6). */
static __always_inline __u64 cgp_cidr_index(__u32 gen, __u64 hi, __u64 lo, const int v4)
{
	struct cgp_root6 *root;
	__u64 found, list;
	__u32 shift, base, i;

	root = v4 ? cidr4_root.lookup(&gen) : cidr6_root.lookup(&gen);
	if (!root)
		return 0;
	found = root->mask;
	__builtin_memcpy(&list, &root->shift, 8); /* shift, then the list */
	shift = list & 63;
	/* copy 1 of the table follows copy 0, whose size the shift gives (cidr6.py) */
	base = gen * (__u32)((1ULL << ((64 - shift) & 63)) + CGP_CIDR6_SPAN);
	/* Count-bounded loops with no branch on the lengths' values: a short verifier walk. */
	for (i = 0; i < (v4 ? CGP_CIDR4_PROBES : CGP_CIDR6_PROBES); i++) {
		__u32 len, home, j;
		__u64 khi = hi, klo = 0;

		list = (list >> 8) | (list << 56); /* the next length in the low byte */
		len = list & 0xff;
		if (!len)
			break;
		if (!v4 && len > 64)
			klo = lo & (~0ULL << ((128 - len) & 63));
		else
			khi = hi & (~0ULL << ((64 - len) & 63));
		home = cgp_cidr_hash(khi, klo, len) >> shift;
		for (j = 0; j < CGP_CIDR6_SPAN; j++) {
			__u32 at = base + home + j;
			struct cgp_slot6 *slot =
				v4 ? cidr4_slots.lookup(&at) : cidr6_slots.lookup(&at);
			__u64 key[2];

			if (!slot || !slot->len)
				break;
			__builtin_memcpy(key, slot->addr, 16);
			if (slot->len == len && (v4 || key[0] == klo) && key[1] == khi) {
				found = slot->mask;
				__builtin_memcpy(&list, &slot->len, 8); /* len, then the list */
				break;
			}
		}
	}
	return found;
}

/*
 * The IPv4 walk for an IPv4-mapped address in an IPv6 program (cgp_cidr6_mask) is a
 * subprogram, a global function to the verifier (cgpolicy/kernel/loader.py gives it the
 * BTF that says so): checked once, on its own, and every path leaves its call as one state.
 * Inline, this second walk left ~110 states after it, and the verifier walked the rest of
 * the packet programs once per state: 27,600 steps; 18,300 with the call (about 1 us a step).
 * Only this walk: on this machine's CPUs a BPF-to-BPF call and its return cost ~8 ns per
 * packet (the return goes through the kernel's return thunk), and a mapped address is rare
 * in a packet (a dual-stack socket sends IPv4 packets). bcc cannot compile a call between
 * its functions, so the program calls the helper number CGP_SUBPROG_CIDR_WALK4, which the
 * loader turns into a call of the subprogram it appends. The argument is a pointer to the
 * caller's stack: bcc reads a program function's arguments after the first from pt_regs.
 */
__u64 cgp_cidr_walk4(struct cgp_cidr_args *a)
{
	if (!a) /* a global function's pointer argument may be NULL, to the verifier */
		return 0;
	return cgp_cidr_index(a->gen, a->hi, a->lo, 1);
}

static __u64 (*cgp_call_cidr_walk4)(struct cgp_cidr_args *) = (void *)CGP_SUBPROG_CIDR_WALK4;

/*
 * Which prefix indexes a program reads (`fam`, a constant): CGP_FAM4 the IPv4 one, CGP_FAM6
 * the IPv6 one. A policy section listing no prefix of a family gets the variant of each
 * program without that family's walk (cgpolicy/contract.py family_variant): its index is
 * empty, so the walk would find no rule, and without it the verifier has that much less to
 * walk at every load (the IPv6 walk is most of the steps of an IPv6 connect check). The
 * names variants read both.
 */
#define CGP_FAM4 1
#define CGP_FAM6 2
#define CGP_FAM_BOTH (CGP_FAM4 | CGP_FAM6)

/* Rules whose cidrs contain the IPv4 address `addr` (network byte order). */
static __always_inline __u64 cgp_cidr4_mask(const struct cgp_net_config *cfg, __u32 gen,
					    __u32 addr, const int fam)
{
	if (!(fam & CGP_FAM4))
		return cfg->any_cidr;
	return cfg->any_cidr | cgp_cidr_index(gen, (__u64)bpf_ntohl(addr) << 32, 0, 1);
}

/* Rules whose cidrs contain the IPv6 address `addr` (four network-order words).
 * An IPv4-mapped address (::ffff:a.b.c.d) is the IPv4 address a.b.c.d: a dual-stack
 * socket connecting to ::ffff:169.254.169.254 talks IPv4 to 169.254.169.254, so it meets
 * the IPv4 rules too. Rules written either way apply (a rule's cidrs are ORed). */
static __always_inline __u64 cgp_cidr6_mask(const struct cgp_net_config *cfg, __u32 gen,
					    const __u32 addr[4], const int fam)
{
	__u64 hi = ((__u64)bpf_ntohl(addr[0]) << 32) | bpf_ntohl(addr[1]);
	__u64 lo = ((__u64)bpf_ntohl(addr[2]) << 32) | bpf_ntohl(addr[3]);
	__u64 mask = cfg->any_cidr;

	if (fam & CGP_FAM6)
		mask |= cgp_cidr_index(gen, hi, lo, 0);
	if ((fam & CGP_FAM4) && addr[0] == 0 && addr[1] == 0 && addr[2] == bpf_htonl(0x0000ffff)) {
		struct cgp_cidr_args a = {.hi = (__u64)bpf_ntohl(addr[3]) << 32, .gen = gen};

		mask |= cgp_call_cidr_walk4(&a);
	}
	return mask;
}

/* Whether some rule lists cidrs; when none does (a section of names, ports or protocols
 * only), every address meets exactly the any_cidr rules and the lookups are skipped. */
static __always_inline int cgp_cidr_listed(const struct cgp_net_config *cfg)
{
	return ((cfg->v.allow_mask | cfg->v.deny_mask) & ~(cfg->any_cidr | cfg->fqdn_rules)) != 0;
}

/* Rules whose ports contain `port` (host byte order): one or two array lookups, which the
 * verifier inlines (an LPM trie lookup was a call, ~16 ns a packet here). */
static __always_inline __u64 cgp_port_mask(const struct cgp_net_config *cfg, __u32 gen,
					   __u16 port)
{
	__u32 at = gen * 256 + (port >> 8);
	struct cgp_port_hi *hi = ports.lookup(&at);
	__u64 *hit;

	if (!hi)
		return cfg->any_port;
	if (!hi->block)
		return cfg->any_port | hi->mask;
	at = gen * hi->copy_size + (hi->block - 1) * 256 + (port & 0xff);
	hit = port_blocks.lookup(&at);
	return cfg->any_port | (hit ? *hit : 0);
}

/*
 * cgroup_skb.
 *
 * Rules match the *remote* end, because that is what an operator names ("may only talk
 * to 10.0.0.0/8"): the destination address on egress, the source address on ingress. The
 * port is always the destination port, which is the remote (service) port on egress and
 * the local (listening) port on ingress.
 *
 * The program sees the packet from its network header (offset 0). Unknown conditions:
 *  - non-first fragments (IPv4 offset != 0, IPv6 fragment header offset != 0) have no
 *    ports and no ICMP type; their protocol is known;
 *  - an IPv6 packet with more than CGP_IPV6_EXT_MAX extension headers, or whose headers
 *    run past the packet, has an unknown protocol (hence unknown ports and ICMP type);
 *  - a truncated TCP/UDP/ICMP header: unknown ports / ICMP type;
 *  - a packet that is neither IPv4 nor IPv6: unknown address and protocol. None should
 *    reach these hooks (they run in the IPv4/IPv6 output path and the inet socket receive
 *    path); should one appear it is handled like an unparseable packet rather than waved
 *    through, since it has no address an allow rule could have approved;
 *  - no device (ifindex 0): unknown interface.
 * Protocols are matched by number: ICMP is protocol 1 and ICMPv6 58, whichever IP version
 * carries them. Packets without ports (ICMP, ESP, ...) do not match rules with ports, and
 * packets that are not ICMP do not match rules with icmpTypes.
 * The header layouts and the IPv6 extension-header walk are in packet.h (learn.c reads
 * packets the same way).
 */

/* Copy `len` bytes at `offset` of the packet (from the network header) to `to`; 0 on
 * success. Directly from the linear area when they lie in it (no helper call, the common
 * case), else with bpf_skb_load_bytes, which also reads the paged part. */
static __always_inline int cgp_load(struct __sk_buff *skb, __u32 offset, void *to, __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	/* The bound keeps the verifier's packet offset in range; callers pass constants far
	 * below it. */
	if (offset < 0x4000 && data + offset + len <= data_end) {
		__builtin_memcpy(to, data + offset, len);
		return 0;
	}
	return bpf_skb_load_bytes(skb, offset, to, len);
}

/* cgp_load() at `add` bytes into the L4 header at `offset`. The header usually follows a
 * bare IPv4 (20 bytes) or IPv6 (40 bytes) header: those constant offsets read directly.
 * Any other offset takes the helper: a direct read at a variable offset costs the verifier
 * four times the work for this program (it stops pruning the paths after it). */
static __always_inline int cgp_load_l4(struct __sk_buff *skb, __u32 offset, __u32 add, void *to,
				       __u32 len)
{
	if (offset == sizeof(struct cgp_ipv4))
		return cgp_load(skb, sizeof(struct cgp_ipv4) + add, to, len);
	if (offset == sizeof(struct cgp_ipv6))
		return cgp_load(skb, sizeof(struct cgp_ipv6) + add, to, len);
	return bpf_skb_load_bytes(skb, offset + add, to, len);
}

static __always_inline __u32 cgp_proto_slot(__u32 proto)
{
	switch (proto) {
	case CGP_IPPROTO_TCP:
		return CGP_PROTO_TCP;
	case CGP_IPPROTO_UDP:
		return CGP_PROTO_UDP;
	case CGP_IPPROTO_ICMP:
		return CGP_PROTO_ICMP;
	case CGP_IPPROTO_ICMPV6:
		return CGP_PROTO_ICMPV6;
	default:
		return CGP_PROTO_OTHER;
	}
}

/* What a denied packet was: addresses, protocol and ports, read again from the packet (the
 * deny path only). No task context in cgroup_skb: the cgroup is the socket's.
 * The layer-4 facts go through the record and are read back before anything branches on
 * them: to the verifier a value read from a ring buffer record is unknown, so these
 * branches do not tie the constants each parsing path left in `l4` (protocol, offset,
 * fragment) to the verdict before them, and the paths that reach it with different ones
 * are checked there once, not once each (the plain packet programs: 18,300 -> 12,300
 * verifier steps). The scratch fields (type, major: not an skb event's) are cleared. */
static __always_inline void cgp_skb_event(struct __sk_buff *skb, const struct cgp_l4 *l4,
					  struct cgp_event *e)
{
	volatile struct cgp_event *through = e; /* so that the compiler reads them back too */
	__u32 facts, proto, offset;
	__u16 ports[2];

	through->type = l4->proto_known | l4->header << 1;
	through->protocol = l4->proto;
	through->major = l4->offset;
	facts = through->type;
	proto = through->protocol;
	offset = through->major;
	through->type = 0;
	through->major = 0;
	if (!(facts & 1))
		through->protocol = 0;

	e->cgroup_id = bpf_skb_cgroup_id(skb);
	if (skb->protocol == bpf_htons(CGP_ETH_P_IP)) {
		e->family = 2; /* AF_INET */
		bpf_skb_load_bytes(skb, 12, e->saddr, 4);
		bpf_skb_load_bytes(skb, 16, e->daddr, 4);
	} else if (skb->protocol == bpf_htons(CGP_ETH_P_IPV6)) {
		e->family = 10; /* AF_INET6 */
		bpf_skb_load_bytes(skb, 8, e->saddr, 32); /* saddr and daddr are adjacent */
	}
	if ((facts & 3) == 3 && (proto == CGP_IPPROTO_TCP || proto == CGP_IPPROTO_UDP) &&
	    !bpf_skb_load_bytes(skb, offset, ports, sizeof(ports))) {
		e->sport = bpf_ntohs(ports[0]);
		e->dport = bpf_ntohs(ports[1]);
	}
}

/*
 * DNS names. An address matches an fqdns rule while `learned` holds it for the cgroup with
 * that rule's bit, unexpired. Entries come from DNS answers the ingress program lets
 * through: it tail-calls cgp_dns_question, which hashes the question name and looks it up
 * in dns_names, then cgp_dns_answers, which writes each A and AAAA record of a matching
 * answer. All of it runs before the kernel hands the answer to the socket, so a process
 * that reads the answer and connects at once finds the entry there.
 */

/* The 8 bytes of `w` with A-Z lowercased and every other byte as it is, without a branch:
 * per byte, bit 7 of (b & 0x7f) + 0x3f is set from 'A' up, of (b & 0x7f) + 0x25 above 'Z'
 * (no carry leaves a byte), and a byte with bit 7 set is no ASCII letter. */
static __always_inline __u64 cgp_ascii_lower(__u64 w)
{
	__u64 low7 = w & 0x7f7f7f7f7f7f7f7fULL;
	__u64 from_a = low7 + 0x3f3f3f3f3f3f3f3fULL;
	__u64 above_z = low7 + 0x2525252525252525ULL;
	__u64 upper = (from_a ^ above_z) & ~w & 0x8080808080808080ULL;

	return w | (upper >> 2);
}

#define CGP_ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))

/* SipHash-1-3 over 64-bit words: one round per word absorbed, three to finalize. */
struct cgp_sip {
	__u64 v0, v1, v2, v3;
};

static __always_inline void cgp_sip_round(struct cgp_sip *s)
{
	s->v0 += s->v1; s->v1 = CGP_ROTL(s->v1, 13); s->v1 ^= s->v0; s->v0 = CGP_ROTL(s->v0, 32);
	s->v2 += s->v3; s->v3 = CGP_ROTL(s->v3, 16); s->v3 ^= s->v2;
	s->v0 += s->v3; s->v3 = CGP_ROTL(s->v3, 21); s->v3 ^= s->v0;
	s->v2 += s->v1; s->v1 = CGP_ROTL(s->v1, 17); s->v1 ^= s->v2; s->v2 = CGP_ROTL(s->v2, 32);
}

static __always_inline void cgp_sip_init(struct cgp_sip *s, const struct cgp_dns_key *k)
{
	s->v0 = k->k0 ^ 0x736f6d6570736575ULL;
	s->v1 = k->k1 ^ 0x646f72616e646f6dULL;
	s->v2 = k->k0 ^ 0x6c7967656e657261ULL;
	s->v3 = k->k1 ^ 0x7465646279746573ULL;
}

static __always_inline void cgp_sip_absorb(struct cgp_sip *s, __u64 m)
{
	s->v3 ^= m;
	cgp_sip_round(s);
	s->v0 ^= m;
}

static __always_inline __u64 cgp_sip_final(struct cgp_sip s)
{
	s.v2 ^= 0xff;
	cgp_sip_round(&s);
	cgp_sip_round(&s);
	cgp_sip_round(&s);
	return s.v0 ^ s.v1 ^ s.v2 ^ s.v3;
}

/* The target cgroup a socket lies in: the id `learned` is keyed by, so an answer that
 * reached any cgroup below a target counts for all of it, and for no other target. The
 * socket's cgroup on skb hooks; on sock_addr hooks (skb NULL) the calling task's, since
 * they may not ask for a socket's ancestors: a socket passed to a process of another
 * target is connected with what that process's target learned. Targets at one depth (the
 * usual case: one path, or a glob) need one helper call; at several, the deepest ancestor
 * that is a target. 0 (nothing learned, nothing matched) if none is. */
static __always_inline __u64 cgp_dns_target(struct __sk_buff *skb, const int is_skb)
{
	__u32 zero = 0;
	struct cgp_dns_scope *scope = dns_scope.lookup(&zero);

	if (!scope)
		return 0;
	for (int i = 0; i < CGP_DNS_TARGET_LEVELS; i++) {
		if (i >= scope->count)
			break;
		int level = scope->level[i];
		/* is_skb is a constant at each call: one helper is compiled in */
		__u64 id = is_skb ? bpf_skb_ancestor_cgroup_id(skb, level)
				  : bpf_get_current_ancestor_cgroup_id(level);

		if (id && (scope->count == 1 || dns_targets.lookup(&id)))
			return id;
	}
	return 0;
}

/* Now, on the clock of learned entries (bpf_ktime_get_coarse_ns), for the price of reading
 * jiffies: the coarse clock moves once a tick, so it is read once per jiffy and CPU and
 * kept (measured: a coarse-clock read per packet cost about 20 ns more). It may lag by a
 * tick: an entry then expires a few milliseconds late. */
static __always_inline __u64 cgp_coarse_now(void)
{
	__u32 zero = 0;
	struct cgp_clock *clock = dns_clock.lookup(&zero);
	__u64 jiffies = bpf_jiffies64();

	if (!clock)
		return bpf_ktime_get_coarse_ns();
	if (clock->jiffies != jiffies) {
		clock->ns = bpf_ktime_get_coarse_ns();
		clock->jiffies = jiffies;
	}
	return clock->ns;
}

/* An address's bit in dns_seen: the top 16 bits of an IPv4 (mapped) address, the 16-bit
 * words of an IPv6 one folded by xor. */
static __always_inline __u32 cgp_seen_slot(const __u8 addr[16])
{
	if (addr[10] == 0xff && addr[11] == 0xff && !(addr[0] | addr[1] | addr[2] | addr[3] |
							  addr[4] | addr[5] | addr[6] | addr[7] |
							  addr[8] | addr[9]))
		return ((__u32)addr[12] << 8) | addr[13];
	__u32 even = addr[0] ^ addr[2] ^ addr[4] ^ addr[6] ^ addr[8] ^ addr[10] ^ addr[12] ^ addr[14];
	__u32 odd = addr[1] ^ addr[3] ^ addr[5] ^ addr[7] ^ addr[9] ^ addr[11] ^ addr[13] ^ addr[15];
	return (even << 8) | odd;
}

/* The fqdns rules of `cfg` that the live entry of `learned` at `key` holds. */
static __always_inline __u64 cgp_learned_for(const struct cgp_net_config *cfg,
					     const struct cgp_learned_key *key, void *ctx)
{
	__u32 slot = cfg->dns_slot;
	struct cgp_learned *hit = learned.lookup(key);

	if (!hit || slot >= CGP_DNS_SLOTS || hit->expires_ns <= cgp_coarse_now())
		return 0;
	/* An answer a process got in a network namespace of its own (which it can make, and
	 * be any server in) teaches that namespace only. */
	if (hit->netns != bpf_get_netns_cookie(ctx))
		return 0;
	return hit->rules[slot] & cfg->fqdn_rules;
}

/* Whether an address of this one's slot was ever learned: what costs no helper call first,
 * since most addresses lie in slots nothing was learned in. */
static __always_inline int cgp_maybe_learned(const __u8 addr[16])
{
	__u32 seen_slot = cgp_seen_slot(addr), word = seen_slot >> 6;
	__u64 *seen = dns_seen.lookup(&word);

	return seen && (*seen & (1ULL << (seen_slot & 63)));
}

/* The fqdns rules that `learned` holds for this target cgroup and remote address, live. */
static __always_inline __u64 cgp_learned_rules(const struct cgp_net_config *cfg,
					       const __u8 addr[16], void *ctx, const int is_skb)
{
	struct cgp_learned_key key = {};

	if (!cgp_maybe_learned(addr))
		return 0; /* no address of this slot was ever learned */
	key.cgroup_id = cgp_dns_target(ctx, is_skb);
	if (!key.cgroup_id)
		return 0;
	__builtin_memcpy(key.addr, addr, 16);
	return cgp_learned_for(cfg, &key, ctx);
}

static __always_inline void cgp_mapped4(__u8 out[16], __u32 addr4)
{
	__builtin_memset(out, 0, 10);
	out[10] = 0xff;
	out[11] = 0xff;
	__builtin_memcpy(out + 12, &addr4, 4);
}

/* `names` (a constant): the variant for policies whose rules name fqdns, which reads the
 * learned addresses and learns from DNS. Without it the verifier has a fraction of the paths
 * to walk (~10 ms instead of ~300 ms per load): the DNS code is not in the program at all. */
static __always_inline int cgp_skb(struct __sk_buff *skb, const int egress, const int names,
				   const int fam)
{
	const struct cgp_net_config *cfg;
	struct cgp_l4 l4 = {};
	__u64 unknown, cidr_mask, proto_mask, port_mask, icmp_mask, iface_mask;
	__u32 zero = 0, gen = cgp_generation(), slot;
	struct cgp_decision d;
	struct cgp_event *e;
	__u64 *hit;
	int ret;

	cfg = config.lookup(&gen);
	if (!cfg)
		return 0; /* cannot happen (array map); fail closed */
	unknown = cfg->v.deny_mask;
	cidr_mask = cfg->any_cidr | unknown;
	__u8 remote[16] = {};

	if (skb->protocol == bpf_htons(CGP_ETH_P_IP)) {
		struct cgp_ipv4 ip;

		if (!cgp_load(skb, 0, &ip, sizeof(ip))) {
			__u32 ihl = ip.ver_ihl & 0xf;

			if (cgp_cidr_listed(cfg))
				cidr_mask = cgp_cidr4_mask(cfg, gen, egress ? ip.daddr : ip.saddr, fam);
			else
				cidr_mask = cfg->any_cidr;
			if (names && (cfg->fqdn_rules | cfg->dns_learn))
				cgp_mapped4(remote, egress ? ip.daddr : ip.saddr);
			if (names && cfg->fqdn_rules)
				cidr_mask |= cgp_learned_rules(cfg, remote, skb, 1);
			l4.proto_known = 1;
			l4.proto = ip.protocol;
			l4.offset = ihl * 4;
			/* Only the first fragment carries the L4 header; ihl < 5 is malformed. */
			l4.header = !(ip.frag_off & bpf_htons(0x1fff)) && ihl >= 5;
		}
	} else if (skb->protocol == bpf_htons(CGP_ETH_P_IPV6)) {
		struct cgp_ipv6 ip6;

		if (!cgp_load(skb, 0, &ip6, sizeof(ip6))) {
			cidr_mask = cgp_cidr_listed(cfg)
					    ? cgp_cidr6_mask(cfg, gen, egress ? ip6.daddr : ip6.saddr, fam)
					    : cfg->any_cidr;
			if (names && (cfg->fqdn_rules | cfg->dns_learn))
				__builtin_memcpy(remote, egress ? ip6.daddr : ip6.saddr, 16);
			if (names && cfg->fqdn_rules)
				cidr_mask |= cgp_learned_rules(cfg, remote, skb, 1);
			cgp_ipv6_l4(skb, ip6.nexthdr, &l4);
		}
	}

	if (!l4.proto_known) {
		proto_mask = cfg->proto[CGP_PROTO_OTHER] | unknown;
		port_mask = cfg->any_port | unknown;
		icmp_mask = cfg->any_icmp | unknown;
	} else {
		slot = cgp_proto_slot(l4.proto);
		proto_mask = cfg->proto[slot];
		port_mask = cfg->any_port;
		icmp_mask = cfg->any_icmp;
		if (slot == CGP_PROTO_TCP || slot == CGP_PROTO_UDP) {
			__u16 dport;

			/* TCP and UDP both keep the destination port at offset 2. */
			if (l4.header && !cgp_load_l4(skb, l4.offset, 2, &dport, 2))
				port_mask = cgp_port_mask(cfg, gen, bpf_ntohs(dport));
			else
				port_mask |= unknown;
		} else if (slot == CGP_PROTO_ICMP || slot == CGP_PROTO_ICMPV6) {
			__u8 type;

			if (l4.header && !cgp_load_l4(skb, l4.offset, 0, &type, 1)) {
				__u32 key = gen * 256 + type;

				hit = icmp_types.lookup(&key);
				if (hit)
					icmp_mask |= *hit;
			} else {
				icmp_mask |= unknown;
			}
		}
	}

	/* When no rule names an interface, any_iface holds every rule: skip the lookup. */
	iface_mask = cfg->any_iface;
	if ((cfg->v.allow_mask | cfg->v.deny_mask) & ~iface_mask) {
		struct cgp_iface_key key = {.ifindex = skb->ifindex, .gen = gen};

		if (!key.ifindex) {
			iface_mask |= unknown;
		} else {
			hit = ifaces.lookup(&key);
			if (hit)
				iface_mask |= *hit;
		}
	}

	ret = cgp_verdict(&cfg->v, cidr_mask & proto_mask & port_mask & icmp_mask & iface_mask, &d);
	e = cgp_event_reserve(&cfg->v, &d, egress ? CGP_HOOK_EGRESS : CGP_HOOK_INGRESS);
	if (e) {
		cgp_skb_event(skb, &l4, e);
		events.ringbuf_submit(e, 0);
	}
	if (names && ret == 1 && cfg->dns_learn && l4.proto_known &&
	    l4.proto == CGP_IPPROTO_UDP && l4.header) {
		__u16 ports[2]; /* source, destination */
		__u16 id;
		struct cgp_pending_key pk = {.cookie = bpf_get_socket_cookie(skb)};

		if (cgp_load_l4(skb, l4.offset, 0, ports, 4) ||
		    cgp_load_l4(skb, l4.offset, 8, &id, 2))
			return ret;
		pk.id = id;
		if (egress && ports[1] == bpf_htons(53)) {
			/* A query sent to a server whose answers teach: remember it, and where it
			 * went. */
			struct cgp_server_lpm server = {.prefixlen = 128};
			struct cgp_pending pending = {
				.expires_ns = bpf_ktime_get_coarse_ns() + CGP_DNS_PENDING_NS};

			__builtin_memcpy(server.addr, remote, 16);
			if (!cfg->dns_any_server && !dns_servers.lookup(&server))
				return ret;

			__builtin_memcpy(pending.server, remote, 16);
			dns_pending.update(&pk, &pending);
		} else if (!egress && ports[0] == bpf_htons(53)) {
			/* An answer let in: learn from it, before the socket can read it, if a
			 * socket of this cgroup asked this server this question. */
			struct cgp_pending *pending = dns_pending.lookup(&pk);
			struct cgp_dns_scratch *s = dns_scratch.lookup(&zero);
			struct cgp_dns_stats *stats = dns_stats.lookup(&zero);

			__u64 asked[2] = {}, from[2];

			if (pending)
				__builtin_memcpy(asked, pending->server, 16);
			__builtin_memcpy(from, remote, 16);
			if (!pending || pending->expires_ns <= bpf_ktime_get_coarse_ns() ||
			    asked[0] != from[0] || asked[1] != from[1]) {
				if (stats)
					stats->unasked++;
				return ret;
			}
			if (!s)
				return ret;
			dns_pending.delete(&pk); /* one answer per query */
			s->off = l4.offset + 8;
			dns_jump.call(skb, CGP_DNS_JUMP_QUESTION); /* returns only if it fails */
		}
	}
	return ret;
}

/* Every program of this file comes in variants: F, and F_names for policies whose rules
 * name fqdns (the `names` constant; cgpolicy/contract.py names_variant); F_4, F_6 and F_0
 * for sections that list only IPv4 prefixes, only IPv6 ones, or none: F_0 walks no prefix
 * index (`fam`, above). CGP_VARIANTS defines them all with `variant`, a macro that defines
 * one program from its name, the program's own arguments, then `names` and `fam`. */
#define CGP_VARIANTS(variant, name, ...)                                                     \
	variant(name, __VA_ARGS__, 0, CGP_FAM_BOTH)                                          \
	variant(name##_4, __VA_ARGS__, 0, CGP_FAM4)                                          \
	variant(name##_6, __VA_ARGS__, 0, CGP_FAM6)                                          \
	variant(name##_0, __VA_ARGS__, 0, 0)                                                 \
	variant(name##_names, __VA_ARGS__, 1, CGP_FAM_BOTH)

#define CGP_SKB_VARIANT(name, egress, names, fam)                                            \
	int name(struct __sk_buff *skb) { return cgp_skb(skb, egress, names, fam); }
#define CGP_SKB_PROGRAM(name, egress) CGP_VARIANTS(CGP_SKB_VARIANT, name, egress)

CGP_SKB_PROGRAM(cgp_ingress, 0)
CGP_SKB_PROGRAM(cgp_egress, 1)

/*
 * cgroup_sock_addr: the local address the socket asks for on bind, the remote address on
 * connect and sendmsg. Addresses and ports are taken literally from the syscall:
 *  - bind to port 0 is matched as port 0, which no port range contains, so only rules
 *    without ports apply. The kernel then picks an ephemeral port, exactly as for an
 *    implicit bind (connect/listen/sendto without bind), which never runs this hook.
 *  - bind to 0.0.0.0 / :: is matched as that address, not as "every local address".
 *  - IPv4-mapped IPv6 addresses also meet the IPv4 rules (cgp_cidr6_mask).
 * Protocol "any" in a socket rule means TCP and UDP. Other protocols reaching these hooks
 * (ICMP ping sockets on connect) have no TCP/UDP port: their protocol and port conditions
 * are unknown, so deny rules (say, a cidr deny for the metadata address) still stop them
 * and only allow rules without protocol and ports let them through.
 */
static __always_inline int cgp_sock_addr(struct bpf_sock_addr *ctx, int v6, __u32 hook,
					 const int names, const int fam)
{
	const struct cgp_net_config *cfg;
	__u64 unknown, cidr_mask, proto_mask, port_mask;
	__u32 gen = cgp_generation();
	__u16 port;
	struct cgp_decision d;
	struct cgp_event *e;
	int ret;

	cfg = config.lookup(&gen);
	if (!cfg)
		return 0; /* cannot happen (array map); fail closed */
	unknown = cfg->v.deny_mask;

	__u8 remote[16];

	if (v6) {
		__u32 addr[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2],
				 ctx->user_ip6[3]};

		cidr_mask = cgp_cidr_listed(cfg) ? cgp_cidr6_mask(cfg, gen, addr, fam) : cfg->any_cidr;
		__builtin_memcpy(remote, addr, 16);
	} else {
		cidr_mask = cgp_cidr_listed(cfg) ? cgp_cidr4_mask(cfg, gen, ctx->user_ip4, fam)
						  : cfg->any_cidr;
		cgp_mapped4(remote, ctx->user_ip4);
	}
	if (names && cfg->fqdn_rules)
		cidr_mask |= cgp_learned_rules(cfg, remote, ctx, 0);

	/* user_port holds the port in network byte order in its low 16 bits. */
	port = bpf_ntohs((__u16)ctx->user_port);
	switch (ctx->protocol) {
	case CGP_IPPROTO_TCP:
		proto_mask = cfg->proto[CGP_PROTO_TCP];
		port_mask = cgp_port_mask(cfg, gen, port);
		break;
	case CGP_IPPROTO_UDP:
		proto_mask = cfg->proto[CGP_PROTO_UDP];
		port_mask = cgp_port_mask(cfg, gen, port);
		break;
	default:
		proto_mask = cfg->proto[CGP_PROTO_OTHER] | unknown;
		port_mask = cfg->any_port | unknown;
	}

	ret = cgp_verdict(&cfg->v, cidr_mask & proto_mask & port_mask, &d);
	e = cgp_event_reserve(&cfg->v, &d, hook);
	if (e) {
		cgp_event_task(e);
		e->type = ctx->type;
		e->protocol = ctx->protocol;
		e->dport = port;
		if (v6) {
			__u32 addr[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2],
					 ctx->user_ip6[3]};

			e->family = 10; /* AF_INET6 */
			__builtin_memcpy(e->daddr, addr, 16);
		} else {
			__u32 addr4 = ctx->user_ip4;

			e->family = 2; /* AF_INET */
			__builtin_memcpy(e->daddr, &addr4, 4);
		}
		events.ringbuf_submit(e, 0);
	}
	return ret;
}

#define CGP_SOCK_ADDR_VARIANT(name, v6, hook, names, fam)                                    \
	int name(struct bpf_sock_addr *ctx) { return cgp_sock_addr(ctx, v6, hook, names, fam); }
#define CGP_SOCK_ADDR_PROGRAM(name, v6, hook) CGP_VARIANTS(CGP_SOCK_ADDR_VARIANT, name, v6, hook)

CGP_SOCK_ADDR_PROGRAM(cgp_bind4, 0, CGP_HOOK_BIND4)
CGP_SOCK_ADDR_PROGRAM(cgp_bind6, 1, CGP_HOOK_BIND6)
CGP_SOCK_ADDR_PROGRAM(cgp_connect4, 0, CGP_HOOK_CONNECT4)
CGP_SOCK_ADDR_PROGRAM(cgp_connect6, 1, CGP_HOOK_CONNECT6)
CGP_SOCK_ADDR_PROGRAM(cgp_sendmsg4, 0, CGP_HOOK_SENDMSG4)
CGP_SOCK_ADDR_PROGRAM(cgp_sendmsg6, 1, CGP_HOOK_SENDMSG6)

/*
 * network.egress at connect time (cgp_eg_connect4/6, cgp_eg_sendmsg4/6): a TCP or UDP
 * connect(), or an unconnected UDP sendmsg(), fails at once with EPERM when every packet
 * it would send is certain to be dropped by this policy's egress program, instead of the
 * SYN being retransmitted into a drop for two minutes. These programs run on the egress
 * program's own maps (config, prefix indexes, port tables, counters, rate limit: the
 * loader hands them the same map fds), so a refusal counts on the egress rule or default
 * that decided and sends the egress deny event (flags CGP_EV_CONNECT or CGP_EV_SENDMSG,
 * with the task).
 *
 * The packets of such a socket go to the address and port asked for, with the socket's
 * protocol; an IPv4-mapped address (::ffff:a.b.c.d) sends IPv4 packets to a.b.c.d, so it is
 * looked up exactly as those are. Only the egress interface is not known yet. So:
 *  - a matching deny rule without interfaces: denied whatever the interface;
 *  - no allow rule that could match (a rule's interfaces counted as matching) and a deny
 *    default: denied by the default, or by a deny rule with interfaces;
 *  - anything else is let through, uncounted: the egress program decides each packet.
 * Deny rules with interfaces never refuse here. Rules with icmpTypes match no TCP/UDP
 * packet. Not checked (let through): other socket types and protocols (raw, ICMP, SCTP,
 * MPTCP), the any address (the kernel connects 0.0.0.0 / :: to a local address), and the
 * fqdns rules of a process in none of the policy's targets (a socket of another cgroup,
 * passed in: its packets match what that cgroup learned), which may allow it. A process of
 * one target using a socket of another target of the same policy is judged by what its own
 * target learned (as sockets.connect is).
 * The compiler attaches these programs only in mode enforce: in audit mode the egress
 * program counts every would-be denial once, per packet, and nothing is refused.
 */
#define CGP_SOCK_STREAM 1
#define CGP_SOCK_DGRAM 2

static __always_inline int cgp_egress_at_connect(struct bpf_sock_addr *ctx, int v6, __u32 flag,
						 const int names, const int fam)
{
	const struct cgp_net_config *cfg;
	__u64 cidr_mask, unsure = 0, proto_mask, matched, possible, certain;
	__u32 gen = cgp_generation(), addr4 = 0, family = 2;
	struct cgp_counter *counter;
	struct cgp_decision d;
	struct cgp_event *e;
	__u8 remote[16];
	__u16 port;

	cfg = config.lookup(&gen);
	if (!cfg || cfg->v.audit)
		return 1; /* this check may only ever refuse what egress surely drops */
	if (ctx->type == CGP_SOCK_STREAM && ctx->protocol == CGP_IPPROTO_TCP)
		proto_mask = cfg->proto[CGP_PROTO_TCP];
	else if (ctx->type == CGP_SOCK_DGRAM && ctx->protocol == CGP_IPPROTO_UDP)
		proto_mask = cfg->proto[CGP_PROTO_UDP];
	else
		return 1;

	if (v6) {
		__u32 addr[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2],
				 ctx->user_ip6[3]};

		if (addr[0] == 0 && addr[1] == 0 && addr[2] == bpf_htonl(0x0000ffff)) {
			addr4 = addr[3]; /* sends IPv4 packets to a.b.c.d */
		} else {
			if (!(addr[0] | addr[1] | addr[2] | addr[3]))
				return 1;
			family = 10;
			cidr_mask = cgp_cidr_listed(cfg) ? cgp_cidr6_mask(cfg, gen, addr, fam) : cfg->any_cidr;
			__builtin_memcpy(remote, addr, 16);
		}
	} else {
		addr4 = ctx->user_ip4;
	}
	if (family == 2) {
		if (!addr4)
			return 1;
		cidr_mask = cgp_cidr_listed(cfg) ? cgp_cidr4_mask(cfg, gen, addr4, fam) : cfg->any_cidr;
		cgp_mapped4(remote, addr4);
	}
	if (names && cfg->fqdn_rules && cgp_maybe_learned(remote)) {
		struct cgp_learned_key key = {.cgroup_id = cgp_dns_target(ctx, 0)};

		/* with targets at one depth that is any cgroup's ancestor there: is it one? */
		if (key.cgroup_id && !dns_targets.lookup(&key.cgroup_id))
			key.cgroup_id = 0;
		if (key.cgroup_id) {
			__builtin_memcpy(key.addr, remote, 16);
			cidr_mask |= cgp_learned_for(cfg, &key, ctx);
		} else {
			unsure = cfg->fqdn_rules; /* not this task's to know */
		}
	}

	/* user_port holds the port in network byte order in its low 16 bits. */
	port = bpf_ntohs((__u16)ctx->user_port);
	matched = proto_mask & cgp_port_mask(cfg, gen, port) & cfg->any_icmp;
	certain = cidr_mask & matched & cfg->v.deny_mask & cfg->any_iface;
	possible = (cidr_mask | unsure) & matched & cfg->v.allow_mask;
	if (certain)
		d.slot = cgp_lowest_bit(certain);
	else if (!possible && !cfg->v.default_allow)
		d.slot = CGP_DEFAULT_SLOT;
	else
		return 1;
	d.allowed = 0;
	counter = counters.lookup(&d.slot);
	if (counter)
		counter->denied++; /* per-CPU value: a plain increment */
	e = cgp_event_reserve(&cfg->v, &d, CGP_HOOK_EGRESS);
	if (e) {
		cgp_event_task(e);
		e->flags |= flag;
		e->family = family;
		e->type = ctx->type;
		e->protocol = ctx->protocol;
		e->dport = port;
		if (family == 2)
			__builtin_memcpy(e->daddr, &addr4, 4);
		else
			__builtin_memcpy(e->daddr, remote, 16);
		events.ringbuf_submit(e, 0);
	}
	return 0;
}

#define CGP_CONNECT_CHECK_VARIANT(name, v6, flag, names, fam)                                \
	int name(struct bpf_sock_addr *ctx)                                                  \
	{                                                                                    \
		return cgp_egress_at_connect(ctx, v6, flag, names, fam);                      \
	}
#define CGP_CONNECT_CHECK(name, v6, flag) CGP_VARIANTS(CGP_CONNECT_CHECK_VARIANT, name, v6, flag)

CGP_CONNECT_CHECK(cgp_eg_connect4, 0, CGP_EV_CONNECT)
CGP_CONNECT_CHECK(cgp_eg_connect6, 1, CGP_EV_CONNECT)
CGP_CONNECT_CHECK(cgp_eg_sendmsg4, 0, CGP_EV_SENDMSG)
CGP_CONNECT_CHECK(cgp_eg_sendmsg6, 1, CGP_EV_SENDMSG)

/* The question of a DNS answer (at scratch->off): its rules, then the answers. The
 * ingress program already let the packet in, so every way out allows it. */
int cgp_dns_question(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct cgp_dns_scratch *s = dns_scratch.lookup(&zero);
	const struct cgp_dns_key *key = dns_key.lookup(&zero);
	__u8 hdr[12];

	if (!s || !key)
		return 1;
	__u32 off = s->off & 0xffff;
	if (bpf_skb_load_bytes(skb, off, hdr, 12))
		return 1;
	/* a response to a standard query, not truncated, no error, one question */
	if (!(hdr[2] & 0x80) || (hdr[2] & 0x7a) || (hdr[3] & 0x0f) || hdr[4] || hdr[5] != 1)
		return 1;
	__u32 answers = ((__u32)hdr[6] << 8) | hdr[7];
	off += 12;

	/* The name: one load of up to 255 bytes, then label by label (no compression in a
	 * question). Each label is hashed as 8 words, always, the bytes past it masked out
	 * without a branch: a loop whose exit depends on the length would give the verifier
	 * one path per length per label. Letters A-Z are lowercased, no other byte changes. */
	__u32 avail = skb->len > off ? skb->len - off : 0;
	if (avail > CGP_DNS_NAME_BYTES - 1)
		avail = CGP_DNS_NAME_BYTES - 1;
	if (avail < 1 || bpf_skb_load_bytes(skb, off, s->name, avail))
		return 1;
	__u32 pos = 0, labels = 0, len = 0;
	for (__u32 k = 0; k < CGP_DNS_LABELS; k++) {
		__u32 l = s->name[pos & (CGP_DNS_NAME_BYTES - 1)];
		if (l == 0) {
			len = pos;
			break;
		}
		if (l > 63 || pos + 1 + l >= avail)
			return 1;
		struct cgp_sip h;
		cgp_sip_init(&h, key);
		cgp_sip_absorb(&h, l);
		for (__u64 i = 0; i < 8; i++) {
			__s64 rem = (__s64)l - (__s64)(8 * i); /* bytes of the label left */
			rem &= ~(rem >> 63);                    /* max(rem, 0) */
			rem -= (rem - 8) & ~((rem - 8) >> 63);  /* min(rem, 8) */
			__u64 keep = (rem * 8) >> 6 ? ~0ULL : ((1ULL << (rem * 8)) - 1);
			__u64 w;
			__builtin_memcpy(&w, &s->name[(pos + 1 + 8 * i) & (CGP_DNS_NAME_BYTES - 1)], 8);
			cgp_sip_absorb(&h, cgp_ascii_lower(w) & keep);
		}
		s->label_hash[k & (CGP_DNS_LABELS - 1)] = cgp_sip_final(h);
		labels = k + 1;
		pos += 1 + l;
	}
	if (!len && labels == CGP_DNS_LABELS && s->name[pos & (CGP_DNS_NAME_BYTES - 1)] == 0 &&
	    pos < avail)
		len = pos; /* exactly CGP_DNS_LABELS labels, then the root */
	if (!len || !labels)
		return 1; /* the root, or more labels than CGP_DNS_LABELS: nothing learned */
	/* Only a question for A or AAAA in class IN teaches. */
	__u8 qtail[4];
	if (bpf_skb_load_bytes(skb, (off + len + 1) & 0xffff, qtail, 4) || qtail[0] || qtail[2] ||
	    qtail[3] != 1 || (qtail[1] != 1 && qtail[1] != 28))
		return 1;
	s->labels = labels;
	s->len = len;
	labels = s->labels & (CGP_DNS_LABELS * 2 - 1);
	len = s->len & (CGP_DNS_NAME_BYTES - 1);

	/* Suffix hashes right to left: the whole name finds exact rules, a proper suffix the
	 * "*." rules of that domain. */
	__u64 rules[CGP_DNS_SLOTS] = {};
	__u32 name = 0;
	struct cgp_sip suffix;
	cgp_sip_init(&suffix, key);
	for (int k = CGP_DNS_LABELS - 1; k >= 0; k--) {
		if (k >= labels)
			continue;
		cgp_sip_absorb(&suffix, s->label_hash[k & (CGP_DNS_LABELS - 1)]);
		__u64 hashed = cgp_sip_final(suffix);
		struct cgp_name_entry *entry = dns_names.lookup(&hashed);
		if (!entry)
			continue;
		__u64 found = 0;
		for (int slot = 0; slot < CGP_DNS_SLOTS; slot++) {
			__u64 these = k == 0 ? entry->exact[slot] : entry->wildcard[slot];
			rules[slot] |= these;
			found |= these;
		}
		if (found) /* the longest suffix that matched, last: the most specific */
			name = k == 0 ? entry->exact_name : entry->wildcard_name;
	}
	__builtin_memcpy(s->rules, rules, sizeof(rules));
	s->name_id = name;
	if (!(s->rules[0] | s->rules[1] | s->rules[2]))
		return 1;
	s->base = off - 12;
	s->alias = 0;
	s->cname_ttl = 0xffffffff;
	s->found = 0;
	s->off = off + len + 1 + 4; /* past the name's root byte, qtype and qclass */
	s->answers_left = answers < CGP_DNS_ANSWERS ? answers : CGP_DNS_ANSWERS;
	dns_jump.call(skb, CGP_DNS_JUMP_ANSWERS);
	return 1;
}

/* Write one learned address. An entry still live (in the same network namespace) keeps
 * the rules it had and the later expiry: an address two matching names share matches the
 * rules of both until the last of their answers runs out. A full map learns nothing
 * (counted): the address stays refused. */
static __always_inline void cgp_learn(const struct cgp_learned_key *key,
				      const struct cgp_dns_scratch *s, __u64 now, __u64 expires,
				      __u64 netns)
{
	__u32 zero = 0;
	struct cgp_learned value = {
		.expires_ns = expires, .learned_ns = now, .netns = netns, .name_id = s->name_id};
	struct cgp_learned *live = learned.lookup(key);
	struct cgp_dns_stats *stats = dns_stats.lookup(&zero);

	__u32 seen_slot = cgp_seen_slot(key->addr), word = seen_slot >> 6;
	__u64 *seen = dns_seen.lookup(&word);

	if (!seen)
		return;
	/* before the entry exists, so that no lookup skips it */
	__sync_fetch_and_or(seen, 1ULL << (seen_slot & 63));
	__builtin_memcpy(value.rules, s->rules, sizeof(value.rules));
	if (live && live->expires_ns > now && live->netns == netns) {
		for (int slot = 0; slot < CGP_DNS_SLOTS; slot++)
			value.rules[slot] |= live->rules[slot];
		if (live->expires_ns > expires)
			value.expires_ns = live->expires_ns;
	}
	if (learned.update(key, &value)) {
		if (stats)
			stats->full++;
	} else if (stats) {
		stats->learned++;
	}
}

/* CGP_DNS_ANSWERS_PER_RUN answer records per run, then itself again; once every record is
 * read, cgp_dns_learn. An A record gives ::ffff:a.b.c.d, an AAAA the address as is; CNAMEs
 * and others are skipped (the question name decides). A record that is cut off, runs past
 * the packet, or whose owner name is not a pointer to the question or to the last CNAME's
 * target (as resolvers write them; anything else could be a compression loop) ends the
 * walk, and nothing of the answer is learned. */
int cgp_dns_answers(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct cgp_dns_scratch *s = dns_scratch.lookup(&zero);

	if (!s)
		return 1;
	__u32 off = s->off & 0xffff;
	__u32 left = s->answers_left;

	for (__u32 a = 0; a < CGP_DNS_ANSWERS_PER_RUN; a++) {
		if (left == 0) {
			dns_jump.call(skb, CGP_DNS_JUMP_LEARN);
			return 1;
		}
		left--;
		__u8 owner[2];
		if (bpf_skb_load_bytes(skb, off, owner, 2) || (owner[0] & 0xc0) != 0xc0)
			return 1;
		__u32 points = (((__u32)owner[0] & 0x3f) << 8) | owner[1];
		if (points != 12 && (!s->alias || points != s->alias))
			return 1;
		off += 2;
		__u8 rr[10];
		if (bpf_skb_load_bytes(skb, off, rr, 10))
			return 1;
		__u16 type = ((__u16)rr[0] << 8) | rr[1];
		__u16 class = ((__u16)rr[2] << 8) | rr[3];
		__u32 ttl = ((__u32)rr[4] << 24) | ((__u32)rr[5] << 16) | ((__u32)rr[6] << 8) | rr[7];
		__u16 rdlen = ((__u16)rr[8] << 8) | rr[9];
		off += 10;
		if (off + rdlen > skb->len)
			return 1;
		if (ttl & 0x80000000)
			ttl = 0; /* RFC 2181: a TTL with the top bit set is 0 */
		if (ttl > s->cname_ttl)
			ttl = s->cname_ttl; /* an address via a CNAME lasts no longer than it */
		__u32 found = s->found;
		if (found >= CGP_DNS_ANSWERS)
			return 1; /* cannot happen: answers_left is at most that */
		if (type == 1 && class == 1 && rdlen == 4) {
			__u32 addr4;
			if (bpf_skb_load_bytes(skb, off, &addr4, 4))
				return 1;
			cgp_mapped4(&s->addr[(found & (CGP_DNS_ANSWERS - 1)) * 16], addr4);
			s->ttl[found & (CGP_DNS_ANSWERS - 1)] = ttl;
			s->found = found + 1;
		} else if (type == 28 && class == 1 && rdlen == 16) {
			if (bpf_skb_load_bytes(skb, off, &s->addr[(found & (CGP_DNS_ANSWERS - 1)) * 16], 16))
				return 1;
			s->ttl[found & (CGP_DNS_ANSWERS - 1)] = ttl;
			s->found = found + 1;
		} else if (type == 5 && class == 1) {
			s->alias = off - s->base; /* the next owner may point to this CNAME's target */
			s->cname_ttl = ttl;        /* already no longer than the CNAMEs before */
		}
		off += rdlen;
	}
	s->off = off;
	s->answers_left = left;
	dns_jump.call(skb, CGP_DNS_JUMP_ANSWERS);
	return 1;
}

/* The addresses of an answer whose records were all read whole (cgp_dns_answers), learned
 * for the target cgroup with their TTLs raised to minTTL and cut to maxTTL. */
int cgp_dns_learn(struct __sk_buff *skb)
{
	__u32 zero = 0, gen = cgp_generation();
	struct cgp_dns_scratch *s = dns_scratch.lookup(&zero);
	const struct cgp_net_config *cfg = config.lookup(&gen);
	struct cgp_learned_key key = {.cgroup_id = cgp_dns_target(skb, 1)};
	__u64 now = bpf_ktime_get_coarse_ns(), netns = bpf_get_netns_cookie(skb);

	if (!s || !cfg || !key.cgroup_id)
		return 1;
	for (__u32 i = 0; i < CGP_DNS_ANSWERS; i++) {
		if (i >= s->found)
			break;
		__u32 ttl = s->ttl[i & (CGP_DNS_ANSWERS - 1)];
		if (ttl < cfg->min_ttl)
			ttl = cfg->min_ttl;
		if (ttl > cfg->max_ttl)
			ttl = cfg->max_ttl;
		__builtin_memcpy(key.addr, &s->addr[(i & (CGP_DNS_ANSWERS - 1)) * 16], 16);
		cgp_learn(&key, s, now, now + (__u64)ttl * 1000000000ULL, netns);
	}
	return 1;
}
