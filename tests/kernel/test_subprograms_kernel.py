"""Subprograms against the real kernel: a program that calls one (as the helper number
contract.SUBPROGRAM_BASE + i) loads with it appended and its BTF, runs the subprogram's
code, and the verifier checks the subprogram once as a global function, not once per call.
What the shipped programs decide with them is checked by test_differential.py and
test_programs_testrun.py (IPv4-mapped addresses, 100,000 prefixes)."""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path

from cgpolicy.compiler.compile import compile_policy
from cgpolicy.compiler.spec import MapSpec, ProgramSpec
from cgpolicy.contract import SUBPROGRAM_BASE, SUBPROGRAMS
from cgpolicy.kernel import loader
from cgpolicy.policy.model import (
    Network,
    NetworkRule,
    NetworkSection,
    Policy,
    SocketAddressRule,
    SocketAddressSection,
    Sockets,
    Target,
)

PACKET = bytes(64)
SUB = SUBPROGRAMS[0]

# The subprogram reads its argument (a pointer to 24 bytes of the caller's stack) and a
# map, and loops: inline, each call would cost the verifier the whole loop again.
SOURCE = f"""
struct args {{ u64 a, b, c; }};
BPF_ARRAY(table, u64, 64);

static u64 (*call_sub)(struct args *) = (void *){SUBPROGRAM_BASE};

u64 {SUB}(struct args *x)
{{
    u64 sum = 0;

    if (!x)
        return 0;
    for (u32 i = 0; i < 32; i++) {{
        u32 at = (x->a + i) & 63;
        u64 *v = table.lookup(&at);

        if (v)
            sum += *v;
    }}
    return sum + x->b;
}}

int one_call(struct __sk_buff *skb)
{{
    struct args x = {{.a = 0, .b = 40, .c = 0}};

    return call_sub(&x) == 42 ? 1 : 0;
}}

int eight_calls(struct __sk_buff *skb)
{{
    u64 total = 0;

    for (u32 k = 0; k < 8; k++) {{
        struct args x = {{.a = k, .b = k, .c = 0}};

        total += call_sub(&x);
    }}
    return total == 2 + 28 ? 1 : 0;
}}
"""

TABLE = MapSpec("table", "array", 4, 8, 64, 0, ((bytes(4), (2).to_bytes(8, "little")),))


def spec(function: str) -> ProgramSpec:
    return ProgramSpec("egress", "subprograms.c", function, f"cgp_t_{function[:9]}", (TABLE,))


def test_a_program_runs_the_subprogram_it_calls(tmp_path: Path) -> None:
    (tmp_path / "subprograms.c").write_text(SOURCE)
    with loader.load_program(spec("one_call"), tmp_path) as program:
        info = program.info()
        assert info.functions == 2 and info.btf_id  # the main function and the subprogram
        # table[0] = 2, the other 31 read are 0; plus b = 40
        assert program.program.test_run(PACKET).retval == 1


def test_the_verifier_checks_a_subprogram_once_however_often_it_is_called(
    tmp_path: Path,
) -> None:
    (tmp_path / "subprograms.c").write_text(SOURCE)
    with (
        loader.load_program(spec("one_call"), tmp_path) as one,
        loader.load_program(spec("eight_calls"), tmp_path) as eight,
    ):
        once, loop = one.info().verified_insns, eight.info().verified_insns
        assert once > 32 * 4  # the subprogram's loop, walked once
        # seven more calls, a few steps each in the caller's loop, not the subprogram's loop
        # again (inline, eight calls would be eight times the steps)
        assert loop - once < once / 4
        # table[0] = 2 (only the window from 0 holds it) + b: 0 + 1 + ... + 7
        assert eight.program.test_run(PACKET).retval == 1


def test_the_shipped_programs_load_their_subprograms_as_global_functions() -> None:
    nets = (ip_network("10.0.0.0/8"), ip_network("fd00::/8"))
    policy = Policy(
        name="subprograms",
        mode="enforce",
        targets=(Target("x", False),),
        network=Network(egress=NetworkSection("deny", (NetworkRule("allow", nets),))),
        sockets=Sockets(connect=SocketAddressSection("deny", (SocketAddressRule("allow", nets),))),
    )
    for program_spec in compile_policy(policy).programs:
        linked = loader.link_function(
            loader.SOURCE_DIR / program_spec.source, program_spec.function
        )
        with loader.load_program(program_spec) as program:
            info = program.info()
            assert info.functions == (1 + len(linked.subprograms) if linked.subprograms else 0)
            if program_spec.hook == "egress":
                # the IPv4 walk of a mapped address; inline, it made the verifier take
                # 27,591 steps for this program (issue 14)
                assert [name for _, name in linked.subprograms] == [SUB]
                assert info.verified_insns < 20_000
