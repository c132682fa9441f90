//! `vtrace-lab vhost` for real: this machine has no /dev/vhost-net (and no module support), so
//! the test boots Debian's kernel in a one-shot QEMU guest (lab's `guest_run`, packages cached in
//! target/vtrace-guest), loads vhost_net and tun there, and runs this build's `vtrace-lab vhost`.
//! The guest script gives the tap an address and a static neighbour for the driver's source
//! address once TX is through, and pings it: the echo requests leave through the tap and reach
//! the driver's RX ring via vhost's handle_rx. Counters are read while the driver lingers.
//!
//! Needs root (QEMU is installed if missing). A machine that cannot run the guest fails this
//! test with the reason: it is not skipped.

use std::{path::Path, time::Duration};

use vtrace_lab::guest::GuestImage;
use vtrace_lab::guest_run::{run_in_guest, GuestRun};

/// Inside the guest, two cases, each in its own /24 of 198.18.0.0/15 (prefix P): tap, frames,
/// RX buffers. TX is over when the tap has received the frames (its `rx_packets`); only then
/// does the tap get its address, so the UDP frames draw no ICMP errors onto RX. The second case
/// sends more frames than the ring holds (descriptors recycled) and posts a single RX buffer
/// (re-posted after each frame). While the first driver runs, a second one on the same tap
/// name must fail cleanly.
const SCRIPT: &str = r#"
if [ ! -e /dev/vhost-net ]; then
    d=$(cat /sys/class/misc/vhost-net/dev)
    mknod /dev/vhost-net c "${d%:*}" "${d#*:}"
    echo "VH_MKNOD $d"
fi
case_run() {
    T=$1; N=$2; M=$3; P=$4
    /bin/vtrace-lab vhost --tap $T --frames $N --rx-buffers $M --src $P.2 --dst $P.1 \
        --linger-ms 8000 > /tmp/out 2> /tmp/err &
    VH=$!
    n=0
    for i in $(seq 1 150); do
        n=$(cat /sys/class/net/$T/statistics/rx_packets 2>/dev/null || echo 0)
        [ "$n" -ge $N ] && break
        sleep 0.2
    done
    echo "$T TAP_RX_AFTER_TX=$n"
    if [ "$T" = vtvh0 ]; then
        /bin/vtrace-lab vhost --tap $T --frames 1 --linger-ms 0 > /dev/null 2> /tmp/err2
        echo "$T SECOND_RC=$?"; echo "$T SECOND_ERR $(cat /tmp/err2)"
    fi
    ip addr add $P.1/24 dev $T
    mac=$(echo $P.2 | awk -F. '{ printf "02:00:%02x:%02x:%02x:%02x", $1, $2, $3, $4 }')
    arp -i $T -s $P.2 $mac
    ping -c 3 -W 1 $P.2 > /dev/null 2>&1
    echo "$T TAP_RX_PACKETS=$(cat /sys/class/net/$T/statistics/rx_packets)"
    echo "$T TAP_TX_PACKETS=$(cat /sys/class/net/$T/statistics/tx_packets)"
    echo "$T TAP_TX_DROPPED=$(cat /sys/class/net/$T/statistics/tx_dropped)"
    wait $VH
    echo "$T VH_RC=$?"
    cat /tmp/out /tmp/err
    if [ -e /sys/class/net/$T ]; then echo "$T TAP_GONE=no"; else echo "$T TAP_GONE=yes"; fi
}
case_run vtvh0 200 256 198.18.6
case_run vtvh1 1000 1 198.18.7
dmesg | grep -i vhost | tail -5
"#;

fn value(console: &str, key: &str) -> u64 {
    console
        .lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key}<number> line in the console:\n{console}"))
}

/// The number right before `what` in the summary line ("… 200 frames sent …").
fn count_before(line: &str, what: &str) -> u64 {
    let at = line
        .find(what)
        .unwrap_or_else(|| panic!("no {what:?} in {line:?}"));
    line[..at]
        .split_whitespace()
        .last()
        .and_then(|n| n.trim_start_matches('(').parse().ok())
        .unwrap_or_else(|| panic!("no count before {what:?} in {line:?}"))
}

struct Case {
    tap: &'static str,
    frames: u64,
}

#[test]
fn vhost_net_moves_frames_both_ways_in_a_debian_guest() {
    let lab = Path::new(env!("CARGO_BIN_EXE_vtrace-lab"));
    let out = run_in_guest(
        &GuestImage::default_cache_dir(),
        &GuestRun {
            modules: &["vhost_net", "tun"],
            without_btf: &[],
            programs: &[lab],
            script: SCRIPT,
            timeout: Duration::from_secs(600),
        },
    )
    .unwrap_or_else(|e| panic!("the Debian guest did not run: {e:#}"));
    let console = out.console.replace('\r', "");
    println!("guest kernel {}\n{console}", out.kernel_release);
    assert_eq!(out.status, Some(0), "the guest script failed");
    for c in [
        Case {
            tap: "vtvh0",
            frames: 200,
        },
        Case {
            tap: "vtvh1",
            frames: 1000,
        },
    ] {
        let t = c.tap;
        assert_eq!(
            value(&console, &format!("{t} VH_RC=")),
            0,
            "vtrace-lab vhost --tap {t} failed"
        );
        let summary = console
            .lines()
            .find(|l| l.starts_with(&format!("vhost: tap {t}:")))
            .unwrap_or_else(|| panic!("no summary line for {t}"));
        // TX: every frame went through handle_tx and came back on the used ring, and the
        // host's tap received them (tun_sendmsg counts them in rx_packets).
        assert_eq!(count_before(summary, "frames sent"), c.frames, "{summary}");
        assert_eq!(count_before(summary, "used)"), c.frames, "{summary}");
        assert!(value(&console, &format!("{t} TAP_RX_PACKETS=")) >= c.frames);
        // RX: the three echo requests sent to the tap reached the ring via handle_rx.
        assert!(value(&console, &format!("{t} TAP_TX_PACKETS=")) >= 3);
        assert!(count_before(summary, "frames received") >= 3, "{summary}");
        assert!(
            count_before(summary, "ICMP echo requests") >= 3,
            "{summary}"
        );
        // Non-persistent: the tap went away with the driver's fds.
        assert!(
            console.contains(&format!("{t} TAP_GONE=yes")),
            "{t} outlived the driver"
        );
    }
    // A second driver on a tap in use: a one-line error naming the ioctl and errno.
    assert_ne!(value(&console, "vtvh0 SECOND_RC="), 0);
    let err = console
        .lines()
        .find_map(|l| l.strip_prefix("vtvh0 SECOND_ERR "))
        .unwrap_or_default();
    assert!(
        err.starts_with("vtrace-lab: ") && err.contains("TUNSETIFF") && err.contains("EBUSY"),
        "unexpected error for a busy tap: {err:?}"
    );
}
