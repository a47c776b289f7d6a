/* Prototype (issue 12): learn addresses from DNS answers at cgroup_skb ingress, before the
 * answer reaches the socket. Measures what parsing costs per DNS packet and whether the
 * verifier takes bounded parsing of hostile input. Not used by cgpolicy. */
#include <uapi/linux/bpf.h>
#include <linux/types.h>

#define NAME_MAX_BYTES 256
#define MAX_LABELS 32
#define MAX_ANSWERS 16

struct learned_key {
	__u64 cgroup_id;
	__u32 addr;
	__u32 pad;
};
struct learned_value {
	__u64 expires_ns;
	__u64 rules;
};
struct scratch {
	__u8 name[NAME_MAX_BYTES];
	__u64 label_hash[MAX_LABELS];
};

BPF_HASH(names, __u64, __u64, 1024);                       /* suffix hash -> rule mask */
BPF_TABLE("lru_hash", struct learned_key, struct learned_value, learned, 65536);
BPF_PERCPU_ARRAY(work, struct scratch, 1);
BPF_ARRAY(stats, __u64, 4);                                  /* 0 learned, 1 refused */

static __always_inline void count(__u32 slot)
{
	__u64 *n = stats.lookup(&slot);
	if (n)
		__sync_fetch_and_add(n, 1);
}

int dns_learn(struct __sk_buff *skb)
{
	__u8 ip[20];
	if (skb->protocol != bpf_htons(0x0800) || bpf_skb_load_bytes(skb, 0, ip, 20))
		return 1;
	if (ip[9] != 17)
		return 1;
	__u32 off = (ip[0] & 0xf) * 4;
	__u8 udp[8];
	if (bpf_skb_load_bytes(skb, off, udp, 8) || udp[0] != 0 || udp[1] != 53)
		return 1;
	off += 8;
	__u8 hdr[12];
	if (bpf_skb_load_bytes(skb, off, hdr, 12))
		return 1;
	/* a response, standard query, not truncated, no error, one question */
	if (!(hdr[2] & 0x80) || (hdr[2] & 0x7a) || (hdr[3] & 0x0f) || hdr[4] || hdr[5] != 1) {
		count(1);
		return 1;
	}
	__u32 answers = ((__u32)hdr[6] << 8) | hdr[7];
	off += 12;

	__u32 zero = 0;
	struct scratch *s = work.lookup(&zero);
	if (!s)
		return 1;
	/* the question name: one load of up to 255 bytes, then label by label (no compression
	 * in a question); each label hashed (FNV-1a, lowercased), then the suffix hashes folded
	 * right to left from the label hashes: an exact name and a "*." pattern are both
	 * lookups of a suffix hash */
	__u32 avail = skb->len > off ? skb->len - off : 0;
	if (avail > NAME_MAX_BYTES - 1)
		avail = NAME_MAX_BYTES - 1;
	if (avail < 1 || bpf_skb_load_bytes(skb, off, s->name, avail))
		return 1;
	/* one pass over the bytes: at a label's length byte, close the previous label's hash */
	__u32 next = 0, labels = 0, len = 0;
	__u64 h = 0;
	for (__u32 i = 0; i < NAME_MAX_BYTES - 1; i++) {
		if (i >= avail) {
			count(1);
			return 1; /* not terminated within what was loaded */
		}
		__u8 c = s->name[i];
		if (i != next) {
			if (c >= 'A' && c <= 'Z')
				c += 'a' - 'A';
			h = (h ^ c) * 0x100000001b3ULL;
			continue;
		}
		if (labels)
			s->label_hash[(labels - 1) & (MAX_LABELS - 1)] = h;
		if (c == 0) {
			len = i;
			break;
		}
		if (c > 63 || labels >= MAX_LABELS) {
			count(1);
			return 1;
		}
		labels++;
		next = i + 1 + c;
		h = 0xcbf29ce484222325ULL;
	}
	if (!len || !labels)
		return 1;
	__u64 rules = 0, suffix = 0x84222325cbf29ce4ULL;
	for (int k = MAX_LABELS - 1; k >= 0; k--) {
		if (k >= labels)
			continue;
		suffix = (suffix ^ s->label_hash[k & (MAX_LABELS - 1)]) * 0x100000001b3ULL;
		__u64 *mask = names.lookup(&suffix);
		if (mask)
			rules |= *mask; /* exact for k == 0, wildcard for k > 0 (the map says which) */
	}
	if (!rules)
		return 1;
	off += len + 1 + 4; /* the name's root byte, qtype, qclass */

	__u64 now = bpf_ktime_get_coarse_ns();
	struct learned_key key = {.cgroup_id = bpf_skb_cgroup_id(skb)};
	for (__u32 a = 0; a < MAX_ANSWERS; a++) {
		if (a >= answers)
			break;
		__u8 first;
		if (bpf_skb_load_bytes(skb, off, &first, 1))
			break;
		if ((first & 0xc0) == 0xc0) {
			off += 2;
		} else {
			/* an uncompressed owner name: skip its labels (bounded) */
			for (__u32 i = 0; i < 64; i++) {
				__u8 l;
				if (bpf_skb_load_bytes(skb, off, &l, 1))
					return 1;
				if (l == 0) {
					off += 1;
					break;
				}
				if ((l & 0xc0) == 0xc0) {
					off += 2;
					break;
				}
				off += 1 + l;
			}
		}
		__u8 rr[10];
		if (bpf_skb_load_bytes(skb, off, rr, 10))
			break;
		__u16 type = ((__u16)rr[0] << 8) | rr[1];
		__u16 class = ((__u16)rr[2] << 8) | rr[3];
		__u32 ttl = ((__u32)rr[4] << 24) | ((__u32)rr[5] << 16) | ((__u32)rr[6] << 8) | rr[7];
		__u16 rdlen = ((__u16)rr[8] << 8) | rr[9];
		off += 10;
		if (type == 1 && class == 1 && rdlen == 4) {
			if (bpf_skb_load_bytes(skb, off, &key.addr, 4))
				break;
			if (ttl < 60)
				ttl = 60;
			if (ttl > 3600)
				ttl = 3600;
			struct learned_value value = {.expires_ns = now + (__u64)ttl * 1000000000ULL,
						      .rules = rules};
			learned.update(&key, &value);
			count(0);
		}
		off += rdlen;
	}
	return 1;
}
