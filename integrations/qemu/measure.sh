#!/usr/bin/env bash
# Measures QEMU migrations of the self-checking guest between two QEMU processes on 127.0.0.1
# with the same self-built binary, and prints one JSON line per run: query-migrate's figures, both
# processes' CPU seconds over the migration, the guest's longest gap between two ticks (the
# serial lines are stamped with the host's clock as they arrive; source and destination merged),
# and the rate the guest really wrote before the migration (it may fall short of the one asked).
# Modes: rmig (x-rmig, 2 lanes, librmig's defaults: verify received, TLS-PSK), rmig-off (x-rmig,
# 2 lanes, x-rmig-verify off, x-rmig-encryption off), rmig-verify (x-rmig, 2 lanes, verify
# received, x-rmig-encryption off: cleartext like multifd), multifd (2 channels), precopy (QEMU's
# plain stream).
#
# Usage: measure.sh MODE[,MODE...] [RUNS]   (run 1 of every mode, then run 2 of every mode, ...:
# the modes alternate, so a drift of the machine spreads over all of them)
# Environment: RMIG_MEASURE_MIB (guest memory filled, default 716 = 70 % of 1 GiB),
# RMIG_MEASURE_RATE (MB/s rewritten over the hot set, default 0: idle), RMIG_MEASURE_HOT (hot set
# in MiB, default 128), RMIG_MEASURE_PREALLOC=1 starts the destination with -mem-prealloc,
# RMIG_MEASURE_DOWNTIME_LIMIT (ms, every mode; default QEMU's 300).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
modes=${1:?usage: measure.sh rmig|rmig-off|rmig-verify|multifd|precopy[,...] [RUNS]}
runs=${2:-1}
mib=${RMIG_MEASURE_MIB:-716}
rate=${RMIG_MEASURE_RATE:-0}
hot=${RMIG_MEASURE_HOT:-128}
prealloc=${RMIG_MEASURE_PREALLOC:-0}
downtime_limit=${RMIG_MEASURE_DOWNTIME_LIMIT:-300}
qemu=$("$here/build.sh")
initrd=$("$here/guest/build.sh")
kernel=$("$here/guest/kernel.sh")
work=$(mktemp -d /tmp/rmig-qemu-measure.XXXXXX)
pids=()
cleanup() { local p; for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
qmp() { timeout 40 python3 "$here/qmp.py" "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/key"

# The serial console's lines, each prefixed with the host's time of arrival (seconds).
cat > "$work/stamp.py" <<'PY'
import os, sys, time
out, buf = open(sys.argv[1], "w", buffering=1), b""
while True:
    d = os.read(0, 65536)
    if not d:
        break
    buf += d
    *lines, buf = buf.split(b"\n")
    t = time.time()
    for l in lines:
        out.write("%.3f %s\n" % (t, l.decode(errors="replace").rstrip("\r")))
PY
start() { # NAME [qemu args]
  local name=$1 i; shift
  timeout 900 "$qemu" -L /usr/share/seabios -L /usr/share/qemu -M pc -accel tcg -m 1G -smp 1 \
    -display none -monitor none -nodefaults -serial stdio \
    -qmp "unix:$work/$name.qmp,server=on,wait=off" -pidfile "$work/$name.pid" \
    -object "secret,id=rmigkey,file=$work/key,format=raw" \
    -kernel "$kernel" -initrd "$initrd" \
    -append "console=ttyS0 quiet panic=-1 rmig.mib=$mib rmig.rate=$rate rmig.hot=$hot rmig.zero=0" \
    "$@" 2>"$work/$name.log" </dev/null | timeout 900 python3 "$work/stamp.py" "$work/$name.serial" &
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
    rmig-off) qmp "$1" 'migrate-set-capabilities {"capabilities":[{"capability":"x-rmig","state":true}]}' \
            "migrate-set-parameters {\"x-rmig-address\":\"127.0.0.1:$2\",\"x-rmig-key-secret\":\"rmigkey\",\"x-rmig-lanes\":2,\"x-rmig-verify\":\"off\",\"x-rmig-encryption\":\"off\"}" ;;
    rmig-verify) qmp "$1" 'migrate-set-capabilities {"capabilities":[{"capability":"x-rmig","state":true}]}' \
            "migrate-set-parameters {\"x-rmig-address\":\"127.0.0.1:$2\",\"x-rmig-key-secret\":\"rmigkey\",\"x-rmig-lanes\":2,\"x-rmig-encryption\":\"off\"}" ;;
    multifd) qmp "$1" 'migrate-set-capabilities {"capabilities":[{"capability":"multifd","state":true}]}' \
            'migrate-set-parameters {"multifd-channels":2}' ;;
    precopy) ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
  esac >/dev/null
  qmp "$1" "migrate-set-parameters {\"max-bandwidth\":0,\"downtime-limit\":$downtime_limit}" >/dev/null
}

