#!/usr/bin/env bash
# Runs a command as root inside a throw-away QEMU guest booted with virtme-ng over this host's
# root filesystem, so that binaries built here run there unchanged. Used for tests that need
# what this host's kernel lacks: several NUMA nodes, soft-RoCE.
#
#   usage: tests/vm/vm.sh [--numa] [--rxe] 'command'
#     --numa   two NUMA nodes: CPU 0 and half the memory on node 0, CPU 1 and the rest on node 1
#     --rxe    soft-RoCE: device rxe0 on a veth v0 with 198.18.0.1/24 (RoCEv2); the command sees
#              RMIG_RDMA_IP, RMIG_RDMA_DEV and RMIG_RDMA_GID_INDEX
#
# The host root is shared read-only with copy-on-write overlays (/tmp, /etc, /usr, /var...);
# to bring files back set VM_RWDIR=/host/dir. QEMU's TCG unless VM_KVM=1.
# Installs what is missing (qemu-system-x86, a Debian kernel with modules, virtme-ng in a venv).
# Exit status: the command's; 124 on VM_TIMEOUT; 96 when the host prerequisites failed.
set -euo pipefail

numa=0 rxe=0
while :; do
  case "${1:-}" in
    --numa) numa=1; shift ;;
    --rxe) rxe=1; shift ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { sed -n '2,14p' "$0" >&2; exit 2; }
CMD=$*
CPUS=${VM_CPUS:-2}
MEM=${VM_MEM:-1G}
TIMEOUT=${VM_TIMEOUT:-900}
VENV=${VM_VENV:-/opt/rmig-vng}
VNG_SPEC=${VM_VNG_SPEC:-virtme-ng==1.42}
# Modules whose loading only slows a TCG boot down.
BLACKLIST=kvm,kvm_amd,kvm_intel,irqbypass,ahci,libahci,libata,scsi_mod,sr_mod,cdrom,sg,i2c_i801,i2c_smbus,lpc_ich,iTCO_wdt,iTCO_vendor_support,i6300esb,pcspkr,psmouse,evdev,button,serio_raw,joydev,qemu_fw_cfg

log() { echo "[vm] $*" >&2; }
die() { echo "[vm] error: $*" >&2; exit 96; }
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

pick_kernel() {   # newest Debian kernel image with its modules installed (and rdma_rxe for --rxe)
  local k best=
  for k in $(ls /boot/vmlinuz-*-amd64 2>/dev/null | sort -V); do
    [ -d "/lib/modules/${k#/boot/vmlinuz-}/kernel" ] || continue
    if [ $rxe = 1 ]; then
      ls "/lib/modules/${k#/boot/vmlinuz-}"/kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko* >/dev/null 2>&1 || continue
    fi
    best=$k
  done
  echo "$best"
}

# ensure_backports, qemu_release.
. "$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/scripts/apt-backports.sh"

ensure() {
  local need=() p
  local pkgs=(kmod iproute2 python3-venv numactl busybox-static)
  # rdma-core's verbs library and providers (rxe), and perftest for ib_write_bw.
  [ $rxe = 1 ] && pkgs+=(rdma-core libibverbs1 ibverbs-providers ibverbs-utils perftest)
  for p in "${pkgs[@]}"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || need+=("$p")
  done
  [ -n "$(pick_kernel)" ] || need+=(linux-image-amd64)
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
      --no-install-recommends "${need[@]}" >&2 || die "apt-get install failed"
  fi
  # The emulator, with its companions from the release of the installed qemu-utils (if any).
  if [ "$(dpkg-query -W -f='${Status}' qemu-system-x86 2>/dev/null)" != "install ok installed" ]; then
    local rel; rel=$(qemu_release)
    [ -z "$rel" ] || ensure_backports >&2
    log "installing qemu-system-x86${rel:+ from $rel}"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
      --no-install-recommends ${rel:+-t "$rel"} qemu-system-x86 >&2 || die "apt-get install qemu-system-x86 failed"
  fi
  if ! "$VENV/bin/vng" --version >/dev/null 2>&1; then
    log "installing $VNG_SPEC into $VENV"
    $SUDO rm -rf "$VENV"
    $SUDO /usr/bin/python3 -m venv "$VENV" || die "python3 -m venv failed"
    $SUDO "$VENV/bin/pip" install -q "$VNG_SPEC" >&2 || die "pip install $VNG_SPEC failed"
  fi
}

