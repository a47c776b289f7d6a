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
 * included header, so this header holds no map access: each program file declares its
 * maps and a three-line cgp_verdict() that counts the decision in its `counters` map.
 *
 * Template maps are declared with max_entries 1 (or their fixed size): the kernel layer
 * creates the real maps from the compiler's MapSpecs and rewrites the map fds in the
 * compiled instructions. Tests that fill bcc's template maps directly raise the sizes with
 * -DCGP_*_MAX=N.
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

/* Count a decision and return the program's return value (1 allow, 0 deny). Deny events
 * (ring buffer, rate-limited) will be emitted next to this call, for enforced and audit-mode
 * denials alike, with d->slot naming the rule. */
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

#endif /* CGP_COMMON_H */
