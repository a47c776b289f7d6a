"""Changes in place (issue 14, part 2): a service's change of rules is written into the copy
of net.c's rule maps not in force and switched in with one map update (enforcer/inplace.py),
on the programs already attached. Real processes in a scratch cgroup on loopback; each
probe's ``connect-now`` is refused with EPERM by the connect check or goes through."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

from enforcement import ALLOWED, EPERM, apply_ok, expect, load, remove
from policy_builders import policy_file
from service import wait_until
from test_audit import cgpolicy  # tests/kernel is on sys.path (rootdir conftest)

from cgpolicy.compiler.spec import MapSpec
from cgpolicy.contract import copy_key
from cgpolicy.enforcer.engine import Enforcer
from cgpolicy.kernel.applied import program_maps, read_named
from cgpolicy.kernel.inplace import wait_for_readers
from cgpolicy.kernel.syscall import _NR_BPF  # the bpf() syscall's number here

NOW = "connect-now"
# a list of some length (600 /24s in the IPv4 index), none on loopback
FILLER = [f"10.{i >> 8}.{i & 255}.0/24" for i in range(600)]


def egress(host: str, port: int, default: str = "deny", extra: list[str] = FILLER) -> dict:
    rules: list[dict[str, Any]] = [
        {"action": "allow", "protocol": "tcp", "cidrs": [f"{host}/32", *extra], "ports": [port]}
    ]
    return {"network": {"egress": {"default": default, "rules": rules}}}


def program_ids(bpf_dir: Path, name: str) -> dict[str, int | None]:
    return {hook: h.prog_id for hook, h in read_named(bpf_dir, name).hooks.items()}


def both_copies(bpf_dir: Path, name: str, hook: str, spec: MapSpec) -> tuple[set, set]:
    """The entries of copy 0 and copy 1 of a two-copy map, as copy-0 keys."""
    prog_id = program_ids(bpf_dir, name)[hook]
    assert prog_id
    maps = program_maps(prog_id, {spec.name})
    with maps[spec.name] as found:
        return tuple(  # type: ignore[return-value]
            {
                (key, value)
                for key, value in spec.entries
                if found.lookup(copy_key(spec.map_type, spec.max_entries, key, gen)) == value
            }
            for gen in (0, 1)
        )


def test_a_change_of_prefixes_is_made_in_place(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    p1, p2, *_ = loopback_ports.ports
    target = [scratch_cgroup.relative]
    service = Enforcer(cgroup_root, bpf_dir, in_place=True)
    try:
        apply_ok(service, policy_file(tmp_path, "inplace", target, egress("127.0.0.1", p1)))
        before = program_ids(bpf_dir, "inplace")
        expect(
            scratch_cgroup,
            [((NOW, "tcp", "127.0.0.1", p1), ALLOWED), ((NOW, "tcp", "127.0.0.2", p1), EPERM)],
        )

        # one prefix replaced: the same programs, the new rules
        changed = policy_file(tmp_path, "inplace", target, egress("127.0.0.2", p1))
        (outcome,) = apply_ok(service, changed)
        assert program_ids(bpf_dir, "inplace") == before
        assert read_named(bpf_dir, "inplace").revision == outcome.plan.new_revision
        expect(
            scratch_cgroup,
            [((NOW, "tcp", "127.0.0.1", p1), EPERM), ((NOW, "tcp", "127.0.0.2", p1), ALLOWED)],
        )
        # the copy not in force is brought level in the background: both hold the rules
        compiled = service.plan(load(changed))[0].compiled
        assert compiled is not None
        egress_maps = {m.name: m for m in compiled.programs[0].maps}
        for name in ("config", "cidr4_root", "cidr4_slots", "ports", "port_blocks"):
            spec = egress_maps[name]
            wanted = set(spec.entries)
            assert wait_until(
                lambda s=spec, w=wanted: both_copies(bpf_dir, "inplace", "egress", s) == (w, w)
            ), name

        # ports too; audit sees the new revision in sync
        apply_ok(service, policy_file(tmp_path, "inplace", target, egress("127.0.0.2", p2)))
        assert program_ids(bpf_dir, "inplace") == before
        expect(
            scratch_cgroup,
            [((NOW, "tcp", "127.0.0.2", p1), EPERM), ((NOW, "tcp", "127.0.0.2", p2), ALLOWED)],
        )
        audit = cgpolicy(bpf_dir, "audit", "--json")
        assert audit.returncode == 0, audit.stdout + audit.stderr

        # a change that needs other programs (a new section) is a reload, and correct
        more = egress("127.0.0.1", p1)
        more["sockets"] = {"create": {"default": "allow", "rules": []}}
        apply_ok(service, policy_file(tmp_path, "inplace", target, more))
        after = program_ids(bpf_dir, "inplace")
        assert after["egress"] != before["egress"] and "sock_create" in after
        expect(
            scratch_cgroup,
            [((NOW, "tcp", "127.0.0.1", p1), ALLOWED), ((NOW, "tcp", "127.0.0.2", p1), EPERM)],
        )
    finally:
        remove(service, "inplace")


def test_a_process_never_meets_half_old_half_new_rules(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    """Policy A allows 127.0.0.1:P1 and policy B 127.0.0.2:P2. Changed back and forth in
    place while a process in the cgroup keeps connecting to 127.0.0.1:P2 and 127.0.0.2:P1:
    each is allowed only by a mix of A's addresses and B's ports (or B's and A's), so any
    connect that goes through met a half-written change."""
    p1, p2, *_ = loopback_ports.ports
    target = [scratch_cgroup.relative]
    first = policy_file(tmp_path, "mix", target, egress("127.0.0.1", p1))
    second = policy_file(tmp_path, "mix", target, egress("127.0.0.2", p2))
    stop = tmp_path / "stop"
    prober = textwrap.dedent(
        f"""
        import os, socket, sys
        tries = allowed = 0
        while not os.path.exists({str(stop)!r}):
            for host, port in (("127.0.0.1", {p2}), ("127.0.0.2", {p1})):
                s = socket.socket()
                s.setblocking(False)
                tries += 1
                try:
                    s.connect((host, port))
                    allowed += 1
                except BlockingIOError:
                    allowed += 1
                except OSError:
                    pass
                s.close()
        print(tries, allowed)
        """
    )
    service = Enforcer(cgroup_root, bpf_dir, in_place=True)
    result: list[subprocess.CompletedProcess[str]] = []
    try:
        apply_ok(service, first)
        before = program_ids(bpf_dir, "mix")
        thread = threading.Thread(
            target=lambda: result.append(scratch_cgroup.run([sys.executable, "-c", prober]))
        )
        thread.start()
        try:
            for _ in range(100):
                apply_ok(service, second)
                apply_ok(service, first)
        finally:
            stop.touch()
            thread.join()
        assert program_ids(bpf_dir, "mix") == before  # every change was made in place
        tries, allowed = map(int, result[0].stdout.split())
        assert tries > 0 and allowed == 0, result[0]
    finally:
        remove(service, "mix")


def test_a_list_that_outgrows_its_maps_or_another_apply_means_a_reload(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    p1, *_ = loopback_ports.ports
    target = [scratch_cgroup.relative]
    service = Enforcer(cgroup_root, bpf_dir, in_place=True)
    try:
        apply_ok(service, policy_file(tmp_path, "grow", target, egress("127.0.0.1", p1)))
        first = program_ids(bpf_dir, "grow")
        # four times the prefixes: more than the room a copy has (a quarter more)
        longer = [f"10.{i >> 8}.{i & 255}.0/24" for i in range(2400)]
        apply_ok(
            service, policy_file(tmp_path, "grow", target, egress("127.0.0.2", p1, extra=longer))
        )
        second = program_ids(bpf_dir, "grow")
        assert second["egress"] != first["egress"]
        expect(
            scratch_cgroup,
            [((NOW, "tcp", "127.0.0.1", p1), EPERM), ((NOW, "tcp", "127.0.0.2", p1), ALLOWED)],
        )
        # another process's apply (here: another Enforcer) in between: the service reloads
        apply_ok(
            Enforcer(cgroup_root, bpf_dir),
            policy_file(tmp_path, "grow", target, egress("127.0.0.3", p1, extra=longer)),
        )
        third = program_ids(bpf_dir, "grow")
        apply_ok(
            service, policy_file(tmp_path, "grow", target, egress("127.0.0.1", p1, extra=longer))
        )
        assert program_ids(bpf_dir, "grow")["egress"] not in (second["egress"], third["egress"])
        expect(
            scratch_cgroup,
            [((NOW, "tcp", "127.0.0.1", p1), ALLOWED), ((NOW, "tcp", "127.0.0.3", p1), EPERM)],
        )
        # and from then on it changes in place again
        before = program_ids(bpf_dir, "grow")
        apply_ok(
            service, policy_file(tmp_path, "grow", target, egress("127.0.0.4", p1, extra=longer))
        )
        assert program_ids(bpf_dir, "grow") == before
        expect(
            scratch_cgroup,
            [((NOW, "tcp", "127.0.0.1", p1), EPERM), ((NOW, "tcp", "127.0.0.4", p1), ALLOWED)],
        )
    finally:
        remove(service, "grow")


def test_the_first_or_last_prefix_of_a_family_means_a_reload(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    """A section that lists no prefix of a family has programs that do not look that family
    up (contract.family_variant): listing its first prefix, or removing its last, reloads
    the policy, and each list is in force."""
    p1, *_ = loopback_ports.ports
    target = [scratch_cgroup.relative]
    service = Enforcer(cgroup_root, bpf_dir, in_place=True)
    probes = [(NOW, "tcp", "127.0.0.1", p1), (NOW, "tcp", "::1", p1)]
    try:
        apply_ok(service, policy_file(tmp_path, "families", target, egress("127.0.0.1", p1)))
        ipv4_only = program_ids(bpf_dir, "families")
        expect(scratch_cgroup, list(zip(probes, [ALLOWED, EPERM], strict=True)))

        with_ipv6 = egress("127.0.0.1", p1, extra=[*FILLER, "::1/128"])
        apply_ok(service, policy_file(tmp_path, "families", target, with_ipv6))
        both = program_ids(bpf_dir, "families")
        assert both["egress"] != ipv4_only["egress"]
        expect(scratch_cgroup, list(zip(probes, [ALLOWED, ALLOWED], strict=True)))

        apply_ok(service, policy_file(tmp_path, "families", target, egress("127.0.0.1", p1)))
        assert program_ids(bpf_dir, "families")["egress"] not in (
            ipv4_only["egress"],
            both["egress"],
        )
        expect(scratch_cgroup, list(zip(probes, [ALLOWED, EPERM], strict=True)))
    finally:
        remove(service, "families")


def test_a_new_cgroup_in_between_keeps_changes_in_place(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    """A pass that only attaches (no reload) after a change in place, with copy 1 in force:
    the service still knows both copies, so the next change is in place too, and right."""
    p1, *_ = loopback_ports.ports
    child = scratch_cgroup.child("more")
    one, two = [scratch_cgroup.relative], [scratch_cgroup.relative, child.relative]
    service = Enforcer(cgroup_root, bpf_dir, in_place=True)
    try:
        apply_ok(service, policy_file(tmp_path, "newcg", one, egress("127.0.0.1", p1)))
        before = program_ids(bpf_dir, "newcg")
        apply_ok(service, policy_file(tmp_path, "newcg", one, egress("127.0.0.2", p1)))
        (outcome,) = apply_ok(service, policy_file(tmp_path, "newcg", two, egress("127.0.0.2", p1)))
        assert not outcome.plan.reload
        apply_ok(service, policy_file(tmp_path, "newcg", two, egress("127.0.0.3", p1)))
        assert program_ids(bpf_dir, "newcg") == before
        expect(
            scratch_cgroup,
            [((NOW, "tcp", "127.0.0.2", p1), EPERM), ((NOW, "tcp", "127.0.0.3", p1), ALLOWED)],
        )
    finally:
        remove(service, "newcg")


def test_a_service_never_trusts_copies_it_did_not_write(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    """Copy 1 holding what this process did not write there (here: a prefix a service
    that stopped mid-change left in it) must never come into force: a service that only
    attached the load (no reload) does not know its copies, so its next change reloads."""
    p1, *_ = loopback_ports.ports
    child = scratch_cgroup.child("more")
    one, two = [scratch_cgroup.relative], [scratch_cgroup.relative, child.relative]
    first = Enforcer(cgroup_root, bpf_dir, in_place=True)
    try:
        apply_ok(first, policy_file(tmp_path, "stale", one, egress("127.0.0.1", p1)))
        first.in_place.forget("stale")  # type: ignore[union-attr]  # the service stops
        # what it was writing into copy 1 when it stopped: a rule allowing 127.0.0.3
        left = first.plan(load(policy_file(tmp_path, "stale", one, egress("127.0.0.3", p1))))
        compiled = left[0].compiled
        assert compiled is not None
        spec = {m.name: m for m in compiled.programs[0].maps}["cidr4_slots"]
        prog_id = program_ids(bpf_dir, "stale")["egress"]
        assert prog_id
        with program_maps(prog_id, {"cidr4_slots"})["cidr4_slots"] as slots:
            slots.update_batch(
                [(copy_key("array", spec.max_entries, k, 1), v) for k, v in spec.entries]
            )

        restarted = Enforcer(cgroup_root, bpf_dir, in_place=True)
        (outcome,) = apply_ok(
            restarted, policy_file(tmp_path, "stale", two, egress("127.0.0.1", p1))
        )
        assert not outcome.plan.reload
        apply_ok(restarted, policy_file(tmp_path, "stale", two, egress("127.0.0.4", p1)))
        expect(
            scratch_cgroup,
            [
                ((NOW, "tcp", "127.0.0.4", p1), ALLOWED),
                ((NOW, "tcp", "127.0.0.3", p1), EPERM),
                ((NOW, "tcp", "127.0.0.1", p1), EPERM),
            ],
        )
    finally:
        remove(first, "stale")


def test_a_policy_with_other_sections_changes_its_prefixes_in_place(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    """Programs with no rule copies (sock.c's here) do not stop the net.c ones' change."""
    p1, *_ = loopback_ports.ports
    target = [scratch_cgroup.relative]

    def with_create(host: str) -> dict:
        policy = egress(host, p1)
        policy["sockets"] = {"create": {"default": "allow", "rules": []}}
        return policy

    service = Enforcer(cgroup_root, bpf_dir, in_place=True)
    try:
        apply_ok(service, policy_file(tmp_path, "mixed", target, with_create("127.0.0.1")))
        before = program_ids(bpf_dir, "mixed")
        assert "sock_create" in before
        apply_ok(service, policy_file(tmp_path, "mixed", target, with_create("127.0.0.2")))
        assert program_ids(bpf_dir, "mixed") == before
        expect(
            scratch_cgroup,
            [((NOW, "tcp", "127.0.0.1", p1), EPERM), ((NOW, "tcp", "127.0.0.2", p1), ALLOWED)],
        )
    finally:
        remove(service, "mixed")


def test_waiting_for_readers_holds_nothing_open(kernel_ready):
    """wait_for_readers() (an update of a map-in-map: the kernel waits for running BPF
    programs) works here and keeps no descriptor. Its reason to be, a wait also with one CPU
    online, where membarrier returned at once, cannot be shown on this two-CPU machine, and
    without tracefs no kprobe can watch synchronize_rcu run."""
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(3):
        wait_for_readers()
    assert set(os.listdir("/proc/self/fd")) == before


def _freeze(map_fd: int) -> None:
    """BPF_MAP_FREEZE: from now on the map refuses every write from a syscall."""
    attr = (ctypes.c_uint32 * 8)(map_fd)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(_NR_BPF, 22, ctypes.byref(attr), ctypes.sizeof(attr)) == 0, (
        ctypes.get_errno()
    )


def test_a_switch_that_fails_means_a_reload(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    """The standby copy written, the switch refused (here: the generation map frozen): the
    change is made by a reload, and the half-written standby copy is never trusted again."""
    p1, *_ = loopback_ports.ports
    target = [scratch_cgroup.relative]
    service = Enforcer(cgroup_root, bpf_dir, in_place=True)
    try:
        apply_ok(service, policy_file(tmp_path, "frozen", target, egress("127.0.0.1", p1)))
        before = program_ids(bpf_dir, "frozen")
        prog_id = before["egress"]
        assert prog_id
        with program_maps(prog_id, {"generation"})["generation"] as generation:
            _freeze(generation.fd)
        apply_ok(service, policy_file(tmp_path, "frozen", target, egress("127.0.0.2", p1)))
        assert program_ids(bpf_dir, "frozen")["egress"] != before["egress"]
        expect(
            scratch_cgroup,
            [((NOW, "tcp", "127.0.0.1", p1), EPERM), ((NOW, "tcp", "127.0.0.2", p1), ALLOWED)],
        )
    finally:
        remove(service, "frozen")


def test_the_service_changes_a_line_of_a_long_list_without_reading_or_compiling_it_whole(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports, monkeypatch
):
    """A file whose change rewrote one item of a long `cidrs` list: the service's fast path
    splices the line into its last reading (policy/splice.py) and changes the compilation
    (compile.recompile, the prefix index changed in place) rather than compiling it whole;
    each new list is in force in the same programs, with the revision a whole reading
    gives, and a full pass afterwards has nothing to change."""
    import cgpolicy.reconciler.reconcile as reconcile_module
    from cgpolicy.compiler.compile import compile_policy
    from cgpolicy.enforcer.ownership import Owner
    from cgpolicy.policy.validate import load_paths
    from cgpolicy.reconciler.metrics import Metrics

    whole: list[str] = []  # the policies compiled whole
    compile_whole = reconcile_module.compile_here

    def counted(policy: Any, devices: Any) -> Any:
        whole.append(policy.name)
        return compile_whole(policy, devices)

    monkeypatch.setattr(reconcile_module, "compile_here", counted)
    port = loopback_ports.ports[0]
    folder = tmp_path / "policies"
    folder.mkdir()
    file = folder / "long.yaml"

    def write(host: str) -> None:
        items = "".join(f'            - "{cidr}"\n' for cidr in [f"{host}/32", *FILLER])
        file.write_text(
            "apiVersion: cgpolicy.dev/v1\nkind: CgroupPolicy\nmetadata: {name: long}\n"
            f"spec:\n  targets: [{{path: {scratch_cgroup.relative}}}]\n  network:\n"
            "    egress:\n      default: deny\n      rules:\n        - action: allow\n"
            f"          protocol: tcp\n          ports: [{port}]\n          cidrs:\n{items}"
        )

    service = Enforcer(cgroup_root, bpf_dir, owner=Owner.service(), in_place=True)
    reconciler = reconcile_module.Reconciler(service, folder, Metrics())
    hosts = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
    try:
        write("127.0.0.1")
        assert reconciler.reconcile().applied == ["long"]
        before = program_ids(bpf_dir, "long")
        for host in ("127.0.0.2", "127.0.0.3", "127.0.0.1", "127.0.0.3"):
            write(host)
            assert reconciler.change_files()
            expect(
                scratch_cgroup,
                [((NOW, "tcp", h, port), ALLOWED if h == host else EPERM) for h in hosts],
            )
            assert program_ids(bpf_dir, "long") == before
            (policy,) = load_paths([file]).policies
            assert read_named(bpf_dir, "long").revision == compile_policy(policy).revision
        assert whole == ["long"]  # the first load only
        assert not reconciler.reconcile().applied  # nothing to change
    finally:
        remove(service, "long")


def test_the_service_reads_whole_a_file_whose_lines_yaml_counts_otherwise(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    """Line separators (U+2028) in a comment: YAML counts four more lines than the file's
    newlines, so the tcp rule's item, four lines below the udp rule's, is at the line YAML
    gives the udp rule's. The service must change the tcp rule's item, as a whole reading
    does (its line-by-line fast path once changed the udp rule's: tcp to the old address
    stayed allowed, to the new one refused)."""
    from cgpolicy.enforcer.ownership import Owner
    from cgpolicy.policy.validate import load_paths
    from cgpolicy.reconciler.metrics import Metrics
    from cgpolicy.reconciler.reconcile import Reconciler

    port = loopback_ports.ports[0]
    folder = tmp_path / "policies"
    folder.mkdir()
    file = folder / "breaks.yaml"

    def write(host: str) -> None:
        file.write_text(
            "apiVersion: cgpolicy.dev/v1\nkind: CgroupPolicy\n"
            "metadata: {name: breaks}  # four more lines: \u2028\u2028\u2028\u2028\n"
            f"spec:\n  targets: [{{path: {scratch_cgroup.relative}}}]\n  network:\n"
            "    egress:\n      default: deny\n      rules:\n"
            "        - action: deny\n          protocol: udp\n          cidrs:\n"
            "            - 127.0.0.1/32\n"
            "        - action: allow\n          protocol: tcp\n          cidrs:\n"
            f"            - {host}/32\n          ports: [{port}]\n",
            encoding="utf-8",
        )

    service = Enforcer(cgroup_root, bpf_dir, owner=Owner.service(), in_place=True)
    reconciler = Reconciler(service, folder, Metrics())
    try:
        write("127.0.0.1")
        assert reconciler.reconcile().applied == ["breaks"]
        write("127.0.0.2")
        if not reconciler.change_files():  # the index grows: a full pass reloads
            assert reconciler.reconcile().applied == ["breaks"]
        expect(
            scratch_cgroup,
            [((NOW, "tcp", "127.0.0.1", port), EPERM), ((NOW, "tcp", "127.0.0.2", port), ALLOWED)],
        )
        (policy,) = load_paths([file]).policies
        assert [[str(n) for n in r.cidrs] for r in policy.network.egress.rules] == [
            ["127.0.0.1/32"],
            ["127.0.0.2/32"],
        ]
    finally:
        remove(service, "breaks")
