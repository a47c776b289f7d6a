"""`cgpolicy learn`: observe a workload on every hook cgpolicy enforces and write the policy
that allows exactly what it did (docs/learn.md)."""
