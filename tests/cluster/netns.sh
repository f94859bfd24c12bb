#!/usr/bin/env bash
# Two network namespaces standing in for two hosts, on one switch with this machine.
#
#   netns.sh up   [PREFIX]   # create PREFIX0, PREFIX1 (idempotent)
#   netns.sh down [PREFIX]   # delete them (idempotent)
#   netns.sh show [PREFIX]   # print addresses, exit 1 if not up
#
# PREFIX defaults to "lmt".  Host i (0 or 1) is namespace PREFIXi with
# address ${NETNS_SUBNET:-10.77.0}.(i+1)/24 on an interface named PREFIXeth
# in both (like eth0 on two real hosts).  Each is a veth pair whose other end
# sits on a bridge, PREFIXbr, in the root namespace; the bridge holds .254, so
# this machine reaches both hosts as a head node reaches compute nodes (a
# SLURM controller here, slurmd on the hosts).  Run a command on a host with:
#   ip netns exec PREFIX0 CMD...          (also remounts /sys for the namespace)
#   nsenter --net=/run/netns/PREFIX0 CMD  (the network alone)
# Gloo finds its own address via the hostname, which both namespaces share
# (and /etc/hosts maps to 127.0.0.1), so ranks must set
# GLOO_SOCKET_IFNAME=PREFIXeth; the common name lets one value serve all ranks.
# Root only.
set -euo pipefail

die() { echo "netns.sh: $*" >&2; exit 1; }

[[ $# -ge 1 && $# -le 2 ]] || die "usage: $0 {up|down|show} [PREFIX]"
cmd=$1
P=${2:-lmt}
NET=${NETNS_SUBNET:-10.77.0}
IF=${P}eth
# Interface names are capped at 15 bytes.
(( ${#P} <= 12 )) || die "PREFIX '$P' too long (max 12 chars)"

BR=${P}br

# grep reads all its input (no -q): under pipefail, -q's early exit would
# fail the pipeline with the writer's SIGPIPE whenever ip's output is long.
ns_exists() { ip netns list | awk '{print $1}' | grep -xF "$1" >/dev/null; }
link_exists() { ip link show dev "$1" >/dev/null 2>&1; }

is_up() {
    local i
    ip -o addr show dev "$BR" 2>/dev/null | grep -F "inet $NET.254/24" >/dev/null || return 1
    for i in 0 1; do
        ns_exists "$P$i" || return 1
        ip -n "$P$i" -o addr show dev "$IF" 2>/dev/null \
            | grep -F "inet $NET.$((i + 1))/24" >/dev/null || return 1
        ip -n "$P$i" link show dev "$IF" 2>/dev/null | grep 'state UP' >/dev/null || return 1
    done
}

down() {
    local i
    for i in 0 1; do
        # Deleting a namespace also destroys the veth end inside it, and
        # with it the peer on the bridge.
        if ns_exists "$P$i"; then ip netns delete "$P$i"; fi
        # A half-built pair may still sit in the root namespace (the kernel
        # removes a deleted namespace's peers asynchronously: it may be gone
        # between the check and the delete).
        if link_exists "${P}v$i"; then ip link delete "${P}v$i" 2>/dev/null || true; fi
        if link_exists "${P}b$i"; then ip link delete "${P}b$i" 2>/dev/null || true; fi
    done
    if link_exists "$BR"; then ip link delete "$BR"; fi
    return 0
}

up() {
    local i
    is_up && { show; return 0; }
    down       # start clean rather than patch a partial setup
    # Bridged frames skip iptables: on a host whose FORWARD policy drops
    # (Docker's), br_netfilter would otherwise drop the hosts' traffic.
    ip link add "$BR" type bridge nf_call_iptables 0 nf_call_ip6tables 0
    ip addr add "$NET.254/24" dev "$BR"
    ip link set "$BR" up
    for i in 0 1; do
        ip netns add "$P$i"
        ip link add "${P}v$i" type veth peer name "${P}b$i"
        ip link set "${P}b$i" master "$BR"
        ip link set "${P}b$i" up
        # The host ends need distinct names in the root namespace; rename
        # once each sits in its own namespace.
        ip link set "${P}v$i" netns "$P$i"
        ip -n "$P$i" link set "${P}v$i" name "$IF"
        ip -n "$P$i" addr add "$NET.$((i + 1))/24" dev "$IF"
        ip -n "$P$i" link set "$IF" up
        # Loopback is down in a fresh namespace; many tools bind to 127.0.0.1.
        ip -n "$P$i" link set lo up
    done
    # The links come up asynchronously (a bridge port a moment after its
    # veth): wait for state UP with carrier on both (ping is not installed
    # everywhere, so no packet test here).
    for _ in $(seq 50); do
        is_up && break
        sleep 0.1
    done
    for i in 0 1; do
        ip -n "$P$i" link show dev "$IF" | grep 'LOWER_UP.*state UP' >/dev/null \
            || die "$IF in $P$i has no carrier"
    done
    show
}

show() {
    local i
    is_up || { echo "netns.sh: ${P}0/${P}1 not up" >&2; return 1; }
    echo "root $BR $NET.254"
    for i in 0 1; do
        echo "$P$i $IF $NET.$((i + 1))"
    done
}

case $cmd in
    up) up ;;
    down) down ;;
    show) show ;;
    *) die "unknown subcommand '$cmd' (up|down|show)" ;;
esac
