#!/usr/bin/env bash
# Builds the root filesystem of a default image as a tar archive, with mmdebstrap.
# Usage: debian-rootfs.sh RECIPE_DIR OUT_TAR   (a recipe's rootfs.sh calls it; needs
# root, mmdebstrap, and qemu-user-static + binfmt for a foreign ARCH).
# Inputs: common/debian.conf then RECIPE_DIR/recipe.conf (SUITE, MIRROR, ARCH, KERNEL,
# MODELS, BOOT_FILES, INITRAMFS_MODULES), common/packages + RECIPE_DIR/packages (optional), common/files/,
# INITRAMFS_MODULES (optional, relative to RECIPE_DIR: modules forced into the initramfs).
# BOOT_FILES (a script, relative to RECIPE_DIR) lays out /boot/<model>/ for each model;
# it runs on this host as `BOOT_FILES ROOT RECIPE_DIR` after the kernel is installed.
set -euo pipefail
recipe=$(cd "${1:?usage: $0 RECIPE_DIR OUT_TAR}" && pwd)
out=${2:?usage: $0 RECIPE_DIR OUT_TAR}
C=$(cd "$(dirname "$0")" && pwd)
. "$C/debian.conf"
. "$recipe/recipe.conf"
: "${ARCH:?ARCH missing in $recipe/recipe.conf}" "${KERNEL:?KERNEL missing in $recipe/recipe.conf}"
: "${MODELS:?MODELS missing in $recipe/recipe.conf}" "${BOOT_FILES:?BOOT_FILES missing in $recipe/recipe.conf}"
boot_files=$(cd "$recipe" && realpath "$BOOT_FILES")
[ -x "$boot_files" ] || { echo "$recipe/recipe.conf: BOOT_FILES $BOOT_FILES is not an executable script." >&2; exit 1; }
pkgs=$( (cat "$C/packages"; [ ! -f "$recipe/packages" ] || cat "$recipe/packages"; echo "$KERNEL") |
  sed -e 's/#.*//' | tr -s ' \n' '\n' | grep -v '^$' | paste -sd, -)
F=$C/files
modules=/dev/null
[ -z "${INITRAMFS_MODULES:-}" ] || modules=$(cd "$recipe" && realpath -e "$INITRAMFS_MODULES")
export WALT_MODELS=$MODELS
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
  --essential-hook="sed -e 's/#.*//' -e '/^[[:space:]]*\$/d' '$modules' >> \"\$1/etc/initramfs-tools/modules\"" \
  --customize-hook='chroot "$1" passwd -d root' \
  --customize-hook='echo walt-node > "$1/etc/hostname"' \
  --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*_key "$1"/etc/ssh/ssh_host_*_key.pub' \
  --customize-hook='mkdir -p "$1/etc/systemd/system/ssh.service.d" && printf "[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n" > "$1/etc/systemd/system/ssh.service.d/walt-host-keys.conf"' \
  --customize-hook="'$boot_files' \"\$1\" '$recipe'" \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
  "$SUITE" - "$MIRROR" | mmtarfilter --path-exclude='/dev/*' > "$out"
