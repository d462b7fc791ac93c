#!/usr/bin/env bash
# BOOT_FILES of the Raspberry Pi recipes: for each model, /boot/<model>/ gets
#   kernel, initrd   relative links to the newest installed kernel and its initrd
#   dtb              a copy of the model's device tree, from the Debian kernel package
#   start.uboot      start.uboot.in for this model (serial console, booti/bootz),
#                    made into a u-boot script image by mkimage (u-boot-tools, on this host)
# Usage: boot-files.sh ROOT RECIPE_DIR   (models in $WALT_MODELS, comma-separated)
set -euo pipefail
root=$1
here=$(cd "$(dirname "$0")" && pwd)
command -v mkimage >/dev/null || { echo "mkimage is missing: install u-boot-tools." >&2; exit 1; }
cd "$root/boot"
k=$(ls vmlinuz-* | sort -V | tail -1); v=${k#vmlinuz-}
test -f "initrd.img-$v" || { echo "no initrd.img-$v in the image's /boot" >&2; exit 1; }
case $v in
  *-arm64) boot=booti; arch=arm64 ;; # arm64 Image (booti decompresses it if needed)
  *) boot=bootz; arch=arm ;;          # 32-bit zImage
esac
for m in ${WALT_MODELS//,/ }; do
  # device tree and serial console (upstream device trees: the 40-pin header's UART
  # is the PL011 ttyAMA0 on the Pi 1 and 2, the mini UART ttyS1 on the 3 and 4)
  case $m in
    rpi-b) dtb=bcm2835-rpi-b.dtb console=ttyAMA0 ;;
    rpi-b-plus) dtb=bcm2835-rpi-b-plus.dtb console=ttyAMA0 ;;
    rpi-2-b) dtb=bcm2836-rpi-2-b.dtb console=ttyAMA0 ;;
    rpi-3-b) dtb=bcm2837-rpi-3-b.dtb console=ttyS1 ;;
    rpi-3-b-plus) dtb=bcm2837-rpi-3-b-plus.dtb console=ttyS1 ;;
    rpi-4-b) dtb=bcm2711-rpi-4-b.dtb console=ttyS1 ;;
    rpi-400) dtb=bcm2711-rpi-400.dtb console=ttyS1 ;;
    *) echo "boot-files.sh: no device tree known for model $m" >&2; exit 1 ;;
  esac
  src=$(find "$root/usr/lib/linux-image-$v" -name "$dtb" | head -n1)
  [ -n "$src" ] || { echo "boot-files.sh: kernel $v has no $dtb (model $m)" >&2; exit 1; }
  mkdir -p "$m"
  ln -sfn "../vmlinuz-$v" "$m/kernel"
  ln -sfn "../initrd.img-$v" "$m/initrd"
  install -m644 "$src" "$m/dtb"
  sed -e "s/@MODEL@/$m/g; s/@CONSOLE@/$console/; s/@BOOT@/$boot/" "$here/start.uboot.in" > "$m/start.uboot.txt"
  mkimage -A "$arch" -O linux -T script -C none -n "walt $m" -d "$m/start.uboot.txt" "$m/start.uboot" >/dev/null
  rm -f "$m/start.uboot.txt"
done
