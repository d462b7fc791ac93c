# Shared helpers of the benchmark scripts (sourced).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$ROOT/target/release
CACHE=${WALT_BENCH_CACHE:-/var/tmp/walt-bench-cache}
mkdir -p "$CACHE"
W=$(mktemp -d /tmp/walt-bench.XXXXXX)
pids=()
# This machine's ext4 has no journal: creating a file near inodes deleted in the last
# 60 s, or 360 s once their inode table block is dirty again (which creating the file
# makes it), skips each of them at a cost (`recently_deleted`), up to 3x the CPU of the
# creation. A bench that deleted a large tree leaves the time in $CACHE/.last-deletion,
# and the next one waits until that window is over (WALT_BENCH_DELETE_WAIT seconds,
# default 360; 0 to skip), so that no tool pays for the one before.
DELETE_STAMP=$CACHE/.last-deletion
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true
  local n; n=$(find "$W" -xdev 2>/dev/null | head -2001 | wc -l || true)
  rm -rf "$W"
  [ "$n" -le 2000 ] || date +%s > "$DELETE_STAMP"
}
trap cleanup EXIT
if [ -f "$DELETE_STAMP" ]; then
  _left=$(( $(cat "$DELETE_STAMP") + ${WALT_BENCH_DELETE_WAIT:-360} - $(date +%s) ))
  if [ "$_left" -gt 0 ]; then
    echo "waiting ${_left} s: a large tree was deleted less than ${WALT_BENCH_DELETE_WAIT:-360} s ago (ext4 recently_deleted, see bench/lib.sh)" >&2
    sleep "$_left"
  fi
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 200); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "$1 did not come up" >&2; return 1; }
wait_tcp() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 did not open" >&2; return 1; }
now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$2-$1:.3f}')"; }
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
best() { printf '%s\n' "$@" | sort -g | head -1; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

start_registry() { # [NAME] [STORAGE_DIR] -> REG_PORT
  local name=${1:-main} storage=${2:-$W/registry-${1:-main}}
  REG_PORT=$(free_port)
  cat > "$W/registry-$name.yml" <<YML
version: 0.1
storage: { filesystem: { rootdirectory: $storage }, delete: { enabled: true } }
http: { addr: 127.0.0.1:$REG_PORT }
log: { level: error, accesslog: { disabled: true } }
YML
  docker-registry serve "$W/registry-$name.yml" >"$W/registry-$name.log" 2>&1 & pids+=($!)
  wait_http "http://127.0.0.1:$REG_PORT/v2/"
}

# push_blob FILE REPO -> uploads a blob (monolithic) unless present
push_blob() {
  local f=$1 repo=$2 d loc
  d=sha256:$(sha256sum "$f" | cut -d' ' -f1)
  if curl -fsI "http://127.0.0.1:$REG_PORT/v2/$repo/blobs/$d" >/dev/null; then echo "$d"; return; fi
  loc=$(curl -fsi -X POST "http://127.0.0.1:$REG_PORT/v2/$repo/blobs/uploads/" | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
  case $loc in http*) ;; *) loc="http://127.0.0.1:$REG_PORT$loc";; esac
  case $loc in *\?*) loc="$loc&digest=$d";; *) loc="$loc?digest=$d";; esac
  curl -fs -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$f" "$loc" >/dev/null
  echo "$d"
}

# make_layers NAME SPEC... : builds gzip layers into $CACHE/NAME/ once.
# SPEC is rand:<MiB> (incompressible file) or dir:<path>[+<path>...] (tar of host directories).
make_layers() {
  local name=$1; shift
  local dir=$CACHE/$name
  [ -f "$dir/done" ] && return 0
  rm -rf "$dir"; mkdir -p "$dir"
  local i=0 spec
  for spec in "$@"; do
    i=$((i+1))
    echo "building layer $i of $name ($spec)" >&2
    mkdir -p "$W/l$i"
    case $spec in
      rand:*) head -c "${spec#rand:}M" /dev/urandom > "$W/l$i/data-$i.bin"; tar -C "$W/l$i" -cf "$dir/$i.tar" . ;;
      dir:*) local paths; IFS=+ read -ra paths <<< "${spec#dir:}"
             tar -C / -cf "$dir/$i.tar" "${paths[@]#/}" 2>/dev/null || true ;;
    esac
    sha256sum "$dir/$i.tar" | cut -d' ' -f1 > "$dir/$i.diffid"
    pigz -6 -c "$dir/$i.tar" > "$dir/$i.tar.gz"
    rm -f "$dir/$i.tar"; rm -rf "$W/l$i"
  done
  echo "$i" > "$dir/count"; touch "$dir/done"
}

