"""Policy -> CompiledPolicy: pure, no syscalls and no bcc."""
