"""The reconcile service: keep a policy folder applied through new cgroups, drift,
faults and restarts."""