exec 9>/tmp/.rmig-vm.lock
flock 9
ensure
flock -u 9

export PATH="$VENV/bin:$PATH"
KERNEL=${VM_KERNEL:-$(pick_kernel)}
[ -r "$KERNEL" ] || die "no kernel image"
WORK=$(mktemp -d /tmp/rmig-vm.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
if [ $rxe = 1 ]; then
  # Soft-RoCE on a veth pair; rxe's ICRC needs a crc32 hash, hence crc32_generic first.
  cat > "$WORK/cmd.sh" <<'RXE'
set -e
fail() { echo "[vm] rxe setup failed: $*" >&2; dmesg | tail -20 >&2; exit 97; }
modprobe crc32_generic 2>/dev/null || true
modprobe rdma_rxe || fail "modprobe rdma_rxe"
ip link set lo up
ip link add v0 type veth peer name v1 || fail veth
ip addr add 198.18.0.1/24 dev v0
ip link set v1 up; ip link set v0 up
rdma link add rxe0 type rxe netdev v0 || fail "rdma link add"
gidx=
for i in $(seq 1 100); do
  if [ "$(cat /sys/class/infiniband/rxe0/ports/1/state 2>/dev/null)" = "4: ACTIVE" ]; then
    for g in /sys/class/infiniband/rxe0/ports/1/gids/*; do
      [ "$(cat "$g" 2>/dev/null)" = "0000:0000:0000:0000:0000:ffff:c612:0001" ] && gidx=${g##*/} && break
    done
    [ -n "$gidx" ] && break
  fi
  sleep 0.2
done
[ -n "$gidx" ] || fail "rxe0 not active"
export RMIG_RDMA_IP=198.18.0.1 RMIG_RDMA_DEV=rxe0 RMIG_RDMA_GID_INDEX=$gidx
echo "[vm] rxe0 active on v0 198.18.0.1, RoCEv2 GID index $gidx" >&2
ulimit -l unlimited
set +e
RXE
fi
printf '%s\n' "$CMD" >> "$WORK/cmd.sh"
# vng puts --exec on the 2 KiB kernel command line: pass a script file.
ARGS=(--run "$KERNEL" --cpus "$CPUS" --memory "$MEM" --exec "bash $WORK/cmd.sh"
      --append "module_blacklist=$BLACKLIST")
# QEMU's TCG by default: on hosts like this one /dev/kvm exists but cannot run normal guests
# (QEMU aborts on an MSR write). VM_KVM=1 uses KVM where it works.
[ "${VM_KVM:-0}" = 1 ] || ARGS+=(--disable-kvm)
if [ $numa = 1 ]; then
  half=$(( $(numfmt --from=iec "${MEM}") / 2 / 1048576 ))M
  ARGS+=(--numa "$half,cpus=0-0" --numa "$half,cpus=1-1")
fi
if [ -n "${VM_RWDIR:-}" ]; then
  IFS=: read -r -a rw <<< "$VM_RWDIR"
  for d in "${rw[@]}"; do mkdir -p "$d"; ARGS+=("--rwdir=$d"); done
fi
log "booting $(basename "$KERNEL") (cpus=$CPUS mem=$MEM numa=$numa rxe=$rxe)"
t0=$(date +%s)
set +e
# QEMU reopens stdout/stderr: keep them pipes so that its writes do not clobber each other.
( timeout "$TIMEOUT" vng "${ARGS[@]}" </dev/null 2> >(cat >&2) ) | cat
rc=${PIPESTATUS[0]}
set -e
log "guest exited with $rc after $(( $(date +%s) - t0 )) s"
exit "$rc"
