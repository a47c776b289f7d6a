/* Prototype (issue 12): learn addresses from DNS answers at cgroup_skb ingress, before the
 * answer reaches the socket. Measures what parsing costs per DNS packet and whether the
 * verifier takes bounded parsing of hostile input. Not used by cgpolicy. */
#include <uapi/linux/bpf.h>
#include <linux/types.h>

#define NAME_MAX_BYTES 256
#define MAX_LABELS 32
#define MAX_ANSWERS_TOTAL 16
#define ANSWERS_PER_RUN 2 /* 3 or more: "The sequence of 8193 jumps is too complex" */

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
	__u8 name[NAME_MAX_BYTES + 64]; /* the slack: 8-byte reads near the end */
	__u32 labels, len, off;           /* kept here so that every path meets again */
	__u32 answers_left;
	__u64 rules;
	__u64 label_hash[MAX_LABELS];
};

struct name_entry {
	__u64 exact;    /* rules naming this name */
	__u64 wildcard; /* rules whose "*." pattern has this for domain */
};
BPF_HASH(names, __u64, struct name_entry, 1024);             /* suffix hash -> rules */
BPF_TABLE("lru_hash", struct learned_key, struct learned_value, learned, 65536);
BPF_PERCPU_ARRAY(work, struct scratch, 1);
BPF_ARRAY(stats, __u64, 4);                                  /* 0 learned, 1 refused */
BPF_PROG_ARRAY(jump, 1);                                     /* [0]: dns_answers */
/* The SipHash key, drawn at random when the policy is loaded: a name an attacker picks
 * (the workload may resolve names the attacker controls) cannot be made to collide with
 * an allowed name's hash without it. */
struct sip_key {
	__u64 k0, k1;
};
BPF_ARRAY(hash_key, struct sip_key, 1);

#define ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND(v0, v1, v2, v3)                                                           \
	do {                                                                               \
		v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                  \
		v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                     \
		v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                     \
		v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                  \
	} while (0)

/* SipHash-1-3 state: one round per word absorbed, three to finalize */
struct sip {
	__u64 v0, v1, v2, v3;
};

static __always_inline void sip_init(struct sip *s, const struct sip_key *k)
{
	s->v0 = k->k0 ^ 0x736f6d6570736575ULL;
	s->v1 = k->k1 ^ 0x646f72616e646f6dULL;
	s->v2 = k->k0 ^ 0x6c7967656e657261ULL;
	s->v3 = k->k1 ^ 0x7465646279746573ULL;
}

static __always_inline void sip_absorb(struct sip *s, __u64 m)
{
	s->v3 ^= m;
	SIPROUND(s->v0, s->v1, s->v2, s->v3);
	s->v0 ^= m;
}

