#!/usr/bin/env bash
# QEMU's own migration qtest (tests/qtest/migration-test) on the patched build: the patch's two
# x-rmig cases, /migration/precopy/tcp/plain/x-rmig (guest stopped, then migrated) and
# .../x-rmig/live (the guest keeps writing under a downtime limit of 1 ms and 3 MB/s, until the
# test raises both mid-migration: librmig must take the new limit to converge), beside the stock
# cases they sit with, /migration/precopy/tcp/plain and /migration/multifd/tcp/uri/plain/none
# (the patch must not break QEMU's own migration). The framework checks the destination's RAM
# against the pattern its boot-sector guest writes. It uses KVM when /dev/kvm works, else TCG.
# Builds what is missing (build.sh); exits 0 only when all four pass.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
qemu=$("$here/build.sh" | tail -1)
test_bin="$(dirname "$qemu")/tests/qtest/migration-test"
[ -x "$test_bin" ] || { echo "qtest: $test_bin was not built" >&2; exit 1; }
wrap=$(mktemp -d /tmp/rmig-qtest.XXXXXX)
trap 'rm -rf "$wrap"' EXIT
# libqtest takes the target from the binary's name; firmware comes from the installed packages
# (the Debian source tarball has no blobs of its own, and q35's default NIC wants its option ROM).
cat > "$wrap/qemu-system-x86_64" <<WRAP
#!/bin/sh
exec "$qemu" -L /usr/share/seabios -L /usr/share/qemu -L /usr/lib/ipxe/qemu "\$@"
WRAP
chmod +x "$wrap/qemu-system-x86_64"
log="$wrap/qtest.log"
status=0
QTEST_QEMU_BINARY="$wrap/qemu-system-x86_64" timeout -k 10 900 "$test_bin" \
  -p /x86_64/migration/precopy/tcp/plain -p /x86_64/migration/precopy/tcp/plain/x-rmig/live \
  -p /x86_64/migration/multifd/tcp/uri/plain/none \
  >"$log" 2>&1 || status=$?
# (-p on a path runs that case and those one level below it, not deeper: .../plain runs
# .../plain/x-rmig but not .../x-rmig/live.)
grep -E '^(ok|not ok) ' "$log" || true
want='/migration/precopy/tcp/plain /migration/precopy/tcp/plain/x-rmig
/migration/precopy/tcp/plain/x-rmig/live /migration/multifd/tcp/uri/plain/none'
missing=""
for t in $want; do grep -q "^ok [0-9]* /x86_64$t\$" "$log" || missing="$missing $t"; done
if [ "$status" != 0 ] || [ -n "$missing" ]; then
  echo "qtest: failed (exit $status; not passed:${missing:- none}); the end of its output:" >&2
  grep -v '^# starting QEMU' "$log" | tail -25 >&2
  exit 1
fi
echo "qtest: the stock precopy and multifd cases and both x-rmig cases passed"
