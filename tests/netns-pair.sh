# Shared by the scripts that run rmig between two network namespaces (tests/netns-blips.sh,
# tests/netns-postcopy.sh, bench/scripts/vs-tls.sh): source it, then call the functions.
# Needs root. Use addresses from 198.18.0.0/15 (the benchmarking range).

# netns_pair SRC DST SRC_DEV DST_DEV SRC_ADDR/LEN DST_ADDR/LEN RATE
# Creates namespaces SRC and DST joined by a veth pair (SRC_DEV in SRC, DST_DEV in DST) with
# the given addresses, loopback up in both, each end shaped to RATE (tc tbf, e.g. 1gbit).
netns_pair() {
    local src=$1 dst=$2 sdev=$3 ddev=$4 saddr=$5 daddr=$6 rate=$7
    ip netns add "$src"
    ip netns add "$dst"
    ip link add "$sdev" netns "$src" type veth peer name "$ddev" netns "$dst"
    ip -n "$src" addr add "$saddr" dev "$sdev"
    ip -n "$dst" addr add "$daddr" dev "$ddev"
    ip -n "$src" link set lo up
    ip -n "$dst" link set lo up
    ip -n "$src" link set "$sdev" up
    ip -n "$dst" link set "$ddev" up
    ip netns exec "$src" tc qdisc add dev "$sdev" root tbf rate "$rate" burst 256k latency 50ms
    ip netns exec "$dst" tc qdisc add dev "$ddev" root tbf rate "$rate" burst 256k latency 50ms
}

# netns_remove NS...
# Kills every process left in each namespace and deletes it (for an EXIT trap: never fails).
netns_remove() {
    local ns
    for ns in "$@"; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
}
