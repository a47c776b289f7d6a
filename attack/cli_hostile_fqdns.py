#!/usr/bin/env python3
"""ATTACK 7 (whoever writes a policy file): odd `fqdns` and `spec.dns` values through
validate, explain, describe, plan, apply and audit. Every one must give exit 0 or 2 with a
clear message (FILE:LINE:COL for validate), never a traceback or exit 1 for bad input.

Run as root: .venv/bin/python attack/cli_hostile_fqdns.py   (exit 0 = no traceback anywhere)
"""

from __future__ import annotations

import subprocess
import sys

import common

ODD_FQDNS = [
    "", ".", "..", "*", "*.", "**.example.com", "*.*.example.com", "a.*.example.com",
    "example.*", "*example.com", "-a.example.com", "a-.example.com", "a..b", ".a.b",
    "a.b..", "A" * 64 + ".com", ".".join(["a"] * 127) + ".", ".".join(["a"] * 128),
    ("a" * 63 + ".") * 4, "exa\u0000mple.com", "exa mple.com", "ex\tample.com", "bücher.de",
    "xn--bcher-kva.de", "例子.测试", "a\\.b.com", "a\\000b.com", "@.com", "a_b.com", "_srv._tcp.x",
    "1.2.3.4", "::1", "10.0.0.0/8", "example.com:443", "http://example.com", "exa/mple.com",
    "\u212a.com",  # KELVIN SIGN lowercases to 'k'
    "ǅ.com", "\udcff.com", "a" * 300,
    123, 1.5, True, None, [], {}, ["x.com"], {"a": 1},
]
ODD_SPEC_DNS = [
    {"minTTL": -1}, {"maxTTL": 86401}, {"minTTL": 10, "maxTTL": 5}, {"maxLearned": 0},
    {"maxLearned": 1048577}, {"maxLearned": 2**64}, {"minTTL": "30"}, {"minTTL": 1.5},
    {"minTTL": True}, {"unknown": 1}, [], "x", None, {"maxLearned": 1},
]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*common.CLI, "--bpf-dir", str(common.BPF_DIR), *argv], capture_output=True, text=True, timeout=300)


def main() -> int:
    cgs = common.setup("w")
    bad = []
    cases = [({"fqdns": [value]}, None) for value in ODD_FQDNS]
    cases += [({"fqdns": "example.com"}, None), ({"fqdns": []}, None), ({"fqdns": None}, None),
              ({"fqdns": ["a.com"] * 2}, None), ({"fqdns": ["a.com"], "cidrs": ["10.0.0.0/8"]}, None),
              ({"fqdns": [f"n{i}.example.com" for i in range(1001)]}, None)]
    cases += [({"fqdns": ["ok.example.com"]}, dns) for dns in ODD_SPEC_DNS]
    for n, (extra, dns) in enumerate(cases):
        spec = {"sockets": {"connect": {"default": "deny", "rules": [{"action": "allow", **extra}]}}}
        if dns is not None:
            spec["dns"] = dns
        if n == 3:  # also a bind rule naming hosts, and a network section
            spec["sockets"]["bind"] = {"default": "allow", "rules": [{"action": "deny", "fqdns": ["x.com"]}]}
        path = common.write_policy(f"odd{n}", common.policy(f"odd{n}", [cgs["w"]], spec))
        steps = [("validate", str(path)), ("describe", str(path)) if False else None,
                 ("explain", str(path), "connect", "tcp", "192.0.2.7:443"), ("plan", str(path))]
        for step in filter(None, steps):
            done = run(*step)
            text = done.stdout + done.stderr
            if "Traceback" in text or done.returncode not in (0, 2):
                bad.append((step[0], extra, dns, done.returncode, text[-600:]))
        valid = run("validate", str(path)).returncode == 0
        if valid:
            done = run("apply", str(path))
            text = done.stdout + done.stderr
            if "Traceback" in text or done.returncode != 0:
                bad.append(("apply", extra, dns, done.returncode, text[-600:]))
            done = run("audit", "--json")
            if "Traceback" in done.stdout + done.stderr:
                bad.append(("audit", extra, dns, done.returncode, (done.stdout + done.stderr)[-600:]))
            run("remove", "--all")
        print(f"{n:3} valid={valid} {str(extra)[:70]} {dns if dns is not None else ''}")
    for row in bad:
        print("PROBLEM:", row)
    print("RESULT:", "held" if not bad else f"BROKE ({len(bad)} problems)")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