# push_image NAME REPO [TAG] [EXTRA_LABEL_JSON]: pushes the cached layers of NAME
# as an OCI image REPO:TAG (default latest).
push_image() {
  local name=$1 repo=$2 tag=${3:-latest} extra=${4:-} dir=$CACHE/$1 n layers="" diffids="" d size i
  n=$(cat "$dir/count")
  for i in $(seq "$n"); do
    d=$(push_blob "$dir/$i.tar.gz" "$repo"); size=$(stat -c %s "$dir/$i.tar.gz")
    layers="$layers${layers:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"$d\",\"size\":$size}"
    diffids="$diffids${diffids:+,}\"sha256:$(cat "$dir/$i.diffid")\""
  done
  printf '{"architecture":"amd64","os":"linux","config":{"Labels":{"walt.node.models":"pc-x86-64"%s}},"rootfs":{"type":"layers","diff_ids":[%s]}}' "$extra" "$diffids" > "$W/config.json"
  d=$(push_blob "$W/config.json" "$repo"); size=$(stat -c %s "$W/config.json")
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[%s]}' "$d" "$size" "$layers" > "$W/manifest.json"
  curl -fsS -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' --data-binary "@$W/manifest.json" \
    "http://127.0.0.1:$REG_PORT/v2/$repo/manifests/$tag" >/dev/null
}

# start_walt DATA_DIR [EXTRA_REGISTRY_PORT] -> WALT_PID, WALT_PORT, WALT_CONFIG exported
# Registries: `bench` on $REG_PORT, and `target` on EXTRA_REGISTRY_PORT when given.
start_walt() {
  WALT_PORT=$(free_port)
  cat > "$W/server.conf" <<YML
registries:
-   {label: bench, api: docker-registry-v2, description: Bench registry, host: 127.0.0.1, port: $REG_PORT, protocol: http, auth: none}
YML
  if [ -n "${2:-}" ]; then
    echo "-   {label: target, api: docker-registry-v2, description: Target registry, host: 127.0.0.1, port: $2, protocol: http, auth: none}" >> "$W/server.conf"
  fi
  # WALT_BENCH_PLAINTEXT=1: the API in clear (the path before TLS), for before/after figures.
  local clear=()
  [ -n "${WALT_BENCH_PLAINTEXT:-}" ] && clear=(--plaintext)
  # The node side's socket and exports file stay in the bench's directory.
  RUST_LOG=${WALT_BENCH_RUST_LOG:-info} "$BIN/walt-server" --config "$W/server.conf" --data-dir "$1" --listen "127.0.0.1:$WALT_PORT" "${clear[@]}" \
    --event-socket "${WALT_DHCP_EVENT_SOCKET:-$W/dhcp-event.sock}" --exports-file "${WALT_EXPORTS_FILE:-$W/walt.exports}" \
    2>>"$W/server.log" &
  WALT_PID=$!; pids+=($WALT_PID)
  wait_tcp "$WALT_PORT"
  export WALT_CONFIG=$W/walt.conf
  printf 'walt:\n    server: 127.0.0.1:%s\n    username: bench\n' "$WALT_PORT" > "$WALT_CONFIG"
  [ -z "${WALT_BENCH_PLAINTEXT:-}" ] || printf '    plaintext: true\n' >> "$WALT_CONFIG"
}
stop_walt() { kill "$WALT_PID"; wait "$WALT_PID" 2>/dev/null || true; }
peak_rss_mb() { awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }

podman_env() { # fresh podman store in $1
  mkdir -p "$1"
  cat > "$1/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000","nproc=32768:32768"]
netns = "none"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$1/tmp"
CONF
  cat > "$1/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$1/root"
runroot = "$1/run"
CONF
  export CONTAINERS_CONF=$1/containers.conf CONTAINERS_STORAGE_CONF=$1/storage.conf
}

# The busybox image (bench/shell.sh, bench/build.sh): one layer, in the $CACHE/NAME
# layout of make_layers.
make_busybox() {
  local dir=$CACHE/busybox root=$W/bbroot a
  [ -f "$dir/done" ] && return 0
  rm -rf "$dir" "$root"; mkdir -p "$dir" "$root"/{bin,etc,root,tmp,proc,sys,dev}
  chmod 1777 "$root/tmp"; chmod 700 "$root/root"
  cp /bin/busybox "$root/bin/"
  for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$root/bin/$a"; done
  printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
  printf 'root:x:0:\n' > "$root/etc/group"
  tar -C "$root" --numeric-owner --owner=0 --group=0 -cf "$dir/1.tar" .
  sha256sum "$dir/1.tar" | cut -d' ' -f1 > "$dir/1.diffid"
  pigz -6 -c "$dir/1.tar" > "$dir/1.tar.gz"; rm -f "$dir/1.tar"; rm -rf "$root"
  echo 1 > "$dir/count"; touch "$dir/done"
}

