#!/usr/bin/env bash
# Builds the self-checking guest's initramfs (a static /init from init.c) and prints its path.
# Cached by the hash of init.c under RMIG_QEMU_CACHE (default /var/cache/rmig-qemu).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${RMIG_QEMU_CACHE:-/var/cache/rmig-qemu}
key=$(sha256sum "$here/init.c" "$0" | sha256sum | cut -c1-16)
out="$cache/guest-$key.cpio.gz"
if [ ! -s "$out" ]; then
  if ! command -v cpio >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
      --no-install-recommends cpio >/dev/null
  fi
  mkdir -p "$cache"
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  gcc -static -O2 -Wall -Wextra -Werror -o "$stage/init" "$here/init.c"
  (cd "$stage" && echo init | cpio -o -H newc --quiet | gzip -1 > "$out.part")
  mv "$out.part" "$out"
fi
echo "$out"
