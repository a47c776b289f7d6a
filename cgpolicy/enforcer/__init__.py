"""Plan the difference between policies and what the kernel has applied (``kernel.applied``),
and apply it make-before-break; who owns what; `run`."""
