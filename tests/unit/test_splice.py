"""A file read again when only CIDR items were rewritten (policy/splice.py, the memo of
validate.FileMemo) and its compilation changed rather than made again (compile.recompile,
cidr6.CidrIndex.changed): against reading and compiling the new file from scratch, over
random edits of random files, valid and not."""

from __future__ import annotations

import gc
import ipaddress
import random
from typing import Any

import pytest
from test_cidr6_index import index_lookup, keep, probe_points, random_prefixes, reference

from cgpolicy.compiler.cidr6 import cidr6_maps
from cgpolicy.compiler.compile import compile_policy, recompile
from cgpolicy.compiler.spec import CompiledPolicy
from cgpolicy.contract import CIDR4_PROBES, CIDR6_PROBES
from cgpolicy.policy.model import NetworkRule, Policy
from cgpolicy.policy.validate import FileMemo, LoadResult, load_contents

ADDRESSES = [
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.1.2.3",
    "10.1.2.128/25",
    "192.0.2.0/24",
    "192.0.2.7/32",
    "0.0.0.0/0",
    "fd00::/8",
    "fd00:1::/32",
    "fd00:1:2::/48",
    "2001:db8::1",
    "::/0",
    "::ffff:10.1.2.3/128",
]
# what an edit may write instead: valid, invalid (host bits, not an address), YAML that
# does not read as a string (an int, a float, a mapping when plain), an address with more
# to the line
REPLACEMENTS = [
    *ADDRESSES,
    "10.1.2.3/8",
    "10.300.0.0/16",
    "1.5",
    "12345",
    "fd00::1/8",
    "10.9.0.0/16 # a comment",
    "1:30",
    "fd00::",
]


def random_file(rng: random.Random) -> str:
    """One or two policies; rules with block lists in each quoting, or a flow list."""
    documents = []
    for number in range(rng.randint(1, 2)):
        lines = [
            "apiVersion: cgpolicy.dev/v1",
            "kind: CgroupPolicy",
            f"metadata: {{name: p{number}}}" + ("  # \u2028" if rng.random() < 0.05 else ""),
            "spec:",
            "  targets: [{path: work}]",
            "  network:",
            "    egress:",
            "      default: deny",
            "      rules:",
        ]
        for _ in range(rng.randint(1, 3)):
            action = rng.choice(["allow", "deny"])
            protocol = rng.choice(["any", "tcp", "icmp"])
            lines += [f"        - action: {action}", f"          protocol: {protocol}"]
            items = [rng.choice(ADDRESSES) for _ in range(rng.randint(1, 6))]
            if protocol == "icmp":
                items = [a for a in items if ":" not in a] or ["10.0.0.0/8"]
            if rng.random() < 0.2:
                lines.append("          cidrs: [" + ", ".join(f'"{a}"' for a in items) + "]")
            else:
                lines.append("          cidrs:")
                for item in items:
                    quote = rng.choice(['"', "'", ""])
                    lines.append(f"            - {quote}{item}{quote}")
                    if rng.random() < 0.1:
                        lines.append("            # a comment")
        documents.append("\n".join(lines) + "\n")
    return "---\n".join(documents)


def random_edit(rng: random.Random, text: str) -> str:
    """Lines of ``text`` rewritten: mostly list items (any quoting), sometimes another
    line, a line added or one removed."""
    lines = text.split("\n")
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(lines))
        roll = rng.random()
        item = lines[at].lstrip()
        if roll < 0.75 and item.startswith("- ") and "action" not in item:
            indent = lines[at][: len(lines[at]) - len(item)]
            quote = item[2] if item[2] in "'\"" else ""
            if rng.random() < 0.2:  # another quoting: read whole
                quote = rng.choice(['"', "'", ""])
            address = rng.choice(ADDRESSES if rng.random() < 0.7 else REPLACEMENTS)
            lines[at] = f"{indent}- {quote}{address}{quote}"
        elif roll < 0.85:
            lines[at] = lines[at].replace("deny", "allow")
        elif roll < 0.93:
            lines.insert(at, "            - 10.7.0.0/16")
        else:
            del lines[at]
    return "\n".join(lines)


def summary(result: LoadResult) -> tuple[Any, ...]:
    """What a reading answers: problems, warnings, policies (with every rule's source)."""
    sources = [
        (rule.source, rule.cidrs)
        for policy in result.policies
        if policy.network and policy.network.egress
        for rule in policy.network.egress.rules
    ]
    return result.problems, result.warnings, result.policies, sources


