#!/usr/bin/env bash
# Measures one QEMU migration of the self-checking guest between two QEMU processes on 127.0.0.1
# with the same self-built binary, and prints one JSON line of query-migrate's figures plus both
# processes' CPU seconds. Modes: rmig (x-rmig, 2 lanes, verification on), multifd (2 channels),
# precopy (QEMU's plain stream).
#
# Usage: measure.sh MODE [RUNS]   (prints one line per run)
# Environment: RMIG_MEASURE_MIB (guest memory filled, default 716 = 70 % of 1 GiB),
# RMIG_MEASURE_RATE (MB/s rewritten over a 128 MiB hot set, default 0: idle),
# RMIG_MEASURE_PREALLOC=1 starts the destination with -mem-prealloc.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
mode=${1:?usage: measure.sh rmig|multifd|precopy [RUNS]}
runs=${2:-1}
mib=${RMIG_MEASURE_MIB:-716}
rate=${RMIG_MEASURE_RATE:-0}
prealloc=${RMIG_MEASURE_PREALLOC:-0}
qemu=$("$here/build.sh")
initrd=$("$here/guest/build.sh")
kernel=$(ls /boot/vmlinuz-*-amd64 | sort -V | tail -1)
work=$(mktemp -d /tmp/rmig-qemu-measure.XXXXXX)
pids=()
cleanup() { local p; for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
qmp() { timeout 40 python3 "$here/qmp.py" "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/key"

start() { # NAME [qemu args]
  local name=$1 i; shift
  timeout 900 "$qemu" -L /usr/share/seabios -L /usr/share/qemu -M pc -accel tcg -m 1G -smp 1 \
    -display none -monitor none -nodefaults -serial "file:$work/$name.serial" \
    -qmp "unix:$work/$name.qmp,server=on,wait=off" -pidfile "$work/$name.pid" \
    -object "secret,id=rmigkey,file=$work/key,format=raw" \
    -kernel "$kernel" -initrd "$initrd" \
    -append "console=ttyS0 quiet panic=-1 rmig.mib=$mib rmig.rate=$rate rmig.hot=128 rmig.zero=0" \
    "$@" 2>"$work/$name.log" &
  pids+=($!)
  for i in $(seq 300); do
    [ -S "$work/$name.qmp" ] && [ -s "$work/$name.pid" ] && { pids+=("$(cat "$work/$name.pid")"); return 0; }
    sleep 0.1
  done
  return 1
}
cpu_s() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; }
setup_mode() { # SOCK PORT
  case $mode in
    rmig) qmp "$1" 'migrate-set-capabilities {"capabilities":[{"capability":"x-rmig","state":true}]}' \
            "migrate-set-parameters {\"x-rmig-address\":\"127.0.0.1:$2\",\"x-rmig-key-secret\":\"rmigkey\",\"x-rmig-lanes\":2}" ;;
    multifd) qmp "$1" 'migrate-set-capabilities {"capabilities":[{"capability":"multifd","state":true}]}' \
            'migrate-set-parameters {"multifd-channels":2}' ;;
    precopy) ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
  esac >/dev/null
  qmp "$1" 'migrate-set-parameters {"max-bandwidth":0}' >/dev/null
}

for run in $(seq "$runs"); do
  port=$(free_port); rport=$(free_port)
  start src
  extra=(); [ "$prealloc" = 1 ] && extra=(-mem-prealloc)
  start dst -incoming defer "${extra[@]}"
  setup_mode "$work/dst.qmp" "$rport"
  qmp "$work/dst.qmp" "migrate-incoming {\"uri\":\"tcp:127.0.0.1:$port\"}" >/dev/null
  for i in $(seq 1200); do grep -q 'tick=2 ' "$work/src.serial" 2>/dev/null && break; sleep 0.1; done
  setup_mode "$work/src.qmp" "$rport"
  spid=$(cat "$work/src.pid"); dpid=$(cat "$work/dst.pid")
  c0s=$(cpu_s "$spid"); c0d=$(cpu_s "$dpid")
  qmp "$work/src.qmp" "migrate {\"uri\":\"tcp:127.0.0.1:$port\"}" >/dev/null
  for i in $(seq 3000); do
    st=$(qmp "$work/src.qmp" query-migrate | python3 -c 'import json,sys; print(json.load(sys.stdin).get("status"))')
    case $st in completed|failed|cancelled) break ;; esac
    sleep 0.1
  done
  sleep 1
  c1s=$(cpu_s "$spid"); c1d=$(cpu_s "$dpid")
  qmp "$work/src.qmp" query-migrate | python3 -c "
import json, sys
m = json.load(sys.stdin)
r = m.get('ram', {})
print(json.dumps({'mode': '$mode', 'run': $run, 'mib': $mib, 'rate': $rate, 'prealloc': $prealloc,
  'status': m.get('status'), 'total_time_ms': m.get('total-time'), 'setup_time_ms': m.get('setup-time'),
  'downtime_ms': m.get('downtime'), 'transferred': r.get('transferred'),
  'cpu_src_s': round($c1s - $c0s, 2), 'cpu_dst_s': round($c1d - $c0d, 2),
  'error': m.get('error-desc')}))"
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; pids=()
  sleep 0.5; rm -f "$work"/*.qmp "$work"/*.pid "$work"/*.serial
done
