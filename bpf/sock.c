// SPDX-License-Identifier: GPL-2.0
/*
 * cgroup_sock sock_create: sockets.create. Returning 0 fails socket() with EPERM.
 *
 * The kernel runs this hook from inet_create()/inet6_create() only, so it sees AF_INET and
 * AF_INET6 sockets; unix, netlink, packet and vsock sockets never reach it.
 *
 * Each of family, type and protocol has a table value -> rules accepting that value (the
 * compiler ORs the rules with "any" into every slot); values beyond a table match only
 * the rules with "any". The context carries what the socket ended up with: sk_type
 * without SOCK_NONBLOCK/SOCK_CLOEXEC (socket() strips them first), and the protocol the
 * kernel chose (socket(AF_INET, SOCK_STREAM, 0) is protocol 6, a raw socket keeps the
 * number it was opened with, e.g. 255 for IPPROTO_RAW).
 */
#include "common.h"

/* struct cgp_create_config and its table sizes: common.h. */
BPF_ARRAY(config, struct cgp_create_config, 1);
BPF_PERCPU_ARRAY(counters, struct cgp_counter, CGP_COUNTER_SLOTS);

BPF_RINGBUF_OUTPUT(events, 1);
BPF_PERCPU_ARRAY(ratelimit, struct cgp_ratelimit, 1);

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

int cgp_sock_create(struct bpf_sock *ctx)
{
	const struct cgp_create_config *cfg;
	__u32 zero = 0, family, type, protocol;
	struct cgp_decision d;
	struct cgp_event *e;
	__u64 matched;
	int ret;

	cfg = config.lookup(&zero);
	if (!cfg)
		return 0; /* cannot happen (array map); fail closed */

	family = ctx->family;
	type = ctx->type;
	protocol = ctx->protocol;
	/* The masks (slot counts are powers of two) keep the index provably in bounds even when
	 * clang computes the address before the comparison. */
	matched = family < CGP_FAMILY_SLOTS ? cfg->family[family & (CGP_FAMILY_SLOTS - 1)]
					    : cfg->any_family;
	matched &= type < CGP_TYPE_SLOTS ? cfg->type[type & (CGP_TYPE_SLOTS - 1)] : cfg->any_type;
	matched &= protocol < CGP_PROTOCOL_SLOTS
			   ? cfg->protocol[protocol & (CGP_PROTOCOL_SLOTS - 1)]
			   : cfg->any_protocol;
	ret = cgp_verdict(&cfg->v, matched, &d);
	e = cgp_event_reserve(&cfg->v, &d, CGP_HOOK_SOCK_CREATE);
	if (e) {
		cgp_event_task(e);
		e->family = family;
		e->type = type;
		e->protocol = protocol;
		events.ringbuf_submit(e, 0);
	}
	return ret;
}