static __always_inline __u64 sip_final(struct sip s)
{
	s.v2 ^= 0xff;
	SIPROUND(s.v0, s.v1, s.v2, s.v3);
	SIPROUND(s.v0, s.v1, s.v2, s.v3);
	SIPROUND(s.v0, s.v1, s.v2, s.v3);
	return s.v0 ^ s.v1 ^ s.v2 ^ s.v3;
}

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
	const struct sip_key *key = hash_key.lookup(&zero);
	if (!s || !key)
		return 1;
	/* the question name: one load of up to 255 bytes, then label by label (no compression
	 * in a question); each label hashed (keyed SipHash-1-3, lowercased), then the suffix hashes folded
	 * right to left from the label hashes: an exact name and a "*." pattern are both
	 * lookups of a suffix hash */
	__u32 avail = skb->len > off ? skb->len - off : 0;
	if (avail > NAME_MAX_BYTES - 1)
		avail = NAME_MAX_BYTES - 1;
	if (avail < 1 || bpf_skb_load_bytes(skb, off, s->name, avail))
		return 1;
	/* label by label; a byte is folded to lower case with | 0x20, which is exact for the
	 * letters, digits and '-' of host names (and the compiler does the same to patterns) */
	__u32 pos = 0, labels = 0, len = 0;
	for (__u32 k = 0; k < MAX_LABELS; k++) {
		__u32 l = s->name[pos & (NAME_MAX_BYTES - 1)];
		if (l == 0) {
			len = pos;
			break;
		}
		if (l > 63 || pos + 1 + l >= avail) {
			count(1);
			return 1;
		}
		/* 8 words of 8 bytes, always, the bytes past the label masked out without a
		 * branch: a loop whose exit depends on the length gives the verifier one path per
		 * length per label; this one gives it one */
		struct sip h;
		sip_init(&h, key);
		sip_absorb(&h, l);
		for (__u64 i = 0; i < 8; i++) {
			__s64 rem = (__s64)l - (__s64)(8 * i);     /* bytes of the label left */
			rem &= ~(rem >> 63);                        /* max(rem, 0) */
			rem -= (rem - 8) & ~((rem - 8) >> 63);      /* min(rem, 8) */
			__u64 keep = (rem * 8) >> 6 ? ~0ULL : ((1ULL << (rem * 8)) - 1);
			__u64 w;
			__builtin_memcpy(&w, &s->name[(pos + 1 + 8 * i) & (NAME_MAX_BYTES - 1)], 8);
			sip_absorb(&h, (w | 0x2020202020202020ULL) & keep);
		}
		s->label_hash[k & (MAX_LABELS - 1)] = sip_final(h);
		labels = k + 1;
		pos += 1 + l;
	}
	if (!len || !labels)
		return 1;
	/* Through memory: the verifier tracks no value read back from a map, so the 32 ways
	 * out of the loop above continue as one state instead of 32 */
	s->labels = labels;
	s->len = len;
	labels = s->labels & (MAX_LABELS * 2 - 1);
	len = s->len & (NAME_MAX_BYTES - 1);
	/* the suffixes right to left: one running SipHash over the label hashes, finalized
	 * after each label (a copy) to give that suffix's hash */
	__u64 rules = 0;
	struct sip suffix;
	sip_init(&suffix, key);
	for (int k = MAX_LABELS - 1; k >= 0; k--) {
		if (k >= labels)
			continue;
		sip_absorb(&suffix, s->label_hash[k & (MAX_LABELS - 1)]);
		__u64 hashed = sip_final(suffix);
		struct name_entry *entry = names.lookup(&hashed);
		if (entry)
			rules |= k == 0 ? entry->exact : entry->wildcard;
	}
	s->rules = rules;
	rules = s->rules;
	if (!rules)
		return 1;
	s->off = off + len + 1 + 4; /* past the name's root byte, qtype and qclass */
	s->answers_left = answers < MAX_ANSWERS_TOTAL ? answers : MAX_ANSWERS_TOTAL;
	jump.call(skb, 0); /* dns_answers; returns here only if the call fails */
	return 1;
}

/* Two answers per run, then itself again: the verifier refuses a third in one program.
 * The tail-call chain is bounded by MAX_ANSWERS_TOTAL / 2 calls (the kernel allows 33). */
int dns_answers(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct scratch *s = work.lookup(&zero);
	if (!s)
		return 1;
	__u64 rules = s->rules;
	__u32 off = s->off & 0xffff;
	__u32 left = s->answers_left;
	__u64 now = bpf_ktime_get_coarse_ns();
	struct learned_key key = {.cgroup_id = bpf_skb_cgroup_id(skb)};
	for (__u32 a = 0; a < ANSWERS_PER_RUN; a++) {
		if (left == 0)
			return 1;
		left--;
		__u8 first;
		if (bpf_skb_load_bytes(skb, off, &first, 1) || (first & 0xc0) != 0xc0)
			return 1; /* answers name their owner by a pointer (every resolver does) */
		off += 2;
		__u8 rr[10];
		if (bpf_skb_load_bytes(skb, off, rr, 10))
			return 1;
		__u16 type = ((__u16)rr[0] << 8) | rr[1];
		__u16 class = ((__u16)rr[2] << 8) | rr[3];
		__u32 ttl = ((__u32)rr[4] << 24) | ((__u32)rr[5] << 16) | ((__u32)rr[6] << 8) | rr[7];
		__u16 rdlen = ((__u16)rr[8] << 8) | rr[9];
		off += 10;
		if (type == 1 && class == 1 && rdlen == 4) {
			if (bpf_skb_load_bytes(skb, off, &key.addr, 4))
				return 1;
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
	s->off = off;
	s->answers_left = left;
	jump.call(skb, 0);
	return 1;
}
