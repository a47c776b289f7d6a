"""Fuzz tests (issue 10): hostile input never produces a traceback.

(a) The policy loader and validator (what `cgpolicy validate` runs) over generated hostile
    YAML: huge integers and digit strings in every numeric field (decimal, hexadecimal,
    binary, octal, sexagesimal, floats that overflow), odd types and wrong types at every
    field, deep nesting, unicode, control characters, huge strings, YAML tags, anchors and
    aliases, broken bytes. It must return problems, never raise, and never hide a bug
    behind the "could not be checked" problem that contains one.
(b) Every command's argument parsing, run in this process through ``cgpolicy.cli.main``
    with generated hostile arguments (huge, negative and empty numbers, very long strings,
    unicode, paths to missing and odd files, FIFOs with no writer, folders, link loops). It
    must exit 0, 1 or 2 (3 for `audit`'s drift), never raise.

Nothing here touches the machine: every command runs with ``--bpf-dir``, ``--cgroup-root``,
``--cache-dir``, ``--dev-root`` and the state folder in a scratch folder (options and
environment both), which is not on bpffs, so `apply`, `remove`, `run` and `reconcile` stop
at "not on a bpf filesystem" before they change anything; `reconcile` always gets
``--once`` and only metrics addresses it must refuse; `run` only commands that do nothing;
`cache fill` (which compiles with bcc for seconds) only arguments it must refuse. argv
cannot carry a NUL byte, so no argument here holds one (files do: YAML's ``"\\0"``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_builders import EVERY_SECTION_POLICY
from typer.testing import CliRunner

from cgpolicy import cli
from cgpolicy.kernel import store
from cgpolicy.policy.describe import describe
from cgpolicy.policy.validate import load_paths

FUZZ = settings(
    deadline=None,
    max_examples=60,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LONGEST_PROBLEM = 1000  # characters of one formatted problem, less its file name
CONTAINED_BUG = "could not be checked"  # the problem a contained exception becomes

BASE = EVERY_SECTION_POLICY
BASE_DATA: dict[str, Any] = yaml.safe_load(BASE)


# -- (a) the loader over hostile YAML ------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A scalar written into the YAML exactly as given (a number, a tag, an alias...)."""

    text: str


