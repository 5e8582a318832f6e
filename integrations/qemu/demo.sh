#!/usr/bin/env bash
# A real QEMU migrates a real guest through librmig (x-rmig), between two QEMU processes on
# 127.0.0.1, and checks the outcome. Exits 0 only when every check holds:
#   1. query-migrate says completed, and librmig says verified (both ends) and encrypted, and
#      (guest rewriting) ran a follow-up round before QEMU's switchover;
#   2. pmemsave of the paused source and of the destination (started -S, before cont) have
#      the same sha256;
#   3. after cont, the destination guest's ticks keep rising with bad=0 for 30 s;
#   4. migrate_cancel mid-round, kill -9 of the destination mid-round and a wrong key each
#      leave the source guest running, with librmig's reason in query-migrate.
# Builds what is missing first (integrations/qemu/build.sh, guest/build.sh). TCG (no KVM).
#
# Environment: RMIG_DEMO_MIB (guest memory filled, default 256), RMIG_DEMO_RATE (MB/s the
# guest rewrites during the main migration, default 20), RMIG_DEMO_KEEP=1 keeps the work dir,
# RMIG_DEMO_FAILURES=0 skips the failure cases (4.). RMIG_DEMO_TICK_WAIT: seconds a guest may
# take to tick (default 90).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
mib=${RMIG_DEMO_MIB:-256}
rate=${RMIG_DEMO_RATE:-20}
qemu=$("$here/build.sh")
initrd=$("$here/guest/build.sh")
kernel=$("$here/guest/kernel.sh")
work=$(mktemp -d /tmp/rmig-qemu-demo.XXXXXX)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ "${RMIG_DEMO_KEEP:-0}" = 1 ] && echo "demo: work dir kept: $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT
fails=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }
qmp() { timeout 40 python3 "$here/qmp.py" "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/key"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/wrongkey"
chmod 600 "$work/key" "$work/wrongkey"

# start NAME KEYFILE [extra qemu args...]: a guest with a QMP socket, serial log and stderr log.
start() {
  local name=$1 key=$2; shift 2
  timeout 600 "$qemu" -L /usr/share/seabios -L /usr/share/qemu -M pc -accel tcg -m 512M -smp 1 \
    -display none -monitor none -nodefaults -serial "file:$work/$name.serial" \
    -qmp "unix:$work/$name.qmp,server=on,wait=off" -pidfile "$work/$name.pid" \
    -object "secret,id=rmigkey,file=$key,format=raw" \
    -kernel "$kernel" -initrd "$initrd" \
    -append "console=ttyS0 quiet panic=-1 rmig.mib=$mib rmig.rate=${RATE:-$rate} rmig.hot=128" \
    "$@" 2>"$work/$name.log" &
  pids+=($!)
  local i
  for i in $(seq 100); do
    if [ -S "$work/$name.qmp" ] && [ -s "$work/$name.pid" ]; then
      # The QEMU process itself (the one `timeout` runs), for kill -9.
      eval "${name}_pid=$(cat "$work/$name.pid")"
      pids+=("$(cat "$work/$name.pid")")
      return 0
    fi
    sleep 0.1
  done
  echo "demo: $name did not open its QMP socket" >&2; cat "$work/$name.log" >&2; return 1
}
rmig_params() { # SOCK PORT [max-bandwidth]
  qmp "$1" 'migrate-set-capabilities {"capabilities":[{"capability":"x-rmig","state":true}]}' \
    "migrate-set-parameters {\"x-rmig-address\":\"127.0.0.1:$2\",\"x-rmig-key-secret\":\"rmigkey\",\"x-rmig-lanes\":2,\"max-bandwidth\":${3:-0}}" >/dev/null
}
last_tick() { grep -o 'tick=[0-9]*' "$1" | tail -1 | cut -d= -f2; }
wait_ticks() { # SERIAL N: wait until the guest printed tick N (RMIG_DEMO_TICK_WAIT s, default 90)
  local until=$((SECONDS + ${RMIG_DEMO_TICK_WAIT:-90}))
  while [ $SECONDS -lt $until ]; do
    [ "$(last_tick "$1" || echo 0)" -ge "$2" ] 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}
status() { qmp "$1" query-migrate | python3 -c 'import json,sys; print(json.load(sys.stdin).get("status",""))'; }
wait_status() { # SOCK SECONDS STATUS...: until query-migrate's status is one of them
  local sock=$1 secs=$2 s i; shift 2
  for i in $(seq $((secs * 5))); do
    s=$(status "$sock" 2>/dev/null || echo gone)
    for w in "$@"; do [ "$s" = "$w" ] && { echo "$s"; return 0; }; done
    sleep 0.2
  done
  echo "$s"; return 1
}
error_desc() { qmp "$1" query-migrate | python3 -c 'import json,sys; print(json.load(sys.stdin).get("error-desc",""))'; }
running() { qmp "$1" query-status | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])'; }
# The source guest still runs: its VM state and its ticks (two more within 10 s).
source_lives() {
  local what=$1 t0
  t0=$(last_tick "$work/src.serial")
  if [ "$(running "$work/src.qmp")" = running ] && wait_ticks "$work/src.serial" $((t0 + 2)) &&
     ! grep -q 'bad=[1-9]' "$work/src.serial"; then
    pass "$what: source guest running (tick $t0 -> $(last_tick "$work/src.serial"), bad=0)"
  else
    fail "$what: source guest not running"
  fi
}
stop_all() { local p; for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; pids=(); sleep 0.5; rm -f "$work"/*.qmp "$work"/*.serial "$work"/*.pid; }

# ---- 1-3: the migration, the memory images, the destination guest after cont ----
echo "demo: QEMU $qemu, guest $mib MiB rewriting $rate MB/s, kernel $kernel"
port=$(free_port); rport=$(free_port)
start src "$work/key"
start dst "$work/key" -incoming defer -S
rmig_params "$work/dst.qmp" "$rport"
qmp "$work/dst.qmp" "migrate-incoming {\"uri\":\"tcp:127.0.0.1:$port\"}" >/dev/null
wait_ticks "$work/src.serial" 3 || { fail "source guest never ticked: $(tail -c 600 "$work/src.serial")"; exit 1; }
rmig_params "$work/src.qmp" "$rport"
t0=$(date +%s.%N)
qmp "$work/src.qmp" "migrate {\"uri\":\"tcp:127.0.0.1:$port\"}" >/dev/null
st=$(wait_status "$work/src.qmp" 180 completed failed cancelled) || true
echo "demo: migration took $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
qmp "$work/src.qmp" query-migrate > "$work/src.migrate.json"
if [ "$st" = completed ]; then pass "query-migrate: completed"; else fail "query-migrate: $st ($(error_desc "$work/src.qmp"))"; fi
if grep -q 'x-rmig: completed: verified=1' "$work/src.log"; then pass "source: librmig verified"; else fail "source: librmig did not verify"; fi
# librmig encrypts by default (TLS 1.3, the key's proofs bound to it): RMIG_ENCRYPTION_TLS_PSK is 0;
# x-rmig-transport's default is TCP lanes (rmig_stats.transport).
if grep -q 'x-rmig: completed: .* encryption=0 transport=tcp' "$work/src.log"; then pass "source: librmig encrypted (tls-psk), TCP lanes"; else fail "source: librmig did not encrypt, or not over TCP: $(grep 'x-rmig: completed' "$work/src.log")"; fi
# The guest dirties pages during the first pass, so librmig's policy asks for a short round more
# and the patch runs it before QEMU's switchover rule looks again (round 0, the follow-up, the
# stop-and-copy: at least 3). Without the follow-up QEMU switches over after round 0 (2 rounds).
line=$(grep -o 'x-rmig: completed: .*' "$work/src.log" || true)
echo "demo: $line"
rounds=$(echo "$line" | sed -n 's/.* rounds=\([0-9]*\).*/\1/p')
if [ "$rate" = 0 ]; then :; elif [ "${rounds:-0}" -ge 3 ]; then pass "source: a follow-up round before the switchover (rounds=$rounds)"; else fail "source: no follow-up round before the switchover (rounds=${rounds:-none})"; fi
sleep 1
if grep -q 'x-rmig: incoming RAM complete and verified' "$work/dst.log"; then pass "destination: librmig verified"; else fail "destination: librmig did not verify"; fi
if [ "$st" = completed ]; then
  wait_status "$work/dst.qmp" 30 completed >/dev/null || true
  qmp "$work/src.qmp" "pmemsave {\"val\":0,\"size\":536870912,\"filename\":\"$work/src.mem\"}" >/dev/null
  qmp "$work/dst.qmp" "pmemsave {\"val\":0,\"size\":536870912,\"filename\":\"$work/dst.mem\"}" >/dev/null
  a=$(sha256sum < "$work/src.mem" | cut -c1-64); b=$(sha256sum < "$work/dst.mem" | cut -c1-64)
  if [ "$a" = "$b" ]; then
    pass "pmemsave sha256 equal ($a)"
  else
    fail "pmemsave differs: $a vs $b; $(cmp -l "$work/src.mem" "$work/dst.mem" | wc -l) bytes, first at: $(cmp -l "$work/src.mem" "$work/dst.mem" | head -3 | awk '{printf "%x ", $1 - 1}')"
  fi
  rm -f "$work/src.mem" "$work/dst.mem"
  qmp "$work/dst.qmp" cont >/dev/null
  sleep 30
  ticks=$(grep -o 'tick=[0-9]*' "$work/dst.serial" | cut -d= -f2 || true)
  first=$(echo "$ticks" | head -1); last=$(echo "$ticks" | tail -1); n=$(echo "$ticks" | grep -c . || true)
  if [ -n "$first" ] && [ "$n" -ge 25 ] && [ "$((last - first))" -ge 25 ] &&
     ! grep -q 'bad=[1-9]\|BAD' "$work/dst.serial"; then
    pass "destination guest after cont: $n ticks in 30 s (tick $first -> $last), bad=0"
  else
    fail "destination guest after cont: $n ticks (${first:-none} -> ${last:-none}), $(grep -o 'bad=[0-9]*' "$work/dst.serial" | sort -u | tr '\n' ' ')"
  fi
fi
stop_all

# ---- 4: failures leave the source running, with librmig's reason ----
# mid-round: the bandwidth ceiling (10 MB/s) makes round 0 last ~25 s.
failure_case() { # NAME DEST-KEY ACTION EXPECTED-STATUS REASON-REGEX
  local name=$1 dkey=$2 action=$3 want=$4 why=$5 st d
  port=$(free_port); rport=$(free_port)
  start src "$work/key"
  start dst "$dkey" -incoming defer -S
  rmig_params "$work/dst.qmp" "$rport"
  qmp "$work/dst.qmp" "migrate-incoming {\"uri\":\"tcp:127.0.0.1:$port\"}" >/dev/null
  wait_ticks "$work/src.serial" 2 || { fail "$name: source guest never ticked"; stop_all; return; }
  rmig_params "$work/src.qmp" "$rport" 10000000
  qmp "$work/src.qmp" "migrate {\"uri\":\"tcp:127.0.0.1:$port\"}" >/dev/null
  if [ "$action" != none ]; then
    wait_status "$work/src.qmp" 30 active >/dev/null || true
    sleep 3
    case $action in
      cancel) qmp "$work/src.qmp" migrate_cancel >/dev/null ;;
      kill) kill -9 "$dst_pid" ;;
    esac
  fi
  st=$(wait_status "$work/src.qmp" 60 failed cancelled completed) || true
  d=$(error_desc "$work/src.qmp")
  if [ "$st" = "$want" ] && echo "$d" | grep -Eq "$why"; then
    pass "$name: status $st, error-desc: $d"
  else
    fail "$name: status $st (want $want), error-desc: '$d' (want /$why/)"
  fi
  source_lives "$name"
  stop_all
}
if [ "${RMIG_DEMO_FAILURES:-1}" = 1 ]; then
failure_case "migrate_cancel mid-round" "$work/key" cancel cancelled 'x-rmig: .*cancel'
failure_case "kill -9 of the destination mid-round" "$work/key" kill failed 'x-rmig: '
failure_case "wrong key" "$work/wrongkey" none failed 'x-rmig: .*(auth|key)'
fi

if [ "$fails" -eq 0 ]; then echo "demo: every check holds"; exit 0; fi
echo "demo: $fails check(s) failed"; exit 1
