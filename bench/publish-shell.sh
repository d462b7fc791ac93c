#!/usr/bin/env bash
# Publish after a shell session that installed a package (issue 14): the same
# Debian image in walt and in podman, the same change made in both (dpkg -i of a
# .deb), then `walt image publish` vs `podman push` of the result, each to an
# empty loopback registry.
#   Base image: Debian bookworm minbase (bench/lib.sh make_debian) + one layer
#   holding /root/pkg.deb (the package, fetched once with apt-get download into
#   the bench cache), pushed to a source registry; walt clones it, podman pulls it.
#   walt: `walt image shell` driven through a pty runs
#         `dpkg -i /root/pkg.deb && rm /root/pkg.deb; exit`, saved under the
#         same name (a layer walt built, tree-backed); then, timed,
#         `walt image publish --registry target IMG`.
#   podman: `podman run … sh -c '<same>'`, `podman commit`; then, timed,
#         `podman push` of the committed image.
#   Each run: fresh target registries (same ports, emptied), a fresh clone / a
#   fresh podman store, the tool order rotated, a pause before; median of RUNS.
# Usage: bench/publish-shell.sh [runs]   (root; builds walt in release mode)
# WALT_BENCH_PKG (default perl-modules-5.36: 2.8 MB .deb, 17.8 MB installed,
# depends on perl-base only, which minbase has).
source "$(dirname "$0")/lib.sh"
RUNS=${1:-3}
PKG=${WALT_BENCH_PKG:-perl-modules-5.36}
command -v pigz >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q pigz >/dev/null
command -v podman >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman >/dev/null
command -v mmdebstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap >/dev/null
[ -n "${WALT_BENCH_NOBUILD:-}" ] || (cd "$ROOT" && cargo build --release --bins -q)
settle() { sync; sleep "${WALT_BENCH_SETTLE:-31}"; }
last_ms() { grep "$1" "$W/server.log" | grep -o 'elapsed_ms=[0-9.]*' | tail -1 | cut -d= -f2 | xargs printf '%.1f'; }
INSTALL='dpkg -i /root/pkg.deb >/dev/null && rm /root/pkg.deb'

# The package, once.
pkgdir=$CACHE/pkg-$PKG
if [ ! -f "$pkgdir/done" ]; then
  rm -rf "$pkgdir"; mkdir -p "$pkgdir"
  (cd "$pkgdir" && apt-get download -q "$PKG" >&2)
  touch "$pkgdir/done"