def emit(value: Any) -> str:
    """Flow-style YAML for plain data and Raw scalars; strings are JSON-quoted (JSON strings
    are YAML strings), so that no int is ever turned into text here."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{emit(k)}: {emit(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(emit(item) for item in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return repr(value)


def paths_of(data: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(data, dict):
        for key, value in data.items():
            yield from paths_of(value, path + (key,))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from paths_of(value, path + (index,))


PATHS = list(paths_of(BASE_DATA))[1:]
NUMERIC_PATHS = [p for p in PATHS if p[-1] in ("ports", "icmpTypes", "major", "minor", "protocol")]

lengths = st.integers(min_value=1, max_value=20_000)
huge_number = st.one_of(
    lengths.map(lambda n: "9" * n),
    lengths.map(lambda n: "-" + "9" * n),
    lengths.map(lambda n: "0x" + "f" * n),
    lengths.map(lambda n: "0b" + "1" * n),
    lengths.map(lambda n: "0" + "7" * n),
    st.integers(min_value=1, max_value=5000).map(lambda n: "9" * n + ":59:59"),
    st.integers(min_value=1, max_value=5000).map(lambda n: "1" + "0" * n + ".0"),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
)
odd_scalar = st.sampled_from(
    [
        "1.0e400",
        "-1.0e400",
        ".inf",
        "-.inf",
        ".nan",
        "443.0",
        "443.5",
        "-1",
        "0",
        "1_000",
        "0o17",
        "+5",
        "~",
        "null",
        "yes",
        "off",
        "2001-12-14",
        "!!int 99",
        "!!int 0x" + "f" * 3000,
        "!!float 1e99999",
        "!!str 5",
        "!!binary aGk=",
        "!!python/object:os.system x",
        "!custom x",
        "&anchor 1",
        "*anchor",
        '"\\0"',
        '"\\x1b[31m"',
        '"\\u202e"',
    ]
)
text_value = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=20),
    st.integers(min_value=1, max_value=200_000).map(lambda n: "x" * n),
    huge_number.map(lambda text: text.lstrip("-")),  # a digit string, quoted
    st.builds(
        lambda n, f: f.format(n),
        lengths.map(lambda n: "9" * n),
        st.sampled_from(["1-{}", "{}-1", "10.0.0.0/{}", "fd00::/{}", "{}.0.0.1", "::{}"]),
    ),
)
deep = st.integers(min_value=1, max_value=3000).map(lambda n: Raw("[" * n + "]" * n))
scalar = st.one_of(huge_number.map(Raw), odd_scalar.map(Raw), text_value, st.booleans(), st.none())
hostile_value = st.recursive(
    st.one_of(scalar, deep),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=8,
)


def replace(data: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    if isinstance(data, dict):
        return {k: replace(v, path[1:], value) if k == path[0] else v for k, v in data.items()}
    if isinstance(data, list):
        return [replace(v, path[1:], value) if i == path[0] else v for i, v in enumerate(data)]
    return data  # an earlier change replaced what held the path


@st.composite
def hostile_document(draw: st.DrawFn) -> str:
    data: Any = BASE_DATA
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path = draw(
            st.sampled_from(NUMERIC_PATHS) if draw(st.booleans()) else st.sampled_from(PATHS)
        )
        action = draw(st.sampled_from(["value", "value", "key", "list"]))
        if action == "value":
            data = replace(data, path, draw(hostile_value))
        elif action == "list":  # a hostile item in a list that holds numbers or strings
            data = replace(data, path, [draw(hostile_value), draw(scalar)])
        else:  # an extra key, hostile, beside the field
            parent, here = path[:-1], data
            for part in parent:
                if not isinstance(here, dict | list) or part not in (
                    here if isinstance(here, dict) else range(len(here))
                ):
                    break
                here = here[part]
            else:
                here = here if isinstance(here, dict) else None
            if isinstance(here, dict):
                key = draw(st.one_of(st.text(max_size=30), huge_number))
                data = replace(data, parent, {**here, key: draw(hostile_value)})
    return emit(data)


@st.composite
def hostile_file(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["document", "document", "documents", "spliced", "bytes"]))
    if kind == "document":
        return draw(hostile_document()).encode()
    if kind == "documents":
        documents = draw(st.lists(hostile_document(), min_size=2, max_size=3))
        return "\n---\n".join(documents).encode()
    if kind == "spliced":  # the valid file with hostile text put somewhere in it
        text = BASE.encode()
        at = draw(st.integers(min_value=0, max_value=len(text)))
        chunk = draw(st.one_of(st.binary(max_size=40), huge_number.map(str.encode)))
        return text[:at] + chunk + text[at:]
    return draw(st.binary(max_size=200))


def check_loaded(path: Path) -> None:
    result = load_paths([path])  # must not raise
    for problem in result.problems:
        text = problem.format()
        assert CONTAINED_BUG not in text, text[:2000]
        assert len(text) - len(problem.file) < LONGEST_PROBLEM, text[:2000]
        assert problem.line >= 0 and problem.column >= 0, problem
    assert result.ok == (not result.problems)
    for policy in result.policies:
        describe(policy)


@FUZZ
@given(content=hostile_file())
def test_loader_returns_problems_for_hostile_yaml(tmp_path_factory, content: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "policy.yaml"
    path.write_bytes(content)
    check_loaded(path)


@settings(FUZZ, max_examples=30)
@given(path=st.sampled_from(NUMERIC_PATHS), number=huge_number, quoted=st.booleans())
def test_every_numeric_field_refuses_huge_numbers(
    tmp_path_factory, path: tuple[Any, ...], number: str, quoted: bool
) -> None:
    value = number if quoted else Raw(number)
    data = replace(BASE_DATA, path, [value] if path[-1] in ("ports", "icmpTypes") else value)
    file = tmp_path_factory.mktemp("fuzz") / "policy.yaml"
    file.write_text(emit(data))
    result = load_paths([file])
    check_loaded(file)
    if len(number.lstrip("-")) > 12:  # no field takes a number that large
        assert not result.ok


# -- (b) every command's arguments ---------------------------------------------------------


@dataclass(frozen=True)
class Scratch:
    root: Path
    bpf: Path
    cgroups: Path
    cache: Path
    dev: Path
    state: Path
    policies: Path  # a folder of valid and hostile files
    valid: Path  # one valid policy
    hostile: Path  # one policy with a 5,000-digit port range
    fifo: Path  # a named pipe nobody writes to
    loop: Path  # a symbolic link to itself
    dangling: Path


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Scratch:
    root = tmp_path_factory.mktemp("cli-fuzz")
    s = Scratch(
        root,
        root / "bpf",
        root / "cgroups",
        root / "cache",
        root / "dev",
        root / "state",
        root / "policies.d",
        root / "valid.yaml",
        root / "hostile.yaml",
        root / "fifo",
        root / "loop",
        root / "dangling",
    )
    for folder in (s.bpf, s.cgroups, s.cache, s.dev, s.state, s.policies):
        folder.mkdir()
    s.valid.write_text(BASE.replace("mode: audit", "mode: enforce"))
    hostile = BASE.replace('"1-1023"', '"1-' + "9" * 5000 + '"')
    s.hostile.write_text(hostile)
    (s.policies / "a.yaml").write_text(BASE)
    (s.policies / "b.yaml").write_text(hostile.replace("name: web", "name: other"))
    (s.policies / "c.yaml").write_text("[" * 5000)
    os.mkfifo(s.fifo)
    os.symlink(s.loop, s.loop)
    os.symlink(root / "nothing", s.dangling)
    return s


NO_NUL = st.characters(exclude_characters="\0", exclude_categories=["Cs"])
nines = st.integers(min_value=1, max_value=6000).map(lambda n: "9" * n)
hostile_number_text = st.one_of(
    nines,
    nines.map(lambda text: "-" + text),
    st.integers(min_value=1, max_value=6000).map(lambda n: "0x" + "f" * n),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(["", " ", "-1", "0", "-0", "1e400", "inf", "-inf", "nan", "0.5", "1_0"]),
    st.sampled_from(["\u00b2", "\u0663", "\uff11", "1\u200b", "0o7", "0b1", "010"]),
)
hostile_text = st.one_of(
    hostile_number_text,
    st.text(NO_NUL, max_size=30),
    st.integers(min_value=1, max_value=100_000).map(lambda n: "a" * n),
    st.sampled_from(["-", "--", "--help", "-x", "--no-such-option", "%s%n", "\x1b[2J", "\n"]),
)


def hostile_path(s: Scratch) -> st.SearchStrategy[str]:
    usual = st.sampled_from([str(s.valid), str(s.hostile), str(s.policies)])
    return rarely(usual, odd_path(s))


def odd_path(s: Scratch) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(
            [
                str(s.valid),
                str(s.hostile),
                str(s.policies),
                str(s.fifo),
                str(s.loop),
                str(s.dangling),
                str(s.root / "missing.yaml"),
                str(s.valid / "under-a-file"),
                str(s.root / ("a" * 300)),
                str(s.root) + "/a" * 3000,
                "/dev/null",
                "/dev/zero",
                "",
            ]
        ),
        hostile_text.map(lambda text: str(s.root / "x" / text[:200])),
    )


def rarely(normal: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``odd`` one time in five: an odd value early on stops a command before the rest of
    its arguments are read, so most examples must get past it."""
    return st.sampled_from(range(10)).flatmap(lambda n: odd if n >= 8 else normal)


