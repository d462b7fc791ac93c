#!/usr/bin/env bash
# Runs one benchmark script of bench/ on an earlier revision and on this
# checkout, alternately, so a change can be shown not to make it slower.
#   bench/before-after.sh REV SCRIPT [ROUNDS] [-- SCRIPT ARGS...]
# REV is built (release) in a worktree under /var/tmp/walt-bench-revs/ the
# first time; each round runs REV's copy of SCRIPT, then this checkout's.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rev=$(git -C "$ROOT" rev-parse --short "$1"); script=$2; rounds=${3:-1}
shift $(( $# < 3 ? $# : 3 )); [ "${1:-}" = "--" ] && shift
base=/var/tmp/walt-bench-revs/$rev
if [ ! -d "$base" ]; then
  mkdir -p /var/tmp/walt-bench-revs
  git -C "$ROOT" worktree add --detach "$base" "$rev" >&2
fi
(cd "$base" && cargo build --release --bins -q)
(cd "$ROOT" && cargo build --release --bins -q)
for r in $(seq "$rounds"); do
  for side in before after; do
    dir=$ROOT; [ $side = before ] && dir=$base
    echo "=== round $r, $side ($(git -C "$dir" rev-parse --short HEAD)): bench/$script $*"
    bash "$dir/bench/$script" "$@"
  done
done
