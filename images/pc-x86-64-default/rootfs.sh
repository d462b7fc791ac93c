#!/usr/bin/env bash
# Builds the root filesystem of the pc-x86-64 default image as a tar archive.
# Usage: rootfs.sh OUT_TAR   (run by images/build.sh; needs root and mmdebstrap)
# Inputs: recipe.conf (suite, mirror, arch), packages, files/. images/build.sh
# caches the result under a hash of all of them and of this script.
set -euo pipefail
out=${1:?usage: $0 OUT_TAR}
here=$(cd "$(dirname "$0")" && pwd)
. "$here/recipe.conf"
pkgs=$(sed -e 's/#.*//' "$here/packages" | tr -s ' \n' '\n' | grep -v '^$' | paste -sd, -)
F=$here/files
# The initramfs configuration goes in before the kernel is installed, so that the
# kernel's postinst builds the initramfs once, already able to mount an NFS root
# under a tmpfs overlay.
# The device nodes mmdebstrap puts in /dev are left out (walt refuses device nodes in
# archives; nodes get /dev from devtmpfs): only the /dev directory stays.
mmdebstrap --quiet --mode=root --format=tar --variant=minbase --architectures="$ARCH" \
  --aptopt='APT::Install-Recommends "false"' \
  --include="$pkgs" \
  --essential-hook='mkdir -p "$1/etc/initramfs-tools/scripts/init-bottom" "$1/etc/initramfs-tools/hooks" "$1/etc/initramfs-tools/conf.d"' \
  --essential-hook="install -m755 '$F/overlayroot' \"\$1/etc/initramfs-tools/scripts/init-bottom/overlayroot\"" \
  --essential-hook="install -m755 '$F/overlay-hook' \"\$1/etc/initramfs-tools/hooks/overlay\"" \
  --essential-hook="install -m644 '$F/netboot.conf' \"\$1/etc/initramfs-tools/conf.d/netboot\"" \
  --customize-hook='chroot "$1" passwd -d root' \
  --customize-hook='echo walt-node > "$1/etc/hostname"' \
  --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*_key "$1"/etc/ssh/ssh_host_*_key.pub' \
  --customize-hook='mkdir -p "$1/etc/systemd/system/ssh.service.d" && printf "[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n" > "$1/etc/systemd/system/ssh.service.d/walt-host-keys.conf"' \
  --customize-hook='set -e; cd "$1/boot"; k=$(ls vmlinuz-* | sort -V | tail -1); v=${k#vmlinuz-}; test -f "initrd.img-$v"; mkdir -p pc-x86-64; ln -sfn "../vmlinuz-$v" pc-x86-64/vmlinuz; ln -sfn "../initrd.img-$v" pc-x86-64/initrd.img' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
  "$SUITE" - "$MIRROR" | mmtarfilter --path-exclude='/dev/*' > "$out"