def global_options(s: Scratch) -> st.SearchStrategy[list[str]]:
    """The scratch locations and log options; in one example in five, one of them odd
    (never a real location)."""
    normal = {
        "--bpf-dir": str(s.bpf),
        "--cgroup-root": str(s.cgroups),
        "--cache-dir": str(s.cache),
        "--dev-root": str(s.dev),
        "--log-level": "warning",
        "--log-format": "text",
    }
    odd_folder = st.sampled_from(
        [s.root / "missing", s.valid, s.fifo, s.loop, s.dangling, s.root / ("d" * 300)]
    ).map(str)
    odd_value = {
        "--log-level": st.one_of(st.sampled_from(["debug", "root", "BASIC_FORMAT"]), hostile_text),
        "--log-format": st.one_of(st.just("json"), hostile_text),
    }

    def with_odd(option: str, value: str) -> list[str]:
        return [
            word
            for name, normal_value in normal.items()
            for word in (name, value if name == option else normal_value)
        ]

    def odd(option: str) -> st.SearchStrategy[list[str]]:
        return odd_value.get(option, odd_folder).map(lambda value: with_odd(option, value))

    options = [word for pair in normal.items() for word in pair]
    return rarely(st.just(options), st.sampled_from(list(normal)).flatmap(odd))