fi
deb=$(ls "$pkgdir"/*.deb)

# The base image: minbase + /root/pkg.deb, in the layout of make_layers.
make_debian
base=$CACHE/debian-minbase-$PKG
if [ ! -f "$base/done" ]; then
  rm -rf "$base"; mkdir -p "$base" "$W/pl/root"
  chmod 700 "$W/pl/root"; cp "$deb" "$W/pl/root/pkg.deb"
  tar -C "$W/pl" --numeric-owner --owner=0 --group=0 --no-recursion -cf "$base/2.tar" root/pkg.deb
  sha256sum "$base/2.tar" | cut -d' ' -f1 > "$base/2.diffid"
  pigz -6 -c "$base/2.tar" > "$base/2.tar.gz"; rm -f "$base/2.tar"; rm -rf "$W/pl"
  echo 2 > "$base/count"; touch "$base/done"
fi
for f in tar.gz diffid; do ln -f "$CACHE/debian-bookworm-minbase/1.$f" "$base/1.$f"; done

# Registries: the source, and one empty target each for walt and podman
# (emptied and restarted on the same port before each run).
start_registry
SRC_PORT=$REG_PORT
push_image "debian-minbase-$PKG" bench/debian-pkg
target() { # NAME PORT: (re)starts an empty registry NAME on PORT
  local name=$1 port=$2 pidf=$W/target-$1.pid
  if [ -f "$pidf" ]; then kill "$(cat "$pidf")" 2>/dev/null || true; wait "$(cat "$pidf")" 2>/dev/null || true; fi
  rm -rf "$W/target-$name"
  cat > "$W/target-$name.yml" <<YML
version: 0.1
storage: { filesystem: { rootdirectory: $W/target-$name }, delete: { enabled: true } }
http: { addr: 127.0.0.1:$port }
log: { level: error, accesslog: { disabled: true } }
YML
  docker-registry serve "$W/target-$name.yml" >>"$W/target-$name.log" 2>&1 & echo $! > "$pidf"; pids+=($!)
  wait_http "http://127.0.0.1:$port/v2/"
}
WT_PORT=$(free_port); PT_PORT=$(free_port)
target walt "$WT_PORT"; target podman "$PT_PORT"
start_walt "$W/data" "$WT_PORT"


podman_env "$W/podman"
trap 'podman rm -af >/dev/null 2>&1; podman rmi -af >/dev/null 2>&1; umount "$W/podman/root/overlay" 2>/dev/null || true; cleanup' EXIT
SRC_IMG=127.0.0.1:$SRC_PORT/bench/debian-pkg:latest

wt=(); pt=(); ws=(); wlay=(); play=()
run_walt() { # run number
  local r=$1 t0 t1
  "$BIN/walt" image clone bench:bench/debian-pkg "w$r" >/dev/null
  python3 "$ROOT/bench/ptydrive.py" run "$INSTALL" "$BIN/walt" image shell "w$r" >/dev/null
  ws+=("$(last_ms 'session saved')")
  sync; t0=$(now)
  "$BIN/walt" image publish --registry target "w$r" >/dev/null
  t1=$(now)
  wt+=("$(elapsed "$t0" "$t1")")
  "$BIN/walt" image remove "w$r" >/dev/null
}
run_podman() {
  local r=$1 t0 t1
  podman pull -q --tls-verify=false "$SRC_IMG" >/dev/null
  podman run --name "c$r" --network=none --runtime runc "$SRC_IMG" sh -c "$INSTALL"
  podman commit -q "c$r" "localhost/p$r" >/dev/null
  sync; t0=$(now)
  podman push -q --tls-verify=false "localhost/p$r" "127.0.0.1:$PT_PORT/bench/p$r:latest"
  t1=$(now)
  pt+=("$(elapsed "$t0" "$t1")")
  podman rm -f "c$r" >/dev/null; podman rmi -af >/dev/null 2>&1 || true
}
for r in $(seq "$RUNS"); do
  target walt "$WT_PORT"; target podman "$PT_PORT"
  settle
  if [ $((r % 2)) -eq 1 ]; then first=walt; run_walt "$r"; run_podman "$r"; else first=podman; run_podman "$r"; run_walt "$r"; fi
  echo "run $r ($first first): walt publish ${wt[-1]} s (shell save, server: ${ws[-1]} ms)  podman push ${pt[-1]} s" >&2
done
# What each pushed in the last run (bytes stored by each target registry).
wbytes=$(du -sb "$W/target-walt" | cut -f1); pbytes=$(du -sb "$W/target-podman" | cut -f1)
[ -z "${WALT_BENCH_LOG:-}" ] || cp "$W/server.log" "$WALT_BENCH_LOG"
stop_walt
wm=$(median "${wt[@]}"); pm=$(median "${pt[@]}")
echo "bench/publish-shell.sh $* (package $PKG) at $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- crates || echo '+changes'); load $(cut -d' ' -f1-3 /proc/loadavg)"
cat <<OUT
| measure (Debian minbase + $PKG installed with dpkg -i; median of $RUNS, order rotated) | walt | reference | ratio (walt/ref) | target |
| --- | --- | --- | --- | --- |
| publish after a shell that installed a package, to an empty registry | $wm s | podman push $pm s | $(ratio "$wm" "$pm") | <= 0.5 |
| per run | ${wt[*]} s | ${pt[*]} s | | |
| bytes in the target registry (last run) | $((wbytes / 1000000)) MB | $((pbytes / 1000000)) MB | | |
OUT
