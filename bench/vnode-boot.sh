#!/usr/bin/env bash
# Boot of a virtual node (issue 17): time from `walt node create` to the login prompt
# on its serial console, split into phases (default image fetch, qemu start, DHCP,
# TFTP of start.ipxe, kernel+initrd, initramfs to the NFS root, userspace), from the
# server log's timestamps and the console log's (each line stamped when the server read
# it); then the same boot with the image already mounted (`walt node reboot`).
# It runs the ignored e2e test `vnode_boot_phases` (tests/e2e/vnodes.rs), which sets up
# the real walt network (bridge, dnsmasq + hook, tftpd-hpa, rpcbind + nfs-ganesha:
# tests/src/vnet.rs) around a fresh server, the default image only in a local registry.
# Usage: bench/vnode-boot.sh [runs]   (root; the debug build, as the e2e tests use;
# qemu runs under KVM when /dev/kvm works, else TCG: the guest's phases dominate)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=${1:-1}
cd "$ROOT"
export CARGO_INCREMENTAL=0
cargo build -q --locked --bins -p walt-server -p walt-cli -p walt-server-setup
for r in $(seq "$RUNS"); do
  echo "=== run $r"
  cargo nextest run -p walt-e2e --locked --no-capture --run-ignored only \
    -E 'test(/vnode_boot_phases/)' 2>&1 | grep '^vnode-boot ' || {
      echo "vnode-boot: the run failed (rerun the nextest command above to see why)" >&2; exit 1; }
done
