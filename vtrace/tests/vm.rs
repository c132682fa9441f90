//! `vtrace latency` through a real VM: a QEMU guest routing between two namespaces (the lab's
//! `guest` module). Needs root and QEMU; the guest image is built on first use (Debian's kernel
//! and busybox-static, cached in target/vtrace-guest) and QEMU installed if missing. A machine
//! that cannot run the guest fails this test with the reason: it is not skipped.

mod common;

use std::time::Instant;

use serde_json::Value;
use vtrace_lab::guest::{GuestImage, VmLab, VmLabOptions};

/// Packets of the path that leave through `from` (driver transmit on one tap) and come back,
/// after QEMU and the guest, on `to` (receive on the other tap), in that order.
fn crossing_count(report: &Value, from: &str, to: &str) -> u64 {
    report["paths"]
        .as_array()
        .expect("paths")
        .iter()
        .filter(|p| {
            let hops = common::path_hops(p);
            match (
                hops.iter().position(|h| h == from),
                hops.iter().position(|h| h == to),
            ) {
                (Some(i), Some(j)) => i < j,
                _ => false,
            }
        })
        .map(|p| p["count"].as_u64().unwrap_or(0))
        .sum()
}

fn gone(lab_namespaces: &[String], devices: &[String], qemu_pid: u32) -> Vec<String> {
    let mut left = Vec::new();
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for ns in lab_namespaces {
        if netns.split_whitespace().any(|w| w == ns) {
            left.push(format!("netns {ns}"));
        }
    }
    for d in devices {
        if std::path::Path::new("/sys/class/net").join(d).exists() {
            left.push(format!("device {d}"));
        }
    }
    let comm = std::fs::read_to_string(format!("/proc/{qemu_pid}/comm")).unwrap_or_default();
    if comm.starts_with("qemu") {
        left.push(format!("QEMU pid {qemu_pid}"));
    }
    left
}

/// Ping through the QEMU guest under `vtrace latency`: the packets are joined across QEMU's
/// virtio-net backend and the guest (one tap's transmit to the other tap's receive, as new
/// skbs, TTL decremented), and request path + reply path ≈ ping's RTT.
#[test]
fn vm_router_paths_join_across_qemu_and_add_up_to_the_rtt() {
    let t0 = Instant::now();
    let image = GuestImage::ensure(GuestImage::default_cache_dir()).unwrap_or_else(|e| {
        panic!("cannot build the guest image for the VM lab (QEMU, Debian kernel, busybox): {e:#}")
    });
    println!(
        "guest image {} in {:.1} s: {} ({})",
        if image.built { "built" } else { "cached" },
        t0.elapsed().as_secs_f64(),
        image.kernel_release,
        image.modules.join(" ")
    );
    let lab = VmLab::up(VmLabOptions::new())
        .unwrap_or_else(|e| panic!("cannot boot the QEMU guest as a router: {e:#}"));
    let (namespaces, devices, qemu_pid) = (lab.namespaces(), lab.host_devices(), lab.qemu_pid());
    let p = lab.path().clone();
    println!(
        "guest up: {} in {:.1} s ({}{}), taps {} / {}",
        lab.prefix(),
        lab.boot_time().as_secs_f64(),
        lab.accel().name(),
        if lab.vhost() { ", vhost-net" } else { "" },
        p.tap_a,
        p.tap_b
    );

    let count = 100u32;
    let (report, stats) = common::trace_pings(&p.sender_ns, p.receiver_ip, count, &[]);
    assert!(
        stats.received >= count * 95 / 100,
        "pings through the guest answered: {stats:?}; console: {:?}",
        lab.console_tail(10)
    );
    let rtt_ns = stats.rtt.expect("rtt").avg_ms * 1e6;

    // Joined across QEMU: a tap's transmit, then the other tap's receive, in one path.
    let there = crossing_count(
        &report,
        &format!("net_dev_start_xmit@{}", p.tap_a),
        &format!("netif_receive_skb@{}", p.tap_b),
    );
    let back = crossing_count(
        &report,
        &format!("net_dev_start_xmit@{}", p.tap_b),
        &format!("netif_receive_skb@{}", p.tap_a),
    );

    let tx = format!("eth0@{}", p.sender_ns);
    let rx = format!("eth0@{}", p.receiver_ns);
    let (request, nreq) = common::path_mean(&report, &tx, &rx);
    let (reply, nrep) = common::path_mean(&report, &rx, &tx);
    let ratio = (request + reply) / rtt_ns;
    println!(
        "through QEMU: {there} requests joined {} -> {}, {back} replies joined {} -> {}",
        p.tap_a, p.tap_b, p.tap_b, p.tap_a
    );
    println!(
        "closure: request {:.1} us ({nreq} pkts) + reply {:.1} us ({nrep} pkts) = {:.1} us; ping RTT {:.1} us ({}/{} answered); ratio {ratio:.3}",
        request / 1e3,
        reply / 1e3,
        (request + reply) / 1e3,
        rtt_ns / 1e3,
        stats.received,
        stats.transmitted
    );
    assert!(
        there > 0 || back > 0,
        "no path runs from one tap through QEMU and the guest to the other: {report}"
    );
    assert!(
        nreq >= 90 && nrep >= 90,
        "most pings traced both ways ({nreq}, {nrep})"
    );
    assert!((0.6..=1.05).contains(&ratio), "closure ratio {ratio}");

    let t = Instant::now();
    drop(lab);
    let left = gone(&namespaces, &devices, qemu_pid);
    println!(
        "teardown in {:.2} s; total {:.1} s",
        t.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    assert!(left.is_empty(), "left behind after teardown: {left:?}");
}