def test_a_spliced_reading_answers_as_a_whole_reading() -> None:
    spliced = readings = 0
    for seed in range(60):
        rng = random.Random(seed)
        memo = FileMemo()
        text = random_file(rng)
        load_contents([("p.yaml", text.encode())], memo)
        for _ in range(12):
            text = random_edit(rng, text) if rng.random() < 0.9 else random_file(rng)
            with_memo = load_contents([("p.yaml", text.encode())], memo)
            alone = load_contents([("p.yaml", text.encode())])
            assert summary(with_memo) == summary(alone), text
            readings += 1
            spliced += any(policy.derived is not None for policy in with_memo.policies)
    assert spliced > readings / 10, (spliced, readings)  # the splice was tried, not skipped


def long_list_file(prefixes: list[str], quote: str = '"') -> bytes:
    items = "".join(f"            - {quote}{p}{quote}\n" for p in prefixes)
    return (
        "apiVersion: cgpolicy.dev/v1\nkind: CgroupPolicy\nmetadata:\n  name: long\nspec:\n"
        "  targets: [{path: work}]\n  network:\n    egress:\n      default: deny\n"
        "      rules:\n        - action: deny\n          cidrs: [10.0.0.0/8]\n"
        f"        - action: allow\n          protocol: tcp\n          cidrs:\n{items}"
    ).encode()


def test_a_one_line_change_of_a_long_list_is_spliced() -> None:
    prefixes = [f"10.{i >> 8}.{i & 255}.0/24" for i in range(2000)]
    memo = FileMemo()
    (before,) = load_contents([("long.yaml", long_list_file(prefixes))], memo).policies
    prefixes[700] = "192.0.2.0/24"
    (after,) = load_contents([("long.yaml", long_list_file(prefixes))], memo).policies
    assert after.derived is not None and after.derived.base() is before
    (edit,) = after.derived.edits
    assert edit.removed == (ipaddress.ip_network("10.2.188.0/24"),)
    assert edit.added == (ipaddress.ip_network("192.0.2.0/24"),)
    assert after == load_contents([("long.yaml", long_list_file(prefixes))]).policies[0]
    # an item that is invalid now is read whole, and reported there
    prefixes[5] = "10.0.5.1/24"
    bad = load_contents([("long.yaml", long_list_file(prefixes))], memo)
    assert not bad.policies
    assert [(p.line, p.field) for p in bad.problems] == [
        (21, "spec.network.egress.rules[1].cidrs[5]")
    ]


def compiled_answers(compiled: CompiledPolicy, points: list[int]) -> dict[str, Any]:
    """Everything a compilation puts in the kernel, its indexes by what they answer."""
    found: dict[str, Any] = {
        "revision": compiled.revision,
        "labels": compiled.rules,
        "hooks": [spec.hook for spec in compiled.programs],
        "functions": [spec.function for spec in compiled.programs],  # the variants
    }
    for spec in compiled.programs:
        maps = {m.name: m for m in spec.maps}
        for name, m in maps.items():
            if name.endswith("_slots"):
                family = name.removesuffix("_slots")
                # the program's bound on probes: IPv4's is lower
                find = index_lookup(
                    maps, family, CIDR4_PROBES if family == "cidr4" else CIDR6_PROBES
                )
                width = 32 if family == "cidr4" else 128
                shifted = [p << 96 if width == 32 else p for p in points]
                found[(spec.hook, name)] = [find(p)[0] for p in shifted]
            elif not (name.startswith("cidr") and name.endswith("_root")):  # its table size
                found[(spec.hook, name)] = (m.map_type, m.max_entries, m.entries)
    return found


def policy_points(policies: list[Policy], rng: random.Random, width: int) -> list[int]:
    prefixes: dict[tuple[int, int], int] = {}
    for policy in policies:
        assert policy.network and policy.network.egress
        for rule in policy.network.egress.rules:
            for net in rule.cidrs:
                if net.max_prefixlen == width:
                    prefixes[(net.prefixlen, int(net.network_address))] = 1
    return probe_points(prefixes, rng, width)


