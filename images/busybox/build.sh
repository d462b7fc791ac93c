#!/usr/bin/env bash
# The tiny offline walt image: a busybox-static root filesystem as an OCI
# layout, labelled for the given node models. No network needed.
# Usage: images/busybox/build.sh OUT_DIR [NODE_MODELS] [ARCH]
#   OUT_DIR      OCI layout to create (image tag `latest`)
#   NODE_MODELS  walt.node.models label (default pc-x86-64)
#   ARCH         OCI architecture (default amd64)
# Needs busybox-static and umoci (scripts/install-deps.sh installs them).
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [NODE_MODELS] [ARCH]}
models=${2:-pc-x86-64}
arch=${3:-amd64}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"/{bin,etc,root,tmp,proc,sys,dev}
chmod 1777 "$root/tmp"
cp /bin/busybox "$root/bin/"
for applet in sh ash ls cat echo uname mkdir rm cp mv ln ps mount umount sleep vi \
              grep sed head tail wc id hostname env true false touch chmod chown; do
  ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"
printf 'walt busybox image (%s)\n' "$models" > "$root/etc/motd"
tar -C "$root" --numeric-owner --owner=0 --group=0 -cf "$work/rootfs.tar" .
rm -rf "$out"
umoci init --layout "$out"
umoci new --image "$out:latest"
umoci raw add-layer --image "$out:latest" "$work/rootfs.tar"
umoci config --image "$out:latest" --config.label "walt.node.models=$models" \
  --architecture "$arch" --os linux --config.cmd /bin/sh
