#!/usr/bin/env bash
# Installs the system packages the tests need (Debian 12). Idempotent: does
# nothing when every needed command is already there. Run as root.
set -euo pipefail

log() { echo "install-deps: $*" >&2; }

PACKAGES=(docker-registry busybox-static skopeo umoci apache2-utils openssl expect tmux curl
          ca-certificates pkg-config docker.io)

missing=()
check_cmd() { command -v "$1" >/dev/null 2>&1 || missing+=("$1"); }
for c in docker-registry skopeo umoci htpasswd openssl expect tmux curl pkg-config dockerd docker; do
    check_cmd "$c"
done
[ -x /bin/busybox ] || missing+=("/bin/busybox")
[ -e /etc/ssl/certs/ca-certificates.crt ] || missing+=("ca-certificates")

if [ ${#missing[@]} -eq 0 ]; then
    log "all needed commands are present"
    exit 0
fi

log "missing: ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
    log "error: must run as root to install: ${PACKAGES[*]}"
    exit 1
fi
log "apt-get update"
apt-get update >&2
log "apt-get install ${PACKAGES[*]}"
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${PACKAGES[@]}" >&2
log "done"