def random_prefix(rng: random.Random, family: int) -> str:
    if family == 4:
        address = f"10.{rng.randrange(4)}.{rng.randrange(256)}.{rng.randrange(256)}"
        return f"{address}/{rng.choice([16, 24, 28, 32])}"
    address = f"fd00:{rng.randrange(4):x}:{rng.randrange(65536):x}::"
    return f"{address}/{rng.choice([32, 48, 64, 128])}"


@pytest.mark.parametrize("seed", range(30))
def test_a_changed_compilation_enforces_what_a_whole_one_does(seed: int) -> None:
    """Random replacements of items of a long list, one after another: each compilation
    changed from the last (or made whole when it cannot be) gives the same revision,
    labels and map contents as compiling the file from scratch, and its prefix indexes the
    same answer for every address near a prefix."""
    rng = random.Random(seed)
    family = rng.choice([4, 6])
    pool = [random_prefix(rng, family) for _ in range(400)]
    pool = [str(ipaddress.ip_network(p, strict=False)) for p in pool]
    prefixes = rng.sample(pool, 150)
    memo = FileMemo()
    (policy,) = load_contents([("c.yaml", long_list_file(prefixes))], memo).policies
    compiled = compile_policy(policy)
    in_place = 0
    seen = [policy]
    for _ in range(10):
        for _ in range(rng.randint(1, 3)):
            prefixes[rng.randrange(len(prefixes))] = rng.choice(pool)
        (new,) = load_contents([("c.yaml", long_list_file(prefixes))], memo).policies
        assert new.derived is not None
        changed = recompile(compiled, policy, new, new.derived.edits)
        whole = compile_policy(new)
        seen.append(new)
        points = policy_points(seen, rng, 32 if family == 4 else 128)
        if changed is not None:
            in_place += 1
            assert compiled_answers(changed, points) == compiled_answers(whole, points)
        policy, compiled = new, changed or whole
    assert in_place, "most changes of a list of one family's prefixes are made in place"


def test_the_index_changed_in_place_answers_as_built() -> None:
    """CidrIndex.changed over random mixes of lengths and changes of rule bits, as the
    compiler asks for them: every address near any prefix touched gets the trie's
    answer; the change it carries turns the old entries into the new ones."""
    rng = random.Random(14)
    made = rebuilt = 0
    for _ in range(60):
        lengths = rng.choice([(48, 48), (64, 64), (32, 128), (16, 128), (0, 128), (60, 70)])
        own = random_prefixes(rng, rng.randint(1, 120), lengths)
        flat_max = rng.choice([0, 1, 4])
        maps = cidr6_maps(own, flat_max)
        touched = set(own)
        for _ in range(12):
            bits = []
            for _ in range(rng.randint(1, 3)):
                if own and rng.random() < 0.5:
                    prefix = rng.choice(list(own))
                    bits.append((prefix, 1 << rng.randrange(6), rng.random() < 0.3))
                else:
                    length = rng.randint(*lengths)
                    base = rng.choice(list(own))[1] if own else rng.getrandbits(128)
                    address = base ^ (rng.getrandbits(128) >> rng.randint(0, 128))
                    bits.append(((length, address & keep(length)), 1 << rng.randrange(6), True))
            slots = maps["cidr6_slots"]
            changed = slots.index.changed(slots, bits)
            for prefix, bit, listed in bits:
                mask = own.get(prefix, 0) | bit if listed else own.get(prefix, 0) & ~bit
                own.pop(prefix, None)
                if mask:
                    own[prefix] = mask
                touched.add(prefix)
            if changed is None:
                rebuilt += 1
                maps = cidr6_maps(own, flat_max)
            else:
                made += 1
                assert changed.change is not None and changed.change.base is slots.entries
                assert dict(slots.entries) | dict(changed.change.write) == dict(changed.entries)
                maps = {**maps, "cidr6_slots": changed}
            find = index_lookup(maps)
            for address in probe_points(dict.fromkeys(touched, 1), rng):
                assert find(address)[0] == reference(own, address), hex(address)
    assert made > rebuilt / 2


def two_rule_file(comment: str, denied: str, allowed: str) -> bytes:
    """A deny rule and an allow rule of one item each, three lines apart."""
    return (
        "apiVersion: cgpolicy.dev/v1\nkind: CgroupPolicy\n"
        f"metadata:\n  name: p   # {comment}\n"
        "spec:\n  targets: [{path: work}]\n  network:\n    egress:\n      default: allow\n"
        "      rules:\n"
        f"        - action: deny\n          cidrs:\n            - {denied}\n"
        f"        - action: allow\n          cidrs:\n            - {allowed}\n"
    ).encode()


