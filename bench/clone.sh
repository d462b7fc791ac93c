#!/usr/bin/env bash
# Clone benchmark (issue: foundation). On one loopback registry, cold store each time:
#   walt image clone  vs  skopeo copy docker://… oci:…  vs  podman pull
# plus re-clone of a fully stored image under a new name (server side),
# and the server's peak RSS while cloning a ~1 GB image.
# Each timed command starts with no dirty pages (sync first), so no tool pays
# for another's writeback.
# Usage: bench/clone.sh [runs]   (needs root; builds walt in release mode)
source "$(dirname "$0")/lib.sh"
RUNS=${1:-3}
command -v pigz >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q pigz >/dev/null
command -v podman >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman >/dev/null
(cd "$ROOT" && cargo build --release --bins -q)

make_layers usr430 rand:100 rand:100 rand:100 dir:/usr/lib/gcc+/usr/share/doc+/usr/include
make_layers big1g rand:100 rand:100 rand:100 rand:100 rand:100 rand:100 rand:100 rand:100 rand:100 rand:100
start_registry
push_image usr430 bench/big430
push_image big1g bench/big1g
size=$(du -cb "$CACHE"/usr430/*.tar.gz | tail -1 | cut -f1)
echo "image: 4 layers, $((size/1000000)) MB compressed; $RUNS runs each, best kept" >&2

# Cold stores: each run starts by deleting the previous run's stores, then
# waits until those inodes are no longer "recently deleted" (ext4 without a
# journal, as here, scans them on every inode allocation for 30 s), so that
# no tool pays for the deletions of another.
settle() { sync; sleep "${WALT_BENCH_SETTLE:-31}"; }
walt_t=(); skopeo_t=(); podman_t=()
for r in $(seq "$RUNS"); do
  rm -rf "$W/data" "$W/oci"
  if [ -d "$W/podman" ]; then podman rmi -a -f >/dev/null 2>&1 || true; rm -rf "$W/podman"; fi
  settle

  start_walt "$W/data"
  sync; t0=$(now); "$BIN/walt" image clone bench:bench/big430 >/dev/null; t1=$(now)
  walt_t+=("$(elapsed "$t0" "$t1")")
  stop_walt

  sync; t0=$(now); skopeo copy -q --src-tls-verify=false "docker://127.0.0.1:$REG_PORT/bench/big430:latest" "oci:$W/oci:latest"; t1=$(now)
  skopeo_t+=("$(elapsed "$t0" "$t1")")

  podman_env "$W/podman"
  sync; t0=$(now); podman pull -q --tls-verify=false "127.0.0.1:$REG_PORT/bench/big430:latest" >/dev/null; t1=$(now)
  podman_t+=("$(elapsed "$t0" "$t1")")
  echo "run $r: walt ${walt_t[-1]}s  skopeo ${skopeo_t[-1]}s  podman ${podman_t[-1]}s" >&2
done
wb=$(best "${walt_t[@]}"); sb=$(best "${skopeo_t[@]}"); pb=$(best "${podman_t[@]}")

# Re-clone under a new name: every layer already stored.
rm -rf "$W/data"; settle; start_walt "$W/data"
"$BIN/walt" image clone bench:bench/big430 >/dev/null
re=()
for r in $(seq 5); do
  "$BIN/walt" image clone bench:bench/big430 "again-$r" >/dev/null
  re+=("$(grep -o 'elapsed_ms=[0-9.]*' "$W/server.log" | tail -1 | cut -d= -f2)")
done
stop_walt

# Peak RSS of the server while cloning the ~1 GB image.
rm -rf "$W/data"; settle; start_walt "$W/data"
sync; t0=$(now); "$BIN/walt" image clone bench:bench/big1g >/dev/null; t1=$(now)
rss=$(peak_rss_mb "$WALT_PID"); t1g=$(elapsed "$t0" "$t1")
stop_walt

cat <<OUT
| measure | walt | reference | ratio (walt/ref) | target |
| --- | --- | --- | --- | --- |
| clone of the ~$((size/1000000)) MB 4-layer image | ${wb} s | podman pull ${pb} s | $(ratio "$wb" "$pb") | <= 0.40 |
| same | ${wb} s | skopeo copy to oci: ${sb} s | $(ratio "$wb" "$sb") | <= 1.20 |
| re-clone, all layers stored (server side) | $(best "${re[@]}") ms | — | — | < 50 ms |
| server peak RSS, clone of 1 GB image (${t1g} s) | ${rss} MB | — | — | < 100 MB |
OUT
