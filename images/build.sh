#!/usr/bin/env bash
# Builds the default walt images and, with --push, publishes them to a registry.
# Usage: images/build.sh [--push REGISTRY] [MODEL|IMAGE...]
#   REGISTRY  host:port of a docker-registry-v2 registry reached over http
#             (e.g. 127.0.0.1:5000), or a registry label already configured in
#             $WALT_IMAGES_SERVER_CONF (a walt-server config file; single-platform
#             images only: the multi-platform index is assembled over plain http).
#   MODEL     a node model (pc-x86-64, rpi-4-b...): the image that serves it;
#   IMAGE     an image directory (pc-x86-64-default, rpi-default);
#             default: every image (images/*-default/).
# Images: images/<image>/ with a recipe.conf (one platform), or with one sub-directory
# per platform, each with its recipe.conf and Dockerfile (rpi-default: arm64, armhf).
# Steps per platform:
#   1. rootfs: the recipe's rootfs.sh if it has one, else images/common/debian-rootfs.sh,
#      writes the root filesystem tarball, cached as
#      /var/cache/walt-images/<image without -default>[-<platform>]-<hash>.tar
#      (WALT_IMAGES_CACHE moves it); the hash covers the recipe, images/common/ and, for
#      a platform, its image directory (not Dockerfiles, *.ipxe, *.md): rebuilt only when
#      one of them changes;
#   2. a private walt-server (walt user waltplatform) builds it with
#      `walt image build --from-dir` (Dockerfile, rootfs.tar and, for iPXE models,
#      boot/<model>/start.ipxe from images/common; all but rootfs.tar with the mtime
#      $SOURCE_DATE_EPOCH, default 2000-01-01, so that the layers are the same from run
#      to run and a publish sends no blob the registry has);
#      then checks that `walt image show` lists it with its models and that each model
#      has the files BOOT_CHECK of recipe.conf names in /boot/<model>/;
#   3. with --push: `walt image publish`. A single-platform image is published as
#      waltplatform/<model>-default:latest; a multi-platform one as
#      waltplatform/<image>:<platform> per platform, then one index referring to them
#      is put as waltplatform/<image>:latest and waltplatform/<model>-default:latest
#      for each model it serves (registry API, curl).
# Needs root, mmdebstrap, u-boot-tools and qemu-user-static + binfmt (arm images), curl
# and python3 (index), the release binaries (built if missing), or the walt and
# walt-server binaries of the directory $WALT_BIN (not built: the tests pass target/debug).
# Without --push the server's data dir is kept and printed; with --push it is removed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGES=$ROOT/images
COMMON=$IMAGES/common
BIN=${WALT_BIN:-$ROOT/target/release}
CACHE=${WALT_IMAGES_CACHE:-/var/cache/walt-images}
# mtime of the build context's files (not of rootfs.tar, whose entries keep theirs)
EPOCH=${SOURCE_DATE_EPOCH:-946684800}

usage() { echo "usage: $0 [--push REGISTRY] [MODEL|IMAGE...]" >&2; exit 2; }
push=""
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --push) [ $# -ge 2 ] || usage; push=$2; shift 2 ;;
    --push=*) push=${1#--push=}; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) usage ;;
    *) args+=("$1"); shift ;;
  esac
done

# The recipes of an image: itself (one platform) or its platform sub-directories.
recipes_of() {
  local d=$IMAGES/$1
  if [ -f "$d/recipe.conf" ]; then echo "$d"; return; fi
  for r in "$d"/*/recipe.conf; do [ -f "$r" ] && dirname "$r"; done
}
conf() { (. "$COMMON/debian.conf"; . "$1/recipe.conf"; eval "printf '%s' \"\${$2:-}\""); }
models_of() { for r in $(recipes_of "$1"); do conf "$r" MODELS | tr ',' '\n'; echo; done | awk 'NF && !seen[$0]++' | paste -sd, -; }
all_images=()
for d in "$IMAGES"/*-default/; do
  d=$(basename "$d"); [ -n "$(recipes_of "$d")" ] && all_images+=("$d")
done
images=()
add_image() { local i; for i in "${images[@]}"; do [ "$i" = "$1" ] && return; done; images+=("$1"); }
for a in "${args[@]}"; do
  case $a in */*|.*|"") echo "Invalid model or image name '$a'." >&2; exit 2 ;; esac
  if [ -n "$(recipes_of "$a" 2>/dev/null)" ] && [ -d "$IMAGES/$a" ]; then add_image "$a"; continue; fi
  found=""
  for i in "${all_images[@]}"; do
    case ",$(models_of "$i")," in *",$a,"*) add_image "$i"; found=1 ;; esac
  done
  [ -n "$found" ] || { echo "No recipe for node model '$a' (no images/*-default/ serves it; images: ${all_images[*]})." >&2; exit 2; }
