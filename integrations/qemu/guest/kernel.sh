#!/usr/bin/env bash
# Prints the path of the Debian kernel the self-checking guest boots (the newest
# /boot/vmlinuz-*-amd64), installing linux-image-amd64 first if there is none.
set -euo pipefail
kernel=$(ls /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$kernel" ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends linux-image-amd64 >/dev/null
  kernel=$(ls /boot/vmlinuz-*-amd64 | sort -V | tail -1)
fi
echo "$kernel"
