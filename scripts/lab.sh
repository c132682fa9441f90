#!/usr/bin/env bash
# vtrace lab: the test topology, for people. A thin wrapper around the `vtrace-lab`
# binary (lab/src/main.rs), so there is a single implementation.
#
#   scripts/lab.sh up [--id ID] [--delay-us N] [--read-pause-us N] [--tap-queue-len N]
#                     [--no-native] [--no-virtual] [--stats-every SECS]
#       builds the lab, prints names, addresses and ping/flood commands, runs the VMM
#       forwarder in the foreground; Ctrl-C (or SIGTERM) tears everything down.
#   scripts/lab.sh clean [--prefix vlXXXXX] [--force]
#       removes namespaces and devices left by lab runs that died.
#   scripts/lab.sh flood --from NS --to NS --dst IP:PORT [--duration SECS] [--json]
#       64-byte UDP flood between two lab namespaces (the `vtrace-flood` binary).
#   scripts/lab.sh help [up|clean]
#
# Topology (P = "vl" + 5-character id; all addresses in 198.18.0.0/15):
#
#   native path
#     netns P-na                                                    netns P-nb
#     eth0 198.18.0.1 ── veth ── Pna ─┐              ┌─ Pnb ── veth ── eth0 198.18.0.2
#                                     └─ bridge Pbn ─┘
#
#   virtual path (the data path of a VMM whose guest bridges its two NICs)
#     netns P-va                                                    netns P-vb
#     eth0 198.18.1.1 ── veth ── Pva ─┐              ┌─ Pvb ── veth ── eth0 198.18.1.2
#                            bridge Pbx              bridge Pby
#                                     └─ tap Ptx ⇄ VMM ⇄ tap Pty ─┘
#
# Bridges run without STP or multicast snooping, IPv6 is off everywhere and the
# neighbour entries are static, so only the traffic you send crosses the lab.
# Needs root.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

case "${1:-help}" in
    flood)
        shift
        exec cargo run --release -q -p vtrace-lab --bin vtrace-flood -- "$@"
        ;;
    *)
        exec cargo run --release -q -p vtrace-lab --bin vtrace-lab -- "$@"
        ;;
esac
