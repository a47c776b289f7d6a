// SPDX-License-Identifier: GPL-2.0
/*
 * cgroup_sysctl: sysctl. Returning 0 fails the read() or write() of /proc/sys/... with
 * EPERM.
 *
 * A rule matches when the access (read or write) is one it names and the sysctl's full
 * name in slash form ("net/ipv4/ip_forward") matches its pattern, where '*' matches any
 * run of characters including '/'.
 *
 * The compiler turns all the section's patterns into one DFA, so the program reads each
 * byte of the name once, whatever the number of rules: bytes map to character classes
 * (config.byte_class: the bytes some pattern names, plus one class for all others), and
 * sysctl_next[state * nclasses + class] is the next state. sysctl_accept[state] is the set
 * of rules whose pattern matches the name read so far. State 0 is dead (no pattern can
 * match any more), state 1 the start. A per-rule glob matcher in BPF would cost
 * rules x bytes loop iterations, which the verifier (walking bcc's bounded loops, bcc cannot
 * emit bpf_loop callbacks) refuses for 64 rules.
 *
 * A name that does not fit the buffer cannot be matched: it counts as matching every deny
 * rule for the access and no allow rule (no real sysctl name is that long).
 */
#include "common.h"

#define CGP_SYSCTL_NAME_MAX 256

#ifndef CGP_SYSCTL_NEXT_MAX
#define CGP_SYSCTL_NEXT_MAX 1
#endif
#ifndef CGP_SYSCTL_STATES_MAX
#define CGP_SYSCTL_STATES_MAX 1
#endif

/* struct cgp_sysctl_config and the states CGP_SYSCTL_DEAD and _START: common.h. */
BPF_ARRAY(config, struct cgp_sysctl_config, 1);
/* state * nclasses + class -> next state. */
BPF_ARRAY(sysctl_next, __u32, CGP_SYSCTL_NEXT_MAX);
/* state -> rules whose pattern matches the name read so far. */
BPF_ARRAY(sysctl_accept, __u64, CGP_SYSCTL_STATES_MAX);
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

int cgp_sysctl(struct bpf_sysctl *ctx)
{
	const struct cgp_sysctl_config *cfg;
	char name[CGP_SYSCTL_NAME_MAX];
	__u32 zero = 0, state = CGP_SYSCTL_START, i;
	__u64 access, matched = 0, *accept;
	long len;
	struct cgp_decision d;
	struct cgp_event *e;
	int ret;

	cfg = config.lookup(&zero);
	if (!cfg)
		return 0; /* cannot happen (array map); fail closed */
	access = ctx->write ? cfg->write_mask : cfg->read_mask;

	len = bpf_sysctl_get_name(ctx, name, sizeof(name), 0);
	if (len < 0) { /* -E2BIG: truncated, name unknown */
		matched = access & cfg->v.deny_mask;
		goto decide;
	}

	for (i = 0; i < CGP_SYSCTL_NAME_MAX; i++) {
		__u32 key, *next;

		if (i >= len || state == CGP_SYSCTL_DEAD)
			break;
		key = state * cfg->nclasses + cfg->byte_class[(__u8)name[i]];
		next = sysctl_next.lookup(&key);
		state = next ? *next : CGP_SYSCTL_DEAD;
	}
	accept = sysctl_accept.lookup(&state);
	if (accept)
		matched = *accept & access;
decide:
	ret = cgp_verdict(&cfg->v, matched, &d);
	e = cgp_event_reserve(&cfg->v, &d, CGP_HOOK_SYSCTL);
	if (e) {
		cgp_event_task(e);
		if (ctx->write)
			e->flags |= CGP_EV_WRITE;
		if (bpf_sysctl_get_name(ctx, e->name, sizeof(e->name), 0) < 0)
			e->flags |= CGP_EV_TRUNCATED;
		events.ringbuf_submit(e, 0);
	}
	return ret;
}
