#!/usr/bin/env bash
# Builds the default walt images (waltplatform/<model>-default:latest) and,
# with --push, publishes them to a registry.
# Usage: images/build.sh [--push REGISTRY] [MODEL...]
#   REGISTRY  host:port of a docker-registry-v2 registry reached over http
#             (e.g. 127.0.0.1:5000), or a registry label already configured in
#             $WALT_IMAGES_SERVER_CONF (a walt-server config file).
#   MODEL     node model(s); default: every model with a recipe
#             (images/<model>-default/rootfs.sh). Today: pc-x86-64.
# Steps per model:
#   1. rootfs: images/<model>-default/rootfs.sh writes the root filesystem tarball,
#      cached as /var/cache/walt-images/<model>-<hash of the recipe inputs>.tar
#      (override the directory with WALT_IMAGES_CACHE); rebuilt only when an input
#      changes (rootfs.sh, recipe.conf, packages, files/).
#   2. a private walt-server (temporary data dir, walt user waltplatform) builds
#      the image with `walt image build --from-dir` (Dockerfile + start.ipxe +
#      rootfs.tar); then checks that `walt image show` lists it with its model and
#      that it has /boot/<model>/start.ipxe (the recipe's), a kernel and an initrd;
#   3. with --push: `walt image publish` to that registry.
# Needs root, mmdebstrap, the release binaries (built if missing), or the walt and
# walt-server binaries of the directory $WALT_BIN (not built: the tests pass target/debug).
# Without --push the server's data dir is kept and printed; with --push it is removed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGES=$ROOT/images
BIN=${WALT_BIN:-$ROOT/target/release}
CACHE=${WALT_IMAGES_CACHE:-/var/cache/walt-images}

usage() { echo "usage: $0 [--push REGISTRY] [MODEL...]" >&2; exit 2; }
push=""
models=()
while [ $# -gt 0 ]; do
  case $1 in
    --push) [ $# -ge 2 ] || usage; push=$2; shift 2 ;;
    --push=*) push=${1#--push=}; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) usage ;;
    *) models+=("$1"); shift ;;
  esac
done
if [ ${#models[@]} -eq 0 ]; then
  for r in "$IMAGES"/*-default/rootfs.sh; do
    d=$(basename "$(dirname "$r")"); models+=("${d%-default}")
  done
fi
for m in "${models[@]}"; do
  case $m in */*|.*|"") echo "Invalid model name '$m'." >&2; exit 2 ;; esac
  [ -x "$IMAGES/$m-default/rootfs.sh" ] || { echo "No recipe for node model '$m' (expected $IMAGES/$m-default/rootfs.sh)." >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "images/build.sh must run as root (mmdebstrap --mode=root)." >&2; exit 1; }

# the registry, checked before anything is built
label="" reg_host="" reg_port=""
if [ -n "$push" ]; then
  if [[ $push == *:* ]]; then
    label=target reg_host=${push%:*} reg_port=${push##*:}
    case $reg_port in ''|*[!0-9]*) echo "Invalid registry '$push': expected host:port." >&2; exit 2 ;; esac
    case $reg_host in ''|*[!A-Za-z0-9.:_-]*) echo "Invalid registry '$push': expected host:port." >&2; exit 2 ;; esac
  else
    [ -n "${WALT_IMAGES_SERVER_CONF:-}" ] || { echo "Registry '$push' is not host:port; set WALT_IMAGES_SERVER_CONF to a walt-server config that defines this label." >&2; exit 2; }
    [ -r "$WALT_IMAGES_SERVER_CONF" ] || { echo "Cannot read WALT_IMAGES_SERVER_CONF ($WALT_IMAGES_SERVER_CONF)." >&2; exit 2; }
    label=$push
  fi
fi

