#!/bin/sh
# Prepares a fresh Debian machine (as root) for cgpolicy, idempotently:
# system packages (bcc, bpftool, kernel headers), the header fallback for kernels
# Debian does not package headers for, bpffs, and a virtual environment in .venv
# that sees the distribution's bcc. Safe to run again; does nothing it has done.
set -eu
cd "$(dirname "$0")/.."

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "setup: must run as root (installs packages, mounts bpffs)" >&2
        exit 1
    fi
}

PACKAGES="python3-bpfcc bpftool python3-venv python3-pip iproute2 kmod"
# the peers and loads of bench/compare.py, which tests/kernel/test_compare_smoke.py runs
PACKAGES="$PACKAGES iperf3 qperf nftables iptables"
KERNEL="$(uname -r)"

missing=""
for pkg in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
# Headers: the running kernel's own package if Debian has one, else the current ones.
if [ ! -e "/lib/modules/$KERNEL/build/include" ]; then
    if apt-cache show "linux-headers-$KERNEL" >/dev/null 2>&1; then
        missing="$missing linux-headers-$KERNEL"
    else
        dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q "install ok installed" \
            || missing="$missing linux-headers-amd64"
    fi
fi
if [ -n "$missing" ]; then
    need_root
    echo "setup: installing$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# No packaged headers for this kernel: link the distribution's newest ones. cgroup
# programs use only stable UAPI structs, so these compile correctly for it.
if [ ! -e "/lib/modules/$KERNEL/build/include" ]; then
    need_root
    arch_dir="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)"
    common_dir="$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1)"
    if [ -z "$arch_dir" ] || [ -z "$common_dir" ]; then
        echo "setup: no kernel headers found under /usr/src" >&2
        exit 1
    fi
    mkdir -p "/lib/modules/$KERNEL"
    ln -sfn "$arch_dir" "/lib/modules/$KERNEL/build"
    ln -sfn "$common_dir" "/lib/modules/$KERNEL/source"
    echo "setup: linked $arch_dir as headers for $KERNEL"
fi

# bpffs at the standard place.
if ! grep -q ' /sys/fs/bpf bpf ' /proc/mounts; then
    need_root
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf
    echo "setup: mounted bpffs at /sys/fs/bpf"
fi

# A virtual environment on the distribution's python, so that bcc imports.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml | md5sum | cut -c1-12)"
if [ ! -e "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test,dev]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi

# The compiled-program store (/var/cache/cgpolicy, root only): bcc compiles bpf/ once per
# machine here, so no later command imports bcc or LLVM. Compiles only what is missing,
# stale or damaged.
.venv/bin/cgpolicy cache fill
