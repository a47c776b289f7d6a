"""The only layer that calls bpf(), imports bcc, or touches cgroupfs and bpffs."""
