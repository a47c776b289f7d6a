"""Observe what the kernel enforces, plan the difference to the policies, apply it."""
