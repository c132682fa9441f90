#!/usr/bin/env bash
# vtrace's lab with a real VM: a QEMU guest as the virtual router. A thin wrapper around
# `vtrace-lab vm` (lab/src/main.rs, lab/src/guest.rs), so there is a single implementation.
#
#   scripts/vm.sh up [--id ID] [--accel auto|kvm|tcg] [--boot-timeout SECS] [--memory MIB]
#                    [--cache-dir DIR]
#       builds the guest image if needed, boots it, prints names, addresses and
#       ping/trace/flood commands, keeps it running; Ctrl-C (or SIGTERM) tears it down.
#   scripts/vm.sh build [--cache-dir DIR]
#       only builds (or finds) the guest image: kernel and initramfs from Debian's
#       linux-image-amd64 and busybox-static, cached in target/vtrace-guest.
#   scripts/vm.sh clean
#       removes namespaces and devices left by lab runs that died (same as lab.sh clean).
#   scripts/vm.sh help [up|build]
#
# Topology (P = "vl" + 5-character id; all addresses in 198.18.0.0/15):
#
#   netns P-ra                                                          netns P-rb
#   eth0 198.18.2.1 ─ veth Pra ─ bridge Pga ─ tap Pqa ┐   ┌ tap Pqb ─ bridge Pgb ─ veth Prb ─ eth0 198.18.3.2
#                                                     QEMU
#                            guest 198.18.2.254 ⇄ IPv4 forwarding ⇄ 198.18.3.254
#
# The guest routes (TTL decremented) like the reference paper's virtual router. IPv6 is
# off everywhere, neighbour entries are static. QEMU uses KVM where a probe boot shows it
# works, else TCG (VTRACE_GUEST_ACCEL=kvm|tcg overrides). Needs root; installs
# qemu-system-x86 with apt-get if it is missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

case "${1:-help}" in
    up | build)
        exec cargo run --release -q -p vtrace-lab --bin vtrace-lab -- vm "$@"
        ;;
    clean)
        shift
        exec cargo run --release -q -p vtrace-lab --bin vtrace-lab -- clean "$@"
        ;;
    help | -h | --help)
        shift || true
        exec cargo run --release -q -p vtrace-lab --bin vtrace-lab -- vm help "$@"
        ;;
    *)
        echo "usage: scripts/vm.sh up|build|clean|help [options]" >&2
        exit 2
        ;;
esac
