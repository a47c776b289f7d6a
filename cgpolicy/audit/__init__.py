"""`cgpolicy audit`: what is attached at every cgroup hook, whose it is, whether it matches
what cgpolicy applied, and the per-rule counters of cgpolicy's programs.

model: the report and the pure decisions (owner, attach mode, inheritance, drift).
collect: the report from the kernel's attachments and what cgpolicy applied (both read
through ``cgpolicy.kernel``). render: the table for people.
"""