def egress_cidrs(result: LoadResult) -> list[list[tuple[str, list[str]]]]:
    return [
        [(rule.action, [str(n) for n in rule.cidrs]) for rule in policy.network.egress.rules]
        for policy in result.policies
        if policy.network and policy.network.egress
    ]


@pytest.mark.parametrize("breaks", ["\u2028" * 3, "\u2029" * 3, "\x85" * 3, "\r" * 4])
def test_a_file_whose_lines_yaml_counts_otherwise_is_read_whole(breaks: str) -> None:
    """YAML also ends a line at a lone CR, NEL, LS and PS (here in a comment): its line
    numbers are then ahead of the file's newlines (here by three: the last CR is a CRLF),
    and the allow rule's item, three lines down, must not be taken for the one at that
    YAML line (the deny rule's)."""
    memo = FileMemo()
    load_contents([("p.yaml", two_rule_file(breaks, "10.0.0.1", "10.0.0.1"))], memo)
    new = two_rule_file(breaks, "10.0.0.1", "10.0.0.2")
    with_memo = load_contents([("p.yaml", new)], memo)
    assert egress_cidrs(with_memo) == egress_cidrs(load_contents([("p.yaml", new)]))
    assert egress_cidrs(with_memo) == [[("deny", ["10.0.0.1/32"]), ("allow", ["10.0.0.2/32"])]]


@pytest.mark.parametrize("item", ["fd00::", "::", "1::"])
def test_a_plain_item_ending_in_a_colon_is_read_whole(item: str) -> None:
    """`- fd00::` is a mapping to YAML (its last ':' ends a key), not the string: the
    file is invalid, as a whole reading says."""
    memo = FileMemo()
    load_contents([("p.yaml", two_rule_file("", "10.0.0.1", "fd00::1"))], memo)
    new = two_rule_file("", "10.0.0.1", item)
    with_memo = load_contents([("p.yaml", new)], memo)
    assert summary(with_memo) == summary(load_contents([("p.yaml", new)]))
    assert [p.message for p in with_memo.problems] == ["expected a string, not a mapping"]


@pytest.mark.parametrize(
    ("before", "after", "variant"),
    [
        ("fd00::/16", "10.10.0.0/16", "cgp_egress_4"),  # the last IPv6 prefix goes
        ("192.0.2.0/24", "fd00::/16", "cgp_egress"),  # the first IPv6 prefix comes
    ],
)
def test_a_change_of_the_families_listed_is_compiled_whole(
    before: str, after: str, variant: str
) -> None:
    """The programs walk only the indexes of the families a section lists prefixes of
    (contract.family_variant): a change that empties one, or lists the first prefix of
    one, is not made in place, and the whole compilation has the variant that fits."""
    memo = FileMemo()
    (policy,) = load_contents([("c.yaml", long_list_file(["10.9.0.0/16", before]))], memo).policies
    compiled = compile_policy(policy)
    (new,) = load_contents([("c.yaml", long_list_file(["10.9.0.0/16", after]))], memo).policies
    assert new.derived is not None
    assert recompile(compiled, policy, new, new.derived.edits) is None
    egress = next(spec for spec in compile_policy(new).programs if spec.hook == "egress")
    assert egress.function == variant


def test_a_chain_of_changed_compilations_keeps_only_the_rules_of_the_last() -> None:
    """Each compilation changed from the last holds the rules it was made from (their
    canonical texts): not those of every earlier reading, which would grow the service by
    a copy of the long rule at every change of one of its lines."""
    prefixes = [f"10.{i >> 8}.{i & 255}.0/24" for i in range(300)]
    memo = FileMemo()
    (policy,) = load_contents([("c.yaml", long_list_file(prefixes))], memo).policies
    compiled = compile_policy(policy)
    alive = []
    for step in range(12):
        prefixes[step] = f"192.0.{step}.0/24"
        (new,) = load_contents([("c.yaml", long_list_file(prefixes))], memo).policies
        assert new.derived is not None
        changed = recompile(compiled, policy, new, new.derived.edits)
        assert changed is not None
        policy, compiled = new, changed
        gc.collect()
        alive.append(sum(type(o) is NetworkRule for o in gc.get_objects()))
    assert alive[-1] == alive[1], alive
