//! `cargo xtask demo --vm`: the demo with a real VM as the virtual router. Builds (once) and
//! boots a QEMU guest that routes between two namespaces, pings across the native lab path
//! (netns — bridge — netns) and across the guest (netns — bridge — tap ⇄ QEMU [guest routes] ⇄
//! tap — bridge — netns) under `vtrace latency`, prints both breakdowns and `vtrace compare`,
//! then floods the guest with 64-byte UDP under `vtrace drops`, and prints this machine's
//! version of the reference paper's Tables III and II beside the paper's numbers. Tears
//! everything down.

use std::time::{Duration, Instant};

use anyhow::Result;
use vtrace_lab::{
    guest::{GuestImage, VmLab, VmLabOptions},
    Lab, LabOptions,
};

use crate::demo::{build_vtrace, flood_under_drops, ping_and_compare, step, workspace_root};

/// The paper's Table III (ping RTT through the router, idle, Xen 3.2): native Linux router.
pub(crate) const PAPER_NATIVE_MS: f64 = 0.084;
/// The paper's Table III: one virtual router (range over its runs).
pub(crate) const PAPER_VR_MS: (f64, f64) = (0.147, 0.150);
/// The paper's Table II: loss of 64-byte UDP through Xen 3.2 virtual routers.
const PAPER_LOSS_PCT: (f64, f64) = (60.0, 96.0);

/// Pings per second (a 20 ms interval, as in the lab tests).
const PINGS_PER_SECOND: u64 = 50;

