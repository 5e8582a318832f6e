# Sourced by scripts that install Debian packages (needs `SUDO` and `log` defined).
#
# ensure_backports: adds bookworm-backports (binary and source) to apt, once.
# qemu_release: prints `bookworm-backports` when the QEMU packages must come from there, else
#   nothing. Some images carry bookworm-backports' qemu-utils (10.x), which breaks bookworm's
#   qemu-system-common (7.2): the emulator must then come from backports too.

ensure_backports() {
  local list=/etc/apt/sources.list.d/rmig-bookworm-backports.sources
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/ ||
     ! grep -rqs "deb-src" /etc/apt/sources.list.d/rmig-bookworm-backports.sources; then
    log "adding bookworm-backports (deb and deb-src) to apt"
    printf 'Types: deb deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' |
      $SUDO tee "$list" >/dev/null
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
  fi
}

qemu_release() {
  local v
  v=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null) || return 0
  if [ -n "$v" ] && dpkg --compare-versions "$v" ge 1:8; then
    echo bookworm-backports
  fi
}