def maybe(option: str, values: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    return st.one_of(st.just([]), values.map(lambda value: [option, value]))


def flag(name: str) -> st.SearchStrategy[list[str]]:
    return st.sampled_from([[], [name]])


def words(*parts: st.SearchStrategy[list[str]]) -> st.SearchStrategy[list[str]]:
    return st.tuples(*parts).map(lambda lists: [word for part in lists for word in part])


def one(values: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    return values.map(lambda value: [value])


def explain_action() -> st.SearchStrategy[list[str]]:
    def either(*normal: str) -> st.SearchStrategy[list[str]]:
        return one(rarely(st.sampled_from(normal), hostile_text))

    address = st.one_of(
        st.sampled_from(["10.0.0.1", "10.0.0.1:443", "[fd00::1]:443", "fd00::1", "::ffff:1.2.3.4"]),
        hostile_number_text.map(lambda n: f"10.0.0.1:{n}"),
        hostile_number_text.map(lambda n: f"[::1]:{n}"),
        hostile_text,
    )
    protocol = ["tcp", "udp", "icmp", "icmpv6", "6", "0x11"]
    packet = words(
        either("egress", "ingress"),
        either(*protocol),
        one(address),
        rarely(st.just([]), hostile_number_text.map(lambda n: ["--icmp-type", n])),
        rarely(
            st.just([]),
            st.one_of(st.sampled_from(["lo", "1", "eth*"]), hostile_number_text, hostile_text).map(
                lambda name: ["--interface", name]
            ),
        ),
    )
    socket_address = words(either("connect", "sendmsg", "bind"), either(*protocol), one(address))
    create = words(
        either("socket"),
        either("inet", "inet6", "2"),
        either("stream", "dgram", "raw"),
        st.one_of(st.just([]), either(*protocol)),
    )
    numbers = st.one_of(
        st.sampled_from(["1:3", "1:", ":3", "1"]),
        st.tuples(hostile_number_text, hostile_number_text).map(lambda mm: f"{mm[0]}:{mm[1]}"),
    )
    device = st.one_of(
        words(either("device"), either("c", "b", "char"), one(numbers), either("rw", "m", "rwmr")),
        words(
            either("device"),
            either("/dev/null", "/dev/zero", "/dev/nonexistent", "/proc/self", "/"),
            either("r", "w"),
        ),
    )
    sysctl = words(either("sysctl"), either("read", "write"), either("net.ipv4.ip_forward", "a..b"))
    extra = rarely(st.just([]), st.lists(hostile_text, min_size=1, max_size=2))
    return words(st.one_of(packet, socket_address, create, device, sysctl), extra)


def hostile_metrics_addr() -> st.SearchStrategy[str]:
    """Only addresses `reconcile` must refuse (a valid one would start a server here)."""
    bad_port = st.one_of(
        nines.filter(lambda text: len(text) > 5),
        st.sampled_from(["", "-1", "65536", "99999999", "1e3", "0x50", "80a", " 80 ", "\u0668"]),
    )
    host = st.one_of(st.sampled_from(["", "127.0.0.1", "[::1]", "[::1", "::1"]), hostile_text)
    return st.one_of(
        st.tuples(host, bad_port).map(lambda hp: f"{hp[0]}:{hp[1]}"),
        hostile_text.filter(lambda text: ":" not in text),
    )


def command_arguments(s: Scratch, command: str) -> st.SearchStrategy[list[str]]:
    paths = st.lists(hostile_path(s), min_size=1, max_size=3)
    json_flag = flag("--json")
    safe_command = st.sampled_from([["true"], ["/nonexistent/cmd"], ["true", "--", "x"]])
    by_command: dict[str, st.SearchStrategy[list[str]]] = {
        "validate": words(json_flag, paths),
        "describe": paths,
        "plan": words(json_flag, paths),
        "apply": words(
            json_flag,
            rarely(
                st.just([]),
                st.one_of(hostile_number_text, hostile_text).map(lambda d: ["--confirm-within", d]),
            ),
            paths,
        ),
        "confirm": words(st.lists(hostile_text, max_size=2), json_flag),
        "remove": words(st.lists(hostile_text, max_size=2), flag("--all"), json_flag),
        "run": words(one(hostile_path(s)), st.just(["--"]), safe_command),
        "reconcile": words(
            st.just(["--once", "--policy-dir"]),
            one(rarely(st.just(str(s.policies)), odd_path(s))),
            rarely(st.just([]), hostile_number_text.map(lambda n: ["--interval", n])),
            rarely(st.just([]), hostile_metrics_addr().map(lambda a: ["--metrics-addr", a])),
        ),
        "audit": words(maybe("--cgroup", st.one_of(hostile_path(s), hostile_text)), json_flag),
        "events": words(json_flag, flag("--follow")),
        "explain": words(
            rarely(
                one(hostile_path(s)),
                maybe("--cgroup", st.one_of(st.sampled_from([".", "/", ".."]), hostile_text)),
            ),
            explain_action(),
            json_flag,
        ),
        "doctor": json_flag,
        # reference only: --kernel applies policies for real
        "test": words(json_flag, flag("-v"), paths),
        "cache check": json_flag,
        "cache clear": st.just([]),
        # Compiling takes seconds: only arguments it must refuse.
        "cache fill": st.lists(hostile_text, min_size=1, max_size=2).map(
            lambda extra: [*extra, "--no-such-option"]
        ),
    }
    extra = rarely(st.just([]), st.lists(hostile_text, min_size=1, max_size=2))
    specific = by_command[command]
    if command not in ("run", "explain", "cache fill"):  # extra words are theirs to parse
        specific = words(specific, extra)
    return specific


COMMANDS = [
    "validate",
    "describe",
    "plan",
    "apply",
    "confirm",
    "remove",
    "run",
    "reconcile",
    "audit",
    "events",
    "explain",
    "doctor",
    "test",
    "cache check",
    "cache clear",
    "cache fill",
]
EXIT_CODES = {0, 1, 2}


class Hang(Exception):
    """A command did not finish in time (a blocked read, say)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(_signum: int, _frame: object) -> None:
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(s: Scratch, argv: list[str]) -> tuple[int, str]:
    """``cgpolicy ARGV`` in this process, as ``cgpolicy.cli.main`` runs it: the exit status and
    the output. An exception other than SystemExit is a traceback and fails the test."""
    env = {
        "CGPOLICY_BPF_DIR": str(s.bpf),
        "CGPOLICY_CGROUP_ROOT": str(s.cgroups),
        "CGPOLICY_CACHE_DIR": str(s.cache),
        "CGPOLICY_DEV_ROOT": str(s.dev),
        "CGPOLICY_STATE_DIR": str(s.state),
        "COLUMNS": "100",
    }
    configured = store._configured_dir
    saved_argv = sys.argv
    with CliRunner().isolation(env=env) as (out, err, _):
        sys.argv = ["cgpolicy", *argv]
        try:
            with time_limit(20):
                cli.main()
            code: Any = 0
        except SystemExit as done:
            code = done.code
        finally:
            sys.argv = saved_argv
            store._configured_dir = configured
            sys.stdout.flush()
            sys.stderr.flush()
        output = out.getvalue().decode(errors="replace") + err.getvalue().decode(errors="replace")
    return (0 if code is None else code), output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_survives_hostile_arguments(scratch: Scratch, command: str) -> None:
    @settings(FUZZ, max_examples=30)
    @given(options=global_options(scratch), arguments=command_arguments(scratch, command))
    def run(options: list[str], arguments: list[str]) -> None:
        argv = [*options, *command.split(), *arguments]
        code, output = run_cli(scratch, argv)
        allowed = EXIT_CODES | ({3} if command == "audit" else set())
        assert code in allowed, (argv, code, output[-3000:])
        assert "Traceback" not in output, (argv, output[-3000:])

    run()


def test_help_and_version_of_every_command(scratch: Scratch) -> None:
    for command in ["", *COMMANDS, "cache"]:
        code, output = run_cli(scratch, [*command.split(), "--help"])
        assert code == 0, (command, output)
    assert run_cli(scratch, ["--version"])[0] == 0
    assert run_cli(scratch, [])[0] in EXIT_CODES  # no command: the help, as a usage error
