#!/usr/bin/env bash
# Installs the system packages the tests need (Debian 12). Idempotent: does
# nothing when every needed command is already there. Run as root.
set -euo pipefail

log() { echo "install-deps: $*" >&2; }

PACKAGES=(docker-registry busybox-static skopeo umoci apache2-utils openssl expect tmux curl
          ca-certificates pkg-config docker.io qemu-user-static binfmt-support
          libisal-dev tcpdump
          nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils tftpd-hpa tftp-hpa dnsmasq-base
          isc-dhcp-server iproute2
          mmdebstrap arch-test python3
          zsh man-db
          qemu-system-x86 ipxe-qemu openssh-client)

# Foreign-architecture busybox (for arm images), fetched without changing
# the system's apt architectures.
ARM_CACHE=${WALT_ARM_CACHE:-/var/cache/walt-e2e}
fetch_arm_busybox() {
    [ -x "$ARM_CACHE/busybox-arm64" ] && [ -x "$ARM_CACHE/busybox-armhf" ] && return 0
    log "fetching busybox-static for arm64 and armhf into $ARM_CACHE"
    local w; w=$(mktemp -d)
    local o=(-o APT::Architectures::=amd64 -o APT::Architectures::=arm64 -o APT::Architectures::=armhf
             -o "Dir::State::Lists=$w/lists" -o "Dir::Cache=$w/cache" -o APT::Sandbox::User=root)
    mkdir -p "$w/lists/partial" "$w/cache/archives/partial" "$ARM_CACHE"
    # A mirror caught mid-sync fails some index (e.g. security): what the
    # download needs is the main one, so go on and let the download decide.
    apt-get "${o[@]}" update >&2 || log "warning: apt-get update reported errors (see above)"
    (cd "$w" && apt-get "${o[@]}" download busybox-static:arm64 busybox-static:armhf >&2)
    for a in arm64 armhf; do
        dpkg-deb -x "$w"/busybox-static_*_"$a".deb "$w/root-$a"
        install -m 755 "$w/root-$a/bin/busybox" "$ARM_CACHE/busybox-$a"
    done
    rm -rf "$w"
}

missing=()
check_cmd() { command -v "$1" >/dev/null 2>&1 || missing+=("$1"); }
# tcpdump: the TLS test captures the loopback traffic of the walt API.
for c in docker-registry skopeo umoci htpasswd openssl expect tmux curl pkg-config dockerd docker tcpdump; do
    check_cmd "$c"
done
[ -x /bin/busybox ] || missing+=("/bin/busybox")
[ -e /etc/ssl/certs/ca-certificates.crt ] || missing+=("ca-certificates")
# ISA-L's inflate, found through pkg-config by the default build (the `isal`
# feature of walt-store; --no-default-features builds with zlib-rs only).
pkg-config --exists libisal 2>/dev/null || missing+=("libisal-dev")
for c in qemu-aarch64-static qemu-arm-static update-binfmts; do
    check_cmd "$c"
done
# The node side (issue 13): network namespaces and veths (ip), the DHCP
# servers running walt's hook (dnsmasq, dhcpd), TFTP (in.tftpd, tftp) and
# NFS (ganesha.nfsd with its VFS backend, rpcbind, libnfs clients).
for c in ip dnsmasq dhcpd in.tftpd tftp ganesha.nfsd rpcbind nfs-ls nfs-cat; do
    check_cmd "$c"
done
# The real default images (images/build.sh: the root filesystem by
# mmdebstrap + mmtarfilter, python3 for its ports and timings; arch-test,
# which mmdebstrap only recommends, for the foreign architectures: i386 and
# the arm ones).
for c in mmdebstrap mmtarfilter arch-test python3; do
    check_cmd "$c"
done
# walt's completion scripts and man pages (issue 15 item 11): zsh -n, man -l.
for c in zsh man; do
    check_cmd "$c"
done
ls /usr/lib/*/ganesha/libfsalvfs.so >/dev/null 2>&1 || missing+=("nfs-ganesha-vfs")
# Virtual nodes (issue 17): qemu PCs booting through qemu's PXE ROM (iPXE).
check_cmd qemu-system-x86_64
# The vnode test logs in over ssh with the server's key.
check_cmd ssh
check_cmd ssh-keygen
[ -e /usr/lib/ipxe/qemu/efi-virtio.rom ] || [ -e /usr/lib/ipxe/qemu/pxe-virtio.rom ] || missing+=("ipxe-qemu")

enable_binfmt() {
    # Registers qemu-user for arm binaries (the F flag: no interpreter
    # needed inside images). Idempotent.
    for a in aarch64 arm; do
        [ -e /proc/sys/fs/binfmt_misc/qemu-$a ] || update-binfmts --enable qemu-$a >&2 || true
    done
}

if [ ${#missing[@]} -eq 0 ]; then
    log "all needed commands are present"
    fetch_arm_busybox
    enable_binfmt
    exit 0
fi

log "missing: ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
    log "error: must run as root to install: ${PACKAGES[*]}"
    exit 1
fi
log "apt-get update"
# A mirror caught mid-sync can fail one index; the install below says
# whether what it needs was there.
apt-get update >&2 || log "warning: apt-get update reported errors (see above)"
log "apt-get install ${PACKAGES[*]}"
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${PACKAGES[@]}" >&2
fetch_arm_busybox
enable_binfmt
log "done"