done
[ ${#args[@]} -gt 0 ] || images=("${all_images[@]}")
# each Dockerfile labels the models its recipe lays /boot/<model>/ out for
for i in "${images[@]}"; do
  for dir in $(recipes_of "$i"); do
    l=$(grep -o 'walt\.node\.models=[^ ]*' "$dir/Dockerfile" | head -n1); l=${l#*=}
    [ "$l" = "$(conf "$dir" MODELS)" ] || { echo "$dir/Dockerfile labels walt.node.models=$l but recipe.conf has MODELS=$(conf "$dir" MODELS)." >&2; exit 2; }
  done
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
    for i in "${images[@]}"; do
      [ -f "$IMAGES/$i/recipe.conf" ] || { echo "$i is a multi-platform image: its index is assembled over plain http, so --push needs host:port, not a registry label." >&2; exit 2; }
    done
    label=$push
  fi
fi

now() { date +%s.%N; }
phase_start=0
phase() { phase_start=$(now); echo "== $*" >&2; }
phase_end() { python3 -c "print(f'   done in {$(now)-$phase_start:.1f} s')" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_tcp() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 did not open" >&2; return 1; }

# The hash of the inputs of a rootfs: the files (names, modes, contents) of the recipe,
# of images/common and, for a platform recipe, of its image directory, but the ones
# only the image build uses (Dockerfile, *.ipxe) and documentation.
recipe_hash() {
  local dir=$1 extra=()
  [ -f "$(dirname "$dir")/recipe.conf" ] || [ "$(dirname "$dir")" = "$IMAGES" ] || extra=("$(dirname "$dir")")
  { for d in "$dir" "$COMMON" "${extra[@]}"; do
      local depth=(); [ "$d" = "$dir" ] || [ "$d" = "$COMMON" ] || depth=(-maxdepth 1)
      echo "== $(basename "$d")"
      (cd "$d" && find . "${depth[@]}" -type f ! -name Dockerfile ! -name '*.ipxe' ! -name '*.md' -print0 | LC_ALL=C sort -z |
         while IFS= read -r -d '' f; do printf '%s\0%s\0' "$f" "$(stat -c %a "$f")"; sha256sum < "$f"; done)
    done
  } | sha256sum | cut -c1-16
}
# "pc-x86-64" for images/pc-x86-64-default, "rpi-arm64" for images/rpi-default/arm64
cache_name() {
  local dir=${1#"$IMAGES"/}
  case $dir in */*) echo "${dir%%-default/*}-${dir#*/}" ;; *) echo "${dir%-default}" ;; esac
}

# 1. root filesystems
declare -A tarball
mkdir -p "$CACHE"
for i in "${images[@]}"; do
  for dir in $(recipes_of "$i"); do
    n=$(cache_name "$dir")
    t=$CACHE/$n-$(recipe_hash "$dir").tar
    if [ -f "$t" ]; then
      echo "== $n: root filesystem up to date ($t, $(du -h "$t" | cut -f1))" >&2
    else
      phase "$n: building the root filesystem (mmdebstrap, $(conf "$dir" ARCH))"
      rm -rf "$t.part"
      if [ -x "$dir/rootfs.sh" ]; then "$dir/rootfs.sh" "$t.part"; else "$COMMON/debian-rootfs.sh" "$dir" "$t.part"; fi
      [ -f "$t.part" ] || { echo "The root filesystem build of $dir did not write a tar archive ($t.part)." >&2; exit 1; }
      mv "$t.part" "$t"
      phase_end
      # older root filesystems of this recipe (other hashes) are of no more use
      find "$CACHE" -maxdepth 1 -name "$n-????????????????.tar" ! -path "$t" -delete
      echo "   $t: $(du -h "$t" | cut -f1)" >&2
    fi
    tarball[$dir]=$t
  done
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

# Checks that /boot/<model>/<f> of image $1 is there and not empty, for each f of
# BOOT_CHECK (a relative link is followed); start.ipxe must be images/common's.
check_boot_files() {
  local name=$1 dir=$2 m f target
  for m in $(conf "$dir" MODELS | tr ',' ' '); do
    for f in $(conf "$dir" BOOT_CHECK); do
      rm -f "$W/bootfile"
      walt image cp "$name:/boot/$m/$f" "$W/bootfile"
      if [ -L "$W/bootfile" ]; then
        target=$(readlink "$W/bootfile"); rm -f "$W/bootfile"
        case $target in /*) ;; *) target=/boot/$m/$target ;; esac
        walt image cp "$name:$target" "$W/bootfile"
        target=" -> $target"
      else
        target=""
      fi
      [ -s "$W/bootfile" ] || { echo "$name: /boot/$m/$f is missing or empty." >&2; exit 1; }
      [ "$f" != start.ipxe ] || cmp -s "$W/bootfile" "$COMMON/start.ipxe" ||
        { echo "$name: /boot/$m/start.ipxe differs from images/common/start.ipxe." >&2; exit 1; }
      echo "   /boot/$m/$f$target: $(du -h "$W/bootfile" | cut -f1)" >&2
    done
  done
  rm -f "$W/bootfile"
}

# Registry API (plain http, anonymous) for the multi-platform index.
REG=http://$reg_host:$reg_port/v2
ACCEPT="application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json,application/vnd.oci.image.index.v1+json,application/vnd.docker.distribution.manifest.list.v2+json"
curl_reg() { curl -fsS --retry 2 "$@"; }
# put_index IMAGE REPO...: the index of waltplatform/IMAGE's platform tags, put as
# REPO:latest for each REPO (blobs mounted from waltplatform/IMAGE, manifests put by digest).
put_index() {
  local image=$1; shift
  local src=waltplatform/$image plat repo d code
  export REG SRC=$src
  rm -rf "$W/idx"; mkdir -p "$W/idx"
  for plat in "${platform_tags[@]}"; do
    curl_reg -H "Accept: $ACCEPT" -D "$W/idx/$plat.headers" -o "$W/idx/$plat.manifest" "$REG/$src/manifests/$plat"
  done
  python3 - "$W/idx" "${platform_tags[@]}" <<'PY' || exit 1
import hashlib, json, sys, os, urllib.request
d, tags = sys.argv[1], sys.argv[2:]
reg = os.environ["REG"]; src = os.environ["SRC"]
manifests, blobs = [], []
for t in tags:
    raw = open(f"{d}/{t}.manifest", "rb").read()
    m = json.loads(raw)
    mt = m.get("mediaType") or "application/vnd.oci.image.manifest.v1+json"
    req = urllib.request.Request(f"{reg}/{src}/blobs/{m['config']['digest']}")
    cfg = json.load(urllib.request.urlopen(req))
    p = {"architecture": cfg["architecture"], "os": cfg["os"]}
    if cfg.get("variant"):
        p["variant"] = cfg["variant"]
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    manifests.append({"mediaType": mt, "digest": digest, "size": len(raw), "platform": p})
    blobs += [m["config"]["digest"]] + [l["digest"] for l in m["layers"]]
    open(f"{d}/{t}.type", "w").write(mt)
    open(f"{d}/{t}.digest", "w").write(digest)
    print(f"   {t}: {p['os']}/{p['architecture']}{'/' + p['variant'] if 'variant' in p else ''} {digest}", file=sys.stderr)
index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}
open(f"{d}/index.json", "w").write(json.dumps(index, indent=1))
open(f"{d}/blobs", "w").write("\n".join(dict.fromkeys(blobs)) + "\n")
PY
  for repo in "$@"; do
    if [ "$repo" != "$src" ]; then
      while read -r d; do
        [ -n "$d" ] || continue
        # already there, or mounted from the platform images' repository (201)
        curl -fsS -o /dev/null -I "$REG/$repo/blobs/$d" 2>/dev/null && continue
        code=$(curl -sS -o /dev/null -w '%{http_code}' -X POST "$REG/$repo/blobs/uploads/?mount=$d&from=$src")
        [ "$code" = 201 ] || { echo "Registry $push: cannot mount blob $d of $src into $repo (HTTP $code)." >&2; exit 1; }
      done < "$W/idx/blobs"
      for plat in "${platform_tags[@]}"; do
        curl_reg -o /dev/null -X PUT -H "Content-Type: $(cat "$W/idx/$plat.type")" --data-binary "@$W/idx/$plat.manifest" \
          "$REG/$repo/manifests/$(cat "$W/idx/$plat.digest")"
      done
    fi
    curl_reg -o /dev/null -X PUT -H "Content-Type: application/vnd.oci.image.index.v1+json" \
      --data-binary "@$W/idx/index.json" "$REG/$repo/manifests/latest"
    echo "   published: $push/$repo:latest (index)" >&2
  done
}

for i in "${images[@]}"; do
  recipes=($(recipes_of "$i"))
  multi=""; [ -f "$IMAGES/$i/recipe.conf" ] || multi=1
  platform_tags=()
  for dir in "${recipes[@]}"; do
    if [ -n "$multi" ]; then
      tag=$(basename "$dir"); name=$i:$tag; platform_tags+=("$tag")
    else
      name=$i:latest
    fi
    # 3. the image, from the recipe's Dockerfile and the cached rootfs
    phase "$i: walt image build --from-dir ($name)"
    rm -rf "$W/ctx"; mkdir -p "$W/ctx/boot"
    cp "$dir/Dockerfile" "$W/ctx/"
    case " $(conf "$dir" BOOT_CHECK) " in *" start.ipxe "*)
      for m in $(conf "$dir" MODELS | tr ',' ' '); do mkdir -p "$W/ctx/boot/$m"; cp "$COMMON/start.ipxe" "$W/ctx/boot/$m/"; done ;;
    esac
    # fixed mtimes: COPY keeps them, so that the layer is the same from run to run
    find "$W/ctx" -exec touch -h -d "@$EPOCH" {} +
    ln "${tarball[$dir]}" "$W/ctx/rootfs.tar" 2>/dev/null || cp "${tarball[$dir]}" "$W/ctx/rootfs.tar"
    walt image build --from-dir "$W/ctx" "$name" </dev/null
    phase_end
    walt image show >"$W/show"
    grep -F "$name" "$W/show" >&2 || grep -F "${name%:latest} " "$W/show" >&2 ||
      { echo "walt image show does not list $name." >&2; cat "$W/show" >&2; exit 1; }
    check_boot_files "$name" "$dir"

    if [ -n "$push" ]; then
      phase "$i: walt image publish --registry $label ($name -> waltplatform/$name)"
      walt image publish --registry "$label" "$name" </dev/null
      phase_end
      echo "   published: $push/waltplatform/$name" >&2
    fi
  done
  if [ -n "$push" ] && [ -n "$multi" ]; then
    phase "$i: one index of ${platform_tags[*]} for $(models_of "$i")"
    repos=("waltplatform/$i")
    for m in $(models_of "$i" | tr ',' ' '); do repos+=("waltplatform/$m-default"); done
    put_index "$i" "${repos[@]}"
    phase_end
  fi
done
walt image show >&2
if [ -z "$push" ]; then
  keep_data=1
  echo "Images built in the walt data dir $W/data (server config $W/server.conf); nothing was published." >&2
fi
