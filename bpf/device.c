// SPDX-License-Identifier: GPL-2.0
/*
 * cgroup_device: devices. Returning 0 fails open()/mknod() with EPERM.
 *
 * One access asks for several rights at once (open(O_RDWR) asks read|write). As in runc and
 * systemd's device filters, an allow rule matches only if it grants every requested right,
 * while a deny rule matches if it covers any requested right: "allow r" does not open a
 * device read-write, and "deny w" stops a read-write open.
 */
#include "common.h"

/* struct cgp_dev_config, cgp_dev_rule and CGP_DEV_*: common.h. */
BPF_ARRAY(config, struct cgp_dev_config, 1);
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
	/* bpf_ktime_get_coarse_ns() is not offered to cgroup_device programs (kernel 6.18). */
	if (!cgp_ratelimit_take(rl, bpf_ktime_get_ns()))
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

int cgp_device(struct bpf_cgroup_dev_ctx *ctx)
{
	const struct cgp_dev_config *cfg;
	__u32 zero = 0, type, want, nrules;
	__u64 any_right = 0, all_rights = 0;
	struct cgp_decision d;
	struct cgp_event *e;
	int i, ret;

	cfg = config.lookup(&zero);
	if (!cfg)
		return 0; /* cannot happen (array map); fail closed */

	type = ctx->access_type & 0xffff;
	want = ctx->access_type >> 16;
	nrules = cfg->nrules;
	for (i = 0; i < CGP_MAX_RULES; i++) {
		const struct cgp_dev_rule *rule = &cfg->rules[i];

		if (i >= nrules)
			break;
		if (rule->type != CGP_DEV_TYPE_ANY && rule->type != type)
			continue;
		if (rule->major != CGP_DEV_ANY && rule->major != ctx->major)
			continue;
		if (rule->minor != CGP_DEV_ANY && rule->minor != ctx->minor)
			continue;
		/* rule->bit is loaded, not computed as 1 << i: a constant bit would make the
		 * verifier track a distinct mask per path through the loop and give up. */
		if (rule->access & want)
			any_right |= rule->bit;
		if (!(want & ~rule->access))
			all_rights |= rule->bit;
	}
	ret = cgp_verdict(&cfg->v, (any_right & cfg->v.deny_mask) | (all_rights & cfg->v.allow_mask),
			  &d);
	e = cgp_event_reserve(&cfg->v, &d, CGP_HOOK_DEVICE);
	if (e) {
		cgp_event_task(e);
		e->type = type;
		e->access = want;
		e->major = ctx->major;
		e->minor = ctx->minor;
		events.ringbuf_submit(e, 0);
	}
	return ret;
}