pub fn run(seconds: u64) -> Result<()> {
    crate::require_root("the demo builds network namespaces, runs QEMU and loads eBPF programs")?;
    let root = workspace_root();
    let vtrace = build_vtrace()?;
    let out_dir = root.join("target/demo-vm");
    std::fs::create_dir_all(&out_dir)?;

    step("guest image: Debian's kernel + a busybox initramfs that routes (cached in target/vtrace-guest)");
    let t = Instant::now();
    let image = GuestImage::ensure(GuestImage::default_cache_dir())?;
    println!(
        "  {} in {:.1} s: kernel {} from {}, modules {}",
        if image.built { "built" } else { "cached" },
        t.elapsed().as_secs_f64(),
        image.kernel_release,
        image.kernel_package,
        image.modules.join(" ")
    );

    step("bringing up the native path and the virtual router (a QEMU guest), in 198.18.0.0/15");
    let lab = Lab::up(LabOptions {
        virtual_path: false,
        ..LabOptions::new()
    })?;
    let native = lab.native().clone();
    let vm = VmLab::up(VmLabOptions::new())?;
    let p = vm.path().clone();
    println!(
        "  native: {} -> bridge {} -> {}",
        native.sender_ns, native.bridge, native.receiver_ns
    );
    println!(
        "  VR:     {} -> bridge {} -> tap {} => QEMU [{}{}: guest routes {} -> {}] => tap {} -> bridge {} -> {}",
        p.sender_ns,
        p.bridge_a,
        p.tap_a,
        vm.accel().name(),
        if vm.vhost() { " + vhost-net" } else { ", userspace virtio-net" },
        p.guest_ip_a,
        p.guest_ip_b,
        p.tap_b,
        p.bridge_b,
        p.receiver_ns
    );
    println!(
        "  guest booted in {:.1} s (QEMU pid {})",
        vm.boot_time().as_secs_f64(),
        vm.qemu_pid()
    );

    let count = (seconds * PINGS_PER_SECOND).max(20) as u32;
    let interval = Duration::from_millis(1000 / PINGS_PER_SECOND);
    let rtts = ping_and_compare(
        &vtrace,
        &out_dir,
        [
            (
                "native",
                "the native path",
                native.sender_ns.as_str(),
                native.receiver_ip,
            ),
            (
                "vm",
                "the virtual router (QEMU guest)",
                p.sender_ns.as_str(),
                p.receiver_ip,
            ),
        ],
        count,
        interval,
        seconds + 3,
    )?;

    step(&format!(
        "64-byte UDP flood through the virtual router for {seconds} s: vtrace drops"
    ));
    let before = TapCounters::read(&p.tap_a, &p.tap_b);
    let devices = [
        &p.tap_a,
        &p.tap_b,
        &p.sender_veth,
        &p.receiver_veth,
        &p.bridge_a,
        &p.bridge_b,
    ];
    let (report, table) = flood_under_drops(
        &vtrace,
        &out_dir.join("vm-drops.json"),
        (&p.sender_ns, &p.receiver_ns, p.receiver_ip),
        &devices.map(|d| d.as_str()),
        seconds,
    )?;
    let after = TapCounters::read(&p.tap_a, &p.tap_b);
    println!("{table}");
    let loss_pct = 100.0 * (1.0 - report.received as f64 / report.sent.max(1) as f64);
    let d = after.minus(&before);
    println!(
        "  flood: {} sent ({:.0} pps), {} received ({:.0} pps), {loss_pct:.1}% lost",
        report.sent, report.sent_pps, report.received, report.received_pps
    );
    println!("  where, from the taps' kernel counters:");
    println!(
        "    {:>10}  dropped on tap {} before QEMU read them (tun ring full, tx_dropped)",
        d.a_tx_dropped, p.tap_a
    );
    println!(
        "    {:>10}  queued to QEMU on tap {} (tx_packets)",
        d.a_tx_packets, p.tap_a
    );
    println!(
        "    {:>10}  written back by QEMU on tap {} (rx_packets): {} lost inside QEMU and the guest",
        d.b_rx_packets,
        p.tap_b,
        d.a_tx_packets.saturating_sub(d.b_rx_packets)
    );
    println!(
        "    {:>10}  lost after tap {} (bridge, veth, receiver socket)",
        d.b_rx_packets.saturating_sub(report.received),
        p.tap_b
    );
    let accel = vm.accel().name().to_uppercase();
    drop(vm);
    drop(lab);

    step(
        "this machine's Tables III and II beside the paper's (Anhalt and Vicat-Blanc Primet, 2009)",
    );
    let (native_ms, vr_ms) = (rtts[0], rtts[1]);
    println!("  Table III: ping RTT through the router, idle (mean)");
    println!(
        "    {:<34} {:>14} {:>18} {:>10}",
        "", "native Linux", "1 virtual router", "VR/native"
    );
    println!(
        "    {:<34} {:>11.3} ms {:>9.3}–{:.3} ms {:>9.2}x",
        "paper, Xen 3.2",
        PAPER_NATIVE_MS,
        PAPER_VR_MS.0,
        PAPER_VR_MS.1,
        PAPER_VR_MS.1 / PAPER_NATIVE_MS
    );
    println!(
        "    {:<34} {:>11.3} ms {:>15.3} ms {:>9.2}x",
        format!("this machine, QEMU/{accel} guest"),
        native_ms,
        vr_ms,
        vr_ms / native_ms
    );
    println!("  Table II: 64-byte UDP through one virtual router, packets lost");
    println!(
        "    {:<34} {:>8.0}–{:.0} %",
        "paper, Xen 3.2", PAPER_LOSS_PCT.0, PAPER_LOSS_PCT.1
    );
    println!(
        "    {:<34} {:>11.1} %  ({:.0} pps offered, {:.0} pps forwarded)",
        "this machine", loss_pct, report.sent_pps, report.received_pps
    );
    step(&format!("done; JSON reports are in {}", out_dir.display()));
    Ok(())
}

/// The taps' kernel counters that show where a flood's packets went.
#[derive(Debug, Default, Clone, Copy)]
struct TapCounters {
    a_tx_packets: u64,
    a_tx_dropped: u64,
    b_rx_packets: u64,
}

impl TapCounters {
    fn read(tap_a: &str, tap_b: &str) -> TapCounters {
        let stat = |dev: &str, name: &str| {
            std::fs::read_to_string(format!("/sys/class/net/{dev}/statistics/{name}"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        TapCounters {
            a_tx_packets: stat(tap_a, "tx_packets"),
            a_tx_dropped: stat(tap_a, "tx_dropped"),
            b_rx_packets: stat(tap_b, "rx_packets"),
        }
    }

    fn minus(&self, before: &TapCounters) -> TapCounters {
        TapCounters {
            a_tx_packets: self.a_tx_packets.saturating_sub(before.a_tx_packets),
            a_tx_dropped: self.a_tx_dropped.saturating_sub(before.a_tx_dropped),
            b_rx_packets: self.b_rx_packets.saturating_sub(before.b_rx_packets),
        }
    }
}
