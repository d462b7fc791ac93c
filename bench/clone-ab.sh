#!/usr/bin/env bash
# Clone of the bench/clone.sh image by two builds of walt in one invocation,
# alternating which goes first, every run into a new directory and nothing
# deleted until the end (so neither build pays for the other's cleanup):
#   bench/clone-ab.sh OTHER_RELEASE_DIR [runs]
# OTHER_RELEASE_DIR holds the other build's walt and walt-server (e.g. the
# target/release of a worktree bench/before-after.sh made); this checkout's
# release build is the second (WALT_BENCH_AB_THIS=DIR: that build instead, and
# nothing is built). WALT_BENCH_AB_OS=1: the one-layer Debian image of
# bench/clone-os.sh instead.
source "$(dirname "$0")/lib.sh"
A=$1; RUNS=${2:-6}; B=${WALT_BENCH_AB_THIS:-$BIN}
[ -n "${WALT_BENCH_AB_THIS:-}" ] || (cd "$ROOT" && cargo build --release --bins -q)
if [ -n "${WALT_BENCH_AB_OS:-}" ]; then
  make_debian_os; IMG=$DEBIAN_OS
  WHAT="the one-layer Debian $DEBIAN_OS_SUITE $DEBIAN_OS_VARIANT image"
else
  make_layers usr430 rand:100 rand:100 rand:100 dir:/usr/lib/gcc+/usr/share/doc+/usr/include
  IMG=usr430; WHAT="the ~445 MB 4-layer image"
fi
start_registry
push_image "$IMG" bench/big430
a_t=(); b_t=()
one() { # BIN_DIR DATA_DIR -> seconds
  BIN=$1 start_walt "$2"
  sync; local t0 t1; t0=$(now); "$1/walt" image clone bench:bench/big430 >/dev/null; t1=$(now)
  stop_walt; elapsed "$t0" "$t1"
}
for r in $(seq "$RUNS"); do
  if [ $((r % 2)) -eq 1 ]; then
    a=$(one "$A" "$W/a-$r"); b=$(one "$B" "$W/b-$r")
  else
    b=$(one "$B" "$W/b-$r"); a=$(one "$A" "$W/a-$r")
  fi
  a_t+=("$a"); b_t+=("$b")
  echo "run $r: other $a s  this $b s  (this/other $(ratio "$b" "$a"))" >&2
done
ma=$(median "${a_t[@]}"); mb=$(median "${b_t[@]}")
cat <<OUT
| measure | this build | other build ($A) | ratio (this/other) |
| --- | --- | --- | --- |
| clone of $WHAT, median of $RUNS | ${mb} s | ${ma} s | $(ratio "$mb" "$ma") |
| same, best of $RUNS | $(best "${b_t[@]}") s | $(best "${a_t[@]}") s | $(ratio "$(best "${b_t[@]}")" "$(best "${a_t[@]}")") |
OUT