status_of() { qmp "$1" query-migrate | python3 -c 'import json,sys; print(json.load(sys.stdin).get("status"))'; }
ticks_of() { grep -c 'rmig-guest tick=' "$1" 2>/dev/null || true; }

for run in $(seq "$runs"); do
 for mode in ${modes//,/ }; do
  port=$(free_port); rport=$(free_port)
  start src
  extra=(); [ "$prealloc" = 1 ] && extra=(-mem-prealloc)
  start dst -incoming defer "${extra[@]}"
  setup_mode "$work/dst.qmp" "$rport"
  qmp "$work/dst.qmp" "migrate-incoming {\"uri\":\"tcp:127.0.0.1:$port\"}" >/dev/null
  for i in $(seq 1200); do grep -q 'tick=2 ' "$work/src.serial" 2>/dev/null && break; sleep 0.1; done
  setup_mode "$work/src.qmp" "$rport"
  spid=$(cat "$work/src.pid"); dpid=$(cat "$work/dst.pid")
  c0s=$(cpu_s "$spid"); c0d=$(cpu_s "$dpid"); t0=$(date +%s.%N)
  qmp "$work/src.qmp" "migrate {\"uri\":\"tcp:127.0.0.1:$port\"}" >/dev/null
  # CPU seconds of each side are read when that side says completed (the source is paused then;
  # the destination's guest starts running right after).
  c1s=""; c1d=""
  for i in $(seq 3000); do
    [ -n "$c1s" ] || { st=$(status_of "$work/src.qmp"); case $st in completed|failed|cancelled) c1s=$(cpu_s "$spid") ;; esac; }
    [ -n "$c1d" ] || { dt=$(status_of "$work/dst.qmp"); case $dt in completed|failed) c1d=$(cpu_s "$dpid") ;; esac; }
    [ -n "$c1s" ] && { [ -n "$c1d" ] || [ "$st" != completed ]; } && break
    sleep 0.05
  done
  [ -n "$c1d" ] || c1d=$(cpu_s "$dpid")
  # Two ticks of the destination's guest (10 s at most) close the tick-gap window.
  for i in $(seq 100); do [ "$(ticks_of "$work/dst.serial")" -ge 2 ] && break; sleep 0.1; done
  qmp "$work/src.qmp" query-migrate > "$work/mig.json"
  python3 - "$work" "$t0" > "$work/gap" <<'PY'
import sys
work, t0 = sys.argv[1], float(sys.argv[2])
ticks = []
for side in ("src", "dst"):
    for l in open(f"{work}/{side}.serial", errors="replace"):
        f = l.split(" ", 2)
        if len(f) > 1 and f[1] == "rmig-guest":
            ticks.append(float(f[0]))
ticks.sort()
before = [t for t in ticks if t < t0]
win = before[-1:] + [t for t in ticks if t >= t0]
print(round(max((b - a for a, b in zip(win, win[1:])), default=0) * 1000))
# The rate the guest really wrote before the migration (written_mb over the source's last ticks).
w = []
for l in open(f"{work}/src.serial", errors="replace"):
    f = l.split()
    if len(f) > 2 and f[1] == "rmig-guest" and float(f[0]) < t0:
        mb = [x for x in f if x.startswith("written_mb=")]
        if mb:
            w.append((float(f[0]), int(mb[0].split("=")[1])))
w = w[-4:]
print(round((w[-1][1] - w[0][1]) / (w[-1][0] - w[0][0])) if len(w) > 1 and w[-1][0] > w[0][0] else 0)
PY
  python3 -c "
import json
m = json.load(open('$work/mig.json'))
r = m.get('ram', {})
print(json.dumps({'mode': '$mode', 'run': $run, 'mib': $mib, 'rate': $rate, 'hot': $hot, 'prealloc': $prealloc, 'downtime_limit_ms': $downtime_limit,
  'status': m.get('status'), 'total_time_ms': m.get('total-time'), 'setup_time_ms': m.get('setup-time'),
  'downtime_ms': m.get('downtime'), 'transferred': r.get('transferred'),
  'cpu_src_s': round($c1s - $c0s, 2), 'cpu_dst_s': round($c1d - $c0d, 2),
  'max_tick_gap_ms': int(open('$work/gap').read().split()[0]),
  'guest_write_mbps': int(open('$work/gap').read().split()[1]), 'error': m.get('error-desc')}))"
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; pids=()
  sleep 0.5; rm -f "$work"/*.qmp "$work"/*.pid "$work"/*.serial
 done
done