now() { date +%s.%N; }
phase_start=0
phase() { phase_start=$(now); echo "== $*" >&2; }
phase_end() { python3 -c "print(f'   done in {$(now)-$phase_start:.1f} s')" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_tcp() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 did not open" >&2; return 1; }

# The hash of the inputs of a rootfs: every file of the recipe but the ones that
# only the image build uses (Dockerfile, start.ipxe), names and contents.
recipe_hash() {
  local dir=$1
  (cd "$dir" && find . -type f ! -name Dockerfile ! -name '*.ipxe' ! -name '*.md' -print0 | LC_ALL=C sort -z |
     while IFS= read -r -d '' f; do printf '%s\0%s\0' "$f" "$(stat -c %a "$f")"; sha256sum < "$f"; done) |
    sha256sum | cut -c1-16
}

# 1. root filesystems
declare -A tarball
mkdir -p "$CACHE"
for m in "${models[@]}"; do
  dir=$IMAGES/$m-default
  t=$CACHE/$m-$(recipe_hash "$dir").tar
  if [ -f "$t" ]; then
    echo "== $m: root filesystem up to date ($t, $(du -h "$t" | cut -f1))" >&2
  else
    phase "$m: building the root filesystem (mmdebstrap)"
    rm -rf "$t.part"
    "$dir/rootfs.sh" "$t.part"
    [ -f "$t.part" ] || { echo "$dir/rootfs.sh did not write a tar archive ($t.part)." >&2; exit 1; }
    mv "$t.part" "$t"
    phase_end
    # older root filesystems of this model (other recipe hashes) are of no more use
    find "$CACHE" -maxdepth 1 -name "$m-????????????????.tar" ! -path "$t" -delete
    echo "   $t: $(du -h "$t" | cut -f1)" >&2
  fi
  tarball[$m]=$t
done

# 2. a private walt server
if [ -n "${WALT_BIN:-}" ]; then
  [ -x "$BIN/walt-server" ] && [ -x "$BIN/walt" ] || { echo "No walt and walt-server binaries in WALT_BIN ($BIN)." >&2; exit 2; }
elif [ ! -x "$BIN/walt-server" ] || [ ! -x "$BIN/walt" ]; then
  phase "building the release binaries"
  (cd "$ROOT" && cargo build --release --locked --bins -p walt-server -p walt-cli)
  phase_end
fi
W=$(mktemp -d /tmp/walt-images.XXXXXX)
server_pid=""
keep_data=""
cleanup() {
  local rc=$?
  if [ "$rc" != 0 ] && [ -s "$W/server.log" ]; then
    echo "images/build.sh failed; the last lines of the walt-server log:" >&2; tail -n 5 "$W/server.log" >&2
  fi
  [ -z "$server_pid" ] || { kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; }
  if [ -n "$keep_data" ]; then rm -rf "$W/ctx"; else rm -rf "$W"; fi
}
trap cleanup EXIT

if [ -z "$push" ]; then
  printf 'registries: []\n' > "$W/server.conf"
elif [ "$label" = target ]; then
  cat > "$W/server.conf" <<YML
registries:
-   {label: target, api: docker-registry-v2, description: Target registry, host: $reg_host, port: $reg_port, protocol: http, auth: none}
YML
else
  cp "$WALT_IMAGES_SERVER_CONF" "$W/server.conf"
fi
port=$(free_port)
"$BIN/walt-server" --config "$W/server.conf" --data-dir "$W/data" --listen "127.0.0.1:$port" \
  --event-socket "$W/dhcp-event.sock" --exports-file "$W/walt.exports" 2>"$W/server.log" &
server_pid=$!
wait_tcp "$port" || { cat "$W/server.log" >&2; exit 1; }
export WALT_CONFIG=$W/walt.conf
printf 'walt:\n    server: 127.0.0.1:%s\n    username: waltplatform\n' "$port" > "$WALT_CONFIG"
walt() { "$BIN/walt" "$@"; }

for m in "${models[@]}"; do
  name=$m-default:latest
  # 3. the image, from the recipe's Dockerfile and the cached rootfs
  phase "$m: walt image build --from-dir ($name)"
  rm -rf "$W/ctx"; mkdir -p "$W/ctx"
  cp "$IMAGES/$m-default/Dockerfile" "$IMAGES/$m-default/start.ipxe" "$W/ctx/"
  ln "${tarball[$m]}" "$W/ctx/rootfs.tar" 2>/dev/null || cp "${tarball[$m]}" "$W/ctx/rootfs.tar"
  walt image build --from-dir "$W/ctx" "$name" </dev/null
  phase_end
  walt image show | awk -v n="$m-default" -v m="$m" '$1 == n && index($NF, m) { found = 1 } END { exit !found }' ||
    { echo "walt image show does not list $m-default with node model $m." >&2; exit 1; }
  # the boot files: the iPXE script and a kernel + initrd it points to
  walt image cp "$name:/boot/$m/start.ipxe" "$W/start.ipxe"
  cmp -s "$W/start.ipxe" "$IMAGES/$m-default/start.ipxe" || { echo "$name: /boot/$m/start.ipxe differs from the recipe's." >&2; exit 1; }
  for f in vmlinuz initrd.img; do
    walt image cp "$name:/boot/$m/$f" "$W/$f"
    if [ -L "$W/$f" ]; then # a relative link in the image: check its target
      target=$(readlink "$W/$f"); rm -f "$W/$f"
      case $target in /*) ;; *) target=/boot/$m/$target ;; esac
      echo "   /boot/$m/$f -> $target" >&2
      walt image cp "$name:$target" "$W/$f"
    fi
    [ -s "$W/$f" ] || { echo "$name: /boot/$m/$f is missing or empty." >&2; exit 1; }
    echo "   /boot/$m/$f: $(du -h "$W/$f" | cut -f1)" >&2
  done
  rm -f "$W/vmlinuz" "$W/initrd.img" "$W/start.ipxe"

  if [ -n "$push" ]; then
    phase "$m: walt image publish --registry $label ($name -> waltplatform/$name)"
    walt image publish --registry "$label" "$name" </dev/null
    phase_end
    echo "   published: $push/waltplatform/$name" >&2
  fi
done
walt image show >&2
if [ -z "$push" ]; then
  keep_data=1
  echo "Images built in the walt data dir $W/data (server config $W/server.conf); nothing was published." >&2
fi
