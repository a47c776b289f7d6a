/* SPDX-License-Identifier: GPL-2.0 */
/*
 * IPv4 and IPv6 headers as the packet programs read them (net.c enforces, learn.c
 * observes): the layouts, the protocol numbers, and the walk over IPv6 extension headers
 * to the layer-4 header. No map access (see common.h for why a header may hold none).
 */
#ifndef CGP_PACKET_H
#define CGP_PACKET_H

#define CGP_IPPROTO_HOPOPTS 0
#define CGP_IPPROTO_ICMP 1
#define CGP_IPPROTO_TCP 6
#define CGP_IPPROTO_UDP 17
#define CGP_IPPROTO_ROUTING 43
#define CGP_IPPROTO_FRAGMENT 44
#define CGP_IPPROTO_AH 51
#define CGP_IPPROTO_ICMPV6 58
#define CGP_IPPROTO_DSTOPTS 60

/* Extension headers walked before giving up. Real traffic carries one or two; a longer
 * chain is treated as unparseable (protocol unknown), never skipped. */
#define CGP_IPV6_EXT_MAX 6

struct cgp_ipv4 {
	__u8 ver_ihl;
	__u8 tos;
	__u16 tot_len;
	__u16 id;
	__u16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__u16 check;
	__u32 saddr;
	__u32 daddr;
};

struct cgp_ipv6 {
	__u32 ver_tc_flow;
	__u16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u32 saddr[4];
	__u32 daddr[4];
};

/* What the parser learnt about layer 4. */
struct cgp_l4 {
	__u32 proto_known; /* protocol number found */
	__u32 header;      /* the L4 header starts at `offset` (first fragment) */
	__u32 proto;
	__u32 offset;
};

static __always_inline int cgp_is_ipv6_ext(__u32 nexthdr)
{
	return nexthdr == CGP_IPPROTO_HOPOPTS || nexthdr == CGP_IPPROTO_ROUTING ||
	       nexthdr == CGP_IPPROTO_DSTOPTS || nexthdr == CGP_IPPROTO_FRAGMENT ||
	       nexthdr == CGP_IPPROTO_AH;
}

/* Walk the IPv6 extension headers that follow the fixed header. */
static __always_inline void cgp_ipv6_l4(struct __sk_buff *skb, __u8 nexthdr, struct cgp_l4 *l4)
{
	__u32 offset = sizeof(struct cgp_ipv6);
	__u32 nh = nexthdr;
	__u8 ext[8];
	int i;

	for (i = 0; i < CGP_IPV6_EXT_MAX; i++) {
		if (!cgp_is_ipv6_ext(nh))
			break;
		/* Every extension header is at least 8 bytes long. The helper, not cgp_load():
		 * a direct read at this variable offset costs the verifier far more paths. */
		if (bpf_skb_load_bytes(skb, offset, ext, sizeof(ext)))
			return; /* truncated: protocol unknown */
		if (nh == CGP_IPPROTO_FRAGMENT) {
			nh = ext[0];
			offset += 8;
			if (((ext[2] << 8) | ext[3]) & 0xfff8) {
				/* Non-first fragment: protocol known, no L4 header. */
				l4->proto_known = 1;
				l4->proto = nh;
				return;
			}
		} else if (nh == CGP_IPPROTO_AH) {
			nh = ext[0];
			offset += ((__u32)ext[1] + 2) * 4;
		} else {
			nh = ext[0];
			offset += ((__u32)ext[1] + 1) * 8;
		}
	}
	if (cgp_is_ipv6_ext(nh))
		return; /* too many extension headers: protocol unknown */
	l4->proto_known = 1;
	l4->header = 1;
	l4->proto = nh;
	l4->offset = offset;
}

#endif /* CGP_PACKET_H */
