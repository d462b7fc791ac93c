#!/usr/bin/env bash
# BOOT_FILES of the PC recipes: /boot/<model>/vmlinuz and initrd.img, relative links to
# the newest installed kernel and its initrd (start.ipxe is added by the Dockerfile).
# Usage: pc-boot-files.sh ROOT RECIPE_DIR   (models in $WALT_MODELS, comma-separated)
set -euo pipefail
cd "$1/boot"
k=$(ls vmlinuz-* | sort -V | tail -1); v=${k#vmlinuz-}
test -f "initrd.img-$v" || { echo "no initrd.img-$v in the image's /boot" >&2; exit 1; }
for m in ${WALT_MODELS//,/ }; do
  mkdir -p "$m"
  ln -sfn "../vmlinuz-$v" "$m/vmlinuz"
  ln -sfn "../initrd.img-$v" "$m/initrd.img"
done
