#!/usr/bin/env bash
# Builds QEMU 10.0.2 (x86_64-softmmu) with rmig's patch series and librmig, into a cache outside
# the clone, and prints the path of the qemu-system-x86_64 binary on stdout.
#
# Why a cache outside the clone: a QEMU build takes minutes on two cores; CI on the same machine
# should pay that only when the patches or librmig change. A stamp keyed by the hash of the patch
# series and of librmig's sources makes a second run with nothing changed instant.
#
# Installs what is missing (Debian 12, as root or with sudo): bookworm-backports (meson >= 1.5 and
# python3-pycotap, which QEMU 10 needs, and the QEMU 10.0.2 source), ninja-build, the libraries.
#
# Environment: RMIG_QEMU_CACHE (default /var/cache/rmig-qemu), RMIG_QEMU_JOBS (default 2).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${RMIG_QEMU_CACHE:-/var/cache/rmig-qemu}
jobs=${RMIG_QEMU_JOBS:-2}
version=10.0.2
tarball="qemu_${version}+ds.orig.tar.xz"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
log() { echo "rmig-qemu: $*" >&2; }

have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# ensure_backports, qemu_release.
. "$root/scripts/apt-backports.sh"

ensure_packages() {
  local need=() p
  for p in ninja-build libglib2.0-dev libpixman-1-dev libslirp-dev libfdt-dev flex bison \
           python3-venv xz-utils gcc make pkg-config rsync curl ipxe-qemu seabios; do
    have_pkg "$p" || need+=("$p")
  done
  # The firmware the binary loads from /usr/share/qemu (linuxboot_dma.bin, ...), from the release
  # tests/vm takes qemu-system-x86 from (it depends on this package's exact version).
  local rel; rel=$(qemu_release)
  have_pkg qemu-system-data || need+=("qemu-system-data${rel:+/$rel}")
  local meson_ok=0
  if have_pkg meson && dpkg --compare-versions "$(dpkg-query -W -f='${Version}' meson)" ge 1.5; then
    meson_ok=1
  fi
  if [ ${#need[@]} -gt 0 ] || [ $meson_ok = 0 ] || ! have_pkg python3-pycotap; then
    ensure_backports
    log "installing ${need[*]} meson python3-pycotap (backports)"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      "${need[@]}" meson/bookworm-backports python3-pycotap/bookworm-backports >/dev/null
  fi
}

# The upstream tarball of Debian's QEMU 10.0.2 (the .dsc may answer 404: the tarball is enough).
ensure_source() {
  [ -s "$cache/$tarball" ] && return
  ensure_backports
  log "downloading $tarball"
  local line uri sum
  line=$(cd /tmp && apt-get source --print-uris -qq "qemu/bookworm-backports" 2>/dev/null |
         awk -v t="$tarball" '$2 == t' | head -1) || true
  [ -n "$line" ] || { log "apt cannot locate the QEMU $version source"; exit 1; }
  uri=$(echo "$line" | awk '{print $1}' | tr -d "'")
  sum=$(echo "$line" | awk '{print $4}' | sed 's/^SHA256://')
  $SUDO mkdir -p "$cache"
  timeout 600 curl -fsSL --retry 3 -o "$cache/$tarball.part" "$uri"
  echo "$sum  $cache/$tarball.part" | sha256sum -c --quiet -
  mv "$cache/$tarball.part" "$cache/$tarball"
}

hash_of() { (cd "$root" && find "$@" -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16); }

ensure_packages
ensure_source
# librmig is the engine and every crate it links (the transport's lanes, NUMA placement).
key="$(hash_of integrations/qemu/patches)-$(hash_of engine/src engine/ffi/src engine/ffi/Cargo.toml \
  engine/Cargo.toml transport/src transport/Cargo.toml numa/src numa/Cargo.toml Cargo.toml \
  Cargo.lock include/rmig.h)"
tree="$cache/qemu-$version"
bin="$tree/build/qemu-system-x86_64"
stamp="$tree/built-$key"
if [ -x "$bin" ] && [ -e "$stamp" ]; then
  echo "$bin"; exit 0
fi

# One build tree, kept: a fresh unpack with the patches applied is synced into it by content
# (rsync -c), so only the files a changed patch touches get new mtimes and ninja rebuilds just those.
$SUDO mkdir -p "$cache"
stage="$tree.stage"
rm -rf "$stage"; mkdir -p "$stage" "$tree/src"
log "unpacking $tarball and applying integrations/qemu/patches"
tar -xJf "$cache/$tarball" -C "$stage" --strip-components=1
# The Debian tarball lacks the edk2 blobs; firmware comes from the installed packages.
sed -i "s/^\( *\)unpack_edk2_blobs = bzip2.found()/\1unpack_edk2_blobs = false/" "$stage/meson.build"
for p in "$here"/patches/*.patch; do
  [ -e "$p" ] || continue
  log "applying $(basename "$p")"
  patch -d "$stage" -p1 -s --forward --no-backup-if-mismatch < "$p"
done
rsync -rlc --delete --exclude=/.git "$stage/" "$tree/src/"
rm -rf "$stage"

# librmig: built by cargo in the clone; QEMU links the shared library copied next to its build.
log "building librmig (cargo build --release -p rmig-ffi)"
(cd "$root" && nice -n 10 cargo build --release -q -p rmig-ffi -j "$jobs") >&2
mkdir -p "$tree/rmig/include" "$tree/rmig/lib"
install -C -m 0644 "$root/include/rmig.h" "$tree/rmig/include/rmig.h"
install -C -m 0755 "$root/target/release/librmig.so" "$tree/rmig/lib/librmig.so"

if [ ! -e "$tree/build/build.ninja" ]; then
  mkdir -p "$tree/build"
  log "configuring"
  (cd "$tree/build" && ../src/configure --python=/usr/bin/python3 --target-list=x86_64-softmmu \
    --disable-download --disable-docs --disable-tools --disable-guest-agent --disable-gtk \
    --disable-sdl --disable-opengl --disable-spice --disable-vnc --disable-xen --disable-werror \
    --disable-install-blobs --firmwarepath=/usr/share/qemu:/usr/share/seabios \
    --extra-cflags="-I$tree/rmig/include" \
    --extra-ldflags="-L$tree/rmig/lib -Wl,-rpath,$tree/rmig/lib") >"$tree/configure.log" 2>&1 ||
    { tail -30 "$tree/configure.log" >&2; exit 1; }
fi
log "building qemu-system-x86_64 and QEMU's migration qtest (nice -n 10 ninja -j $jobs; minutes on the first run)"
(cd "$tree/build" && nice -n 10 ninja -j "$jobs" qemu-system-x86_64 tests/qtest/migration-test) \
  >"$tree/ninja.log" 2>&1 ||
  { grep -B2 -A12 'error' "$tree/ninja.log" | head -60 >&2; exit 1; }
rm -f "$tree"/built-*
touch "$stamp"
echo "$bin"
