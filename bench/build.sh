#!/usr/bin/env bash
# Build benchmark (issue 12). In one run, on the same context, the same busybox base
# and the same disk, a 6-step Dockerfile (COPY of 50 MB in 2 000 files, RUNs that write
# files) built by:
#   walt image build --from-dir   vs   docker build (its own dockerd)   vs   podman build
#   cold: every step runs (--no-cache for each tool), median of RUNS, tools rotated;
#   unchanged rebuild: every step from the cache, median of RUNS (walt: target <= 0.2 s).
#   BASE=debian: the same on a Debian bookworm minbase root filesystem (mmdebstrap from the
#   Debian mirror, ~6 500 files), instead of busybox, until images/ has Debian images.
# Usage: [BASE=busybox|debian] bench/build.sh [runs]   (needs root; builds walt in release mode)
source "$(dirname "$0")/lib.sh"
RUNS=${1:-3}
BASE=${BASE:-busybox}
case $BASE in busybox|debian) ;; *) echo "BASE must be busybox or debian" >&2; exit 2;; esac
[ "$BASE" = busybox ] || command -v mmdebstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap >/dev/null
command -v pigz >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q pigz >/dev/null
command -v podman >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman >/dev/null
command -v dockerd >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >/dev/null
[ -x /bin/busybox ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -q busybox-static >/dev/null
[ -n "${WALT_BENCH_NOBUILD:-}" ] || (cd "$ROOT" && cargo build --release --bins -q)


# The context: 2 000 incompressible files of 25 KiB (50 MB) in 20 directories, once.
make_context() {
  local dir=$CACHE/build-ctx d i
  [ -f "$dir/done" ] && return 0
  echo "building the 50 MB context" >&2
  rm -rf "$dir"; mkdir -p "$dir/data"
  head -c $((2000 * 25600)) /dev/urandom > "$W/rand"
  for d in $(seq -w 0 19); do
    mkdir -p "$dir/data/d$d"
    for i in $(seq -w 0 99); do
      dd if="$W/rand" of="$dir/data/d$d/f$i" bs=25600 skip=$((10#$d * 100 + 10#$i)) count=1 status=none
    done
  done
  rm -f "$W/rand"
  touch "$dir/done"
}


if [ "$BASE" = debian ]; then make_debian; BASEDIR=debian-bookworm-minbase; else make_busybox; BASEDIR=busybox; fi
make_context
# FROM busybox (or debian): walt's is the caller's image, docker's and podman's a local image.
CTX=$W/ctx
mkdir -p "$CTX"; cp -r "$CACHE/build-ctx/data" "$CTX/data"
cat > "$CTX/Dockerfile" <<DF
FROM $BASE
COPY data /data
RUN mkdir /gen && for i in \$(seq 1 500); do echo "line \$i" > /gen/f\$i; done
RUN cat /data/d00/* /data/d01/* > /gen/concat && wc -c /gen/concat > /gen/size
ENV BENCH=1
RUN echo done > /root/done
DF
ctx_mb=$(du -s --apparent-size -B 1000000 "$CTX/data" | cut -f1); ctx_files=$(find "$CTX/data" -type f | wc -l)

start_registry
push_image "$BASEDIR" "bench/$BASE"
start_walt "$W/data"
"$BIN/walt" image clone "bench:bench/$BASE" "$BASE" >/dev/null

# dockerd on its own data root (no bridge, no iptables), as the e2e harness runs it.
D=$W/docker; mkdir -p "$D"
dockerd --data-root "$D/d" --exec-root "$D/e" --pidfile "$D/dockerd.pid" -H "unix://$D/docker.sock" \
  --iptables=false --ip6tables=false --bridge=none >"$D/dockerd.log" 2>&1 & DOCKERD=$!; pids+=($DOCKERD)
export DOCKER_HOST=unix://$D/docker.sock DOCKER_CONFIG=$D/client DOCKER_BUILDKIT=0
# podman reads DOCKER_CONFIG too: an empty one.
mkdir -p "$D/client"; echo "{}" > "$D/client/config.json"
for _ in $(seq 300); do docker version >/dev/null 2>&1 && break; sleep 0.1; done
docker import --change 'LABEL walt.node.models=pc-x86-64' "$CACHE/$BASEDIR/1.tar.gz" "$BASE:latest" >/dev/null

podman_env "$W/podman"
# crun refuses this machine's hybrid cgroup layout: runc (see bench/shell.sh). Podman's
# overlay and the dockerd go before $W is removed.
trap 'podman rmi -af >/dev/null 2>&1; umount "$W/podman/root/overlay" 2>/dev/null || true; kill $DOCKERD 2>/dev/null; wait $DOCKERD 2>/dev/null; cleanup' EXIT
# Imported (as docker's), not pulled: buildah 1.28 cannot commit on a base whose config
# has no history ("history lists 2 non-empty layers, but we have 3 layers on disk").
podman import -q --change 'LABEL walt.node.models=pc-x86-64' "$CACHE/$BASEDIR/1.tar.gz" "$BASE:latest" >/dev/null

wb() { "$BIN/walt" image build --from-dir "$CTX" --yes "$@" bench-built >"$W/walt-build.out" 2>&1 || { cat "$W/walt-build.out" >&2; exit 1; }; }
db() { docker build -q --network=none "$@" -t bench-built "$CTX" >"$W/docker-build.out" 2>&1 || { cat "$W/docker-build.out" >&2; exit 1; }; }
pb() { podman build -q --network=none --runtime runc --pull=never --layers "$@" -t bench-built "$CTX" >"$W/podman-build.out" 2>&1 || { cat "$W/podman-build.out" >&2; exit 1; }; }
timed() { local t0 t1; sync; t0=$(now); "$@"; t1=$(now); elapsed "$t0" "$t1"; }

# One untimed build each (warms the page cache with the context), then RUNS cold runs,
# the tools rotated.
wb --no-cache; db --no-cache; pb --no-cache
wc_=(); dc=(); pc=()
for r in $(seq "$RUNS"); do
  case $((r % 3)) in
    1) wc_+=("$(timed wb --no-cache)"); dc+=("$(timed db --no-cache)"); pc+=("$(timed pb --no-cache)");;
    2) dc+=("$(timed db --no-cache)"); pc+=("$(timed pb --no-cache)"); wc_+=("$(timed wb --no-cache)");;
    0) pc+=("$(timed pb --no-cache)"); wc_+=("$(timed wb --no-cache)"); dc+=("$(timed db --no-cache)");;
  esac
  echo "cold run $r: walt ${wc_[-1]} s  docker ${dc[-1]} s  podman ${pc[-1]} s" >&2
done
grep -q "Using cache" "$W/walt-build.out" && { echo "walt used its cache with --no-cache" >&2; exit 1; }

# Unchanged rebuilds: every step from the cache.
wb; db; pb
wr=(); dr=(); pr=()
for r in $(seq "$RUNS"); do
  wr+=("$(timed wb)"); dr+=("$(timed db)"); pr+=("$(timed pb)")
  echo "rebuild run $r: walt ${wr[-1]} s  docker ${dr[-1]} s  podman ${pr[-1]} s" >&2
done
cached=$(grep -c -- "--> Using cache" "$W/walt-build.out" || true)
steps=$(grep -c "^STEP " "$W/walt-build.out" || true)
echo "walt's last rebuild: $cached of $steps steps from the cache" >&2
[ -z "${WALT_BENCH_LOG:-}" ] || cp "$W/server.log" "$WALT_BENCH_LOG"
stop_walt

wcm=$(median "${wc_[@]}"); dcm=$(median "${dc[@]}"); pcm=$(median "${pc[@]}")
cat <<OUT
| measure (median of $RUNS) | walt | docker build | podman build | walt / docker | walt / podman | target |
| --- | --- | --- | --- | --- | --- | --- |
| cold build on $BASE, 6 steps, COPY of ${ctx_mb} MB in ${ctx_files} files | $wcm s | $dcm s | $pcm s | $(ratio "$wcm" "$dcm") | $(ratio "$wcm" "$pcm") | <= 0.5 |
| unchanged rebuild ($cached of $steps steps cached for walt) | $(median "${wr[@]}") s | $(median "${dr[@]}") s | $(median "${pr[@]}") s | $(ratio "$(median "${wr[@]}")" "$(median "${dr[@]}")") | $(ratio "$(median "${wr[@]}")" "$(median "${pr[@]}")") | walt <= 0.2 s |
OUT
