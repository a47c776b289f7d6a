"""cgpolicy benchmarks: ``python -m bench [--output FILE] [--quick]`` (see bench/README.md).

Every figure is measured on the real kernel, in scratch cgroups under
``<cgroup2>/cgpolicy-bench-<pid>/`` and pins under ``<bpffs>/cgpolicy-bench-<pid>/``,
both removed afterwards. Nothing here asserts a time: figures are compared with their
targets and reported.
"""