# The Debian image: one layer, a minbase bookworm (cached, keyed by the suite).
make_debian() {
  local dir=$CACHE/debian-bookworm-minbase
  [ -f "$dir/done" ] && return 0
  echo "building the Debian bookworm minbase root filesystem" >&2
  rm -rf "$dir"; mkdir -p "$dir"
  mmdebstrap --quiet --variant=minbase bookworm "$dir/1.tar" >&2
  sha256sum "$dir/1.tar" | cut -d' ' -f1 > "$dir/1.diffid"
  pigz -6 -c "$dir/1.tar" > "$dir/1.tar.gz"; rm -f "$dir/1.tar"
  echo 1 > "$dir/count"; touch "$dir/done"
}

# The Debian OS image of bench/clone-os.sh and bench/rss.sh: one gzip layer, a
# bookworm rootfs of the size users clone (~430 MB, 13 000+ files). Cached,
# keyed by its inputs (suite, variant, extra packages).
DEBIAN_OS_SUITE=bookworm DEBIAN_OS_VARIANT=standard
DEBIAN_OS_PKGS=${WALT_BENCH_OS_PKGS:-}
make_debian_os() { # -> DEBIAN_OS (the cache name)
  local key dir
  key=$(printf '%s %s %s' "$DEBIAN_OS_SUITE" "$DEBIAN_OS_VARIANT" "$DEBIAN_OS_PKGS" | sha256sum | cut -c1-12)
  DEBIAN_OS=debian-os-$key; dir=$CACHE/$DEBIAN_OS
  [ -f "$dir/done" ] && return 0
  echo "building the Debian $DEBIAN_OS_SUITE $DEBIAN_OS_VARIANT root filesystem" >&2
  rm -rf "$dir"; mkdir -p "$dir"
  local inc=()
  [ -z "$DEBIAN_OS_PKGS" ] || inc=(--include="$DEBIAN_OS_PKGS")
  mmdebstrap --quiet --variant="$DEBIAN_OS_VARIANT" "${inc[@]}" "$DEBIAN_OS_SUITE" "$dir/1.tar" >&2
  sha256sum "$dir/1.tar" | cut -d' ' -f1 > "$dir/1.diffid"
  pigz -6 -c "$dir/1.tar" > "$dir/1.tar.gz"
  echo 1 > "$dir/count"; touch "$dir/done"
}

# make_tar_image TAR -> TAR_IMAGE (the cache name): one gzip layer made of an
# existing root filesystem tarball (e.g. images/build.sh's cached
# /var/cache/walt-images/pc-x86-64-<hash>.tar), keyed by its path, size and
# mtime; $CACHE/TAR_IMAGE/1.tar is a symlink to TAR.
make_tar_image() {
  local tar dir
  tar=$(realpath "$1")
  TAR_IMAGE=tar-$(stat -c '%n %s %Y' "$tar" | sha256sum | cut -c1-12); dir=$CACHE/$TAR_IMAGE
  [ -f "$dir/done" ] && return 0
  echo "compressing $tar" >&2
  rm -rf "$dir"; mkdir -p "$dir"
  ln -s "$tar" "$dir/1.tar"
  sha256sum "$tar" | cut -d' ' -f1 > "$dir/1.diffid"
  pigz -6 -c "$tar" > "$dir/1.tar.gz"
  echo 1 > "$dir/count"; touch "$dir/done"
}

# The start of the benches that copy bench/shell.sh's 217 MB tree into a busybox image
# (cp-cpu.sh, cp-timeline.sh): a release build unless WALT_BENCH_NOBUILD, the tree
# ($C), a registry holding bench/busybox. The server is theirs to start.
cp_tree_setup() {
  [ -n "${WALT_BENCH_NOBUILD:-}" ] || (cd "$ROOT" && cargo build --release --bins -q)
  C=$CACHE/cp200
  [ -d "$C/tree200" ] || { echo "no $C/tree200: run WALT_BENCH_CP_ONLY=1 bench/shell.sh first" >&2; exit 1; }
  make_busybox
  start_registry
  push_image busybox bench/busybox
}
