#!/usr/bin/env bash
# What an overlay mount costs an extraction: `tar -xf` of bench/shell.sh's cp tree
# (217 MB / 7 515 files) into a plain directory and into an overlay mount with the
# sandbox's options (redirect_dir, metacopy, index, xino off), each followed by `sync`,
# after a 31 s pause (the ext4 inode allocator skips inodes freed in the last 30 s).
# Usage: bench/overlay-extract.sh [runs]   (root; run bench/shell.sh once first for the tree)
source "$(dirname "$0")/lib.sh"
RUNS=${1:-2}
C=$CACHE/cp200
[ -d "$C/tree200" ] || { echo "no $C/tree200: run WALT_BENCH_CP_ONLY=1 bench/shell.sh first" >&2; exit 1; }
B=$W/ovl; mkdir -p "$B"
tar -C "$C" -cf "$B/t.tar" tree200
for r in $(seq "$RUNS"); do
  mkdir -p "$B/plain$r" "$B/low$r/root" "$B/up$r" "$B/work$r" "$B/m$r"
  mount -t overlay overlay -o "lowerdir=$B/low$r,upperdir=$B/up$r,workdir=$B/work$r,redirect_dir=off,metacopy=off,index=off,xino=off" "$B/m$r"
  sync; sleep 31; t0=$(now); tar -C "$B/plain$r" -xf "$B/t.tar"; t1=$(now); sync; t2=$(now)
  sync; sleep 31; t3=$(now); tar -C "$B/m$r/root" -xf "$B/t.tar"; t4=$(now); sync; t5=$(now)
  umount "$B/m$r"
  echo "run $r: plain tar -xf $(elapsed "$t0" "$t1") s + sync $(elapsed "$t1" "$t2") s | overlay tar -xf $(elapsed "$t3" "$t4") s + sync $(elapsed "$t4" "$t5") s"
done
