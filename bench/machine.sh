#!/usr/bin/env bash
# The property of this kind of virtual machine that every benchmark writing files
# pays for (docs/performance.md, "The machine"): memory the guest has not touched
# for a while is slow to touch again (free pages are reported to the hypervisor
# and faulted back in). Writes SIZE GiB to /dev/shm three times: first, right
# after, and after PAUSE seconds; prints the cost per GiB of each.
# Usage: bench/machine.sh [SIZE_GIB] [PAUSE_S]   (default 2 GiB, 60 s)
set -euo pipefail
SIZE=${1:-2} PAUSE=${2:-60}
f=/dev/shm/walt-bench-machine.$$
trap 'rm -f "$f"' EXIT
touch_mem() {
  local t0 t1
  t0=$(date +%s.%N); head -c "${SIZE}G" /dev/zero > "$f"; t1=$(date +%s.%N); rm -f "$f"
  python3 -c "print(f'{($t1-$t0)/$SIZE:.2f}')"
}
first=$(touch_mem); again=$(touch_mem)
echo "waiting ${PAUSE} s (the host takes free memory back)" >&2
sleep "$PAUSE" # the property measured is what a pause does
later=$(touch_mem)
cat <<OUT
| writing $SIZE GiB to /dev/shm | s per GiB |
| --- | --- |
| first | $first |
| right after | $again |
| after ${PAUSE} s | $later |
OUT
