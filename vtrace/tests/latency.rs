//! `vtrace latency` on the lab: real namespaces, bridges, taps, a userspace VMM and real pings.
//! Needs root (run by `cargo xtask test`).

mod common;

use std::{net::SocketAddrV4, time::Duration};

use serde_json::Value;
use vtrace_lab::{flood, ping, FloodOptions, Lab, LabOptions, VmmOptions};

/// `common::trace_pings` where every ping must be answered.
fn trace_pings(sender: &str, dst: std::net::Ipv4Addr, count: u32, extra: &[&str]) -> (Value, f64) {
    let (report, stats) = common::trace_pings(sender, dst, count, extra);
    assert_eq!(stats.received, count, "every ping answered: {stats:?}");
    (report, stats.rtt.expect("rtt").avg_ms * 1e6)
}

/// Closure: for ping over the virtual path, request path + reply path ≈ ping's RTT.
#[test]
fn closure_virtual_path_paths_add_up_to_the_rtt() {
    let lab = Lab::up(LabOptions::new().with_vmm(VmmOptions {
        per_frame_delay: Duration::from_micros(100),
        ..VmmOptions::default()
    }))
    .expect("lab up");
    let v = lab.virt().clone();
    let (report, rtt_ns) = trace_pings(&v.sender_ns, v.receiver_ip, 100, &[]);
    let tx = format!("eth0@{}", v.sender_ns);
    let rx = format!("eth0@{}", v.receiver_ns);
    let (request, nreq) = common::path_mean(&report, &tx, &rx);
    let (reply, nrep) = common::path_mean(&report, &rx, &tx);
    let ratio = (request + reply) / rtt_ns;
    println!(
        "closure: request {:.1} us ({nreq} pkts) + reply {:.1} us ({nrep} pkts) = {:.1} us; ping RTT {:.1} us; ratio {ratio:.3}",
        request / 1e3,
        reply / 1e3,
        (request + reply) / 1e3,
        rtt_ns / 1e3
    );
    assert!(nreq >= 90 && nrep >= 90, "most pings traced both ways");
    assert!((0.6..=1.05).contains(&ratio), "ratio {ratio}");
    // The request path crosses the VMM: it is joined across the copy into a new skb.
    let joined = report["paths"].as_array().unwrap().iter().any(|p| {
        let hops = common::path_hops(p);
        hops.iter()
            .any(|h| h == &format!("net_dev_start_xmit@{}", v.tap_in))
            && hops
                .iter()
                .any(|h| h == &format!("netif_receive_skb@{}", v.tap_out))
    });
    assert!(
        joined,
        "a path runs from tap {} through the VMM to tap {}",
        v.tap_in, v.tap_out
    );
}

/// Attribution: with the VMM made the dominant stage, the edges across it (tap xmit → VMM → tap
/// receive) explain most of (virtual RTT − native RTT).
#[test]
fn attribution_vmm_edges_explain_the_extra_rtt() {
    let lab = Lab::up(LabOptions::new().with_vmm(VmmOptions {
        per_frame_delay: Duration::from_micros(400),
        ..VmmOptions::default()
    }))
    .expect("lab up");
    let (n, v) = (lab.native().clone(), lab.virt().clone());
    let native = ping(&n.sender_ns, n.receiver_ip, 50, Duration::from_millis(20)).expect("ping");
    let (report, virt_rtt) = trace_pings(&v.sender_ns, v.receiver_ip, 50, &[]);
    let native_rtt = native.rtt.expect("rtt").avg_ms * 1e6;
    // Per direction, the VMM stage runs from the driver taking the frame on one tap to the
    // frame entering the stack on the other: sum the edge means along each path between them.
    let mut vmm_ns = 0.0;
    for (tap_a, tap_b) in [(&v.tap_in, &v.tap_out), (&v.tap_out, &v.tap_in)] {
        let start = format!("net_dev_start_xmit@{tap_a}");
        let end = format!("netif_receive_skb@{tap_b}");
        let p = report["paths"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| {
                let hops = common::path_hops(p);
                hops.contains(&start) && hops.contains(&end)
            })
            .max_by_key(|p| p["count"].as_u64())
            .unwrap_or_else(|| panic!("no path across {tap_a} -> {tap_b}"));
        let hops = common::path_hops(p);
        let (i, j) = (
            hops.iter().position(|h| *h == start).unwrap(),
            hops.iter().position(|h| *h == end).unwrap(),
        );
        for w in hops[i..=j].windows(2) {
            let e = report["edges"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| {
                    common::hop_name(&e["from"]) == w[0] && common::hop_name(&e["to"]) == w[1]
                })
                .expect("edge of the path is reported");
            vmm_ns += e["mean_ns"].as_f64().unwrap();
        }
    }
    let extra = virt_rtt - native_rtt;
    let share = vmm_ns / extra;
    println!(
        "attribution: native RTT {:.1} us, virtual RTT {:.1} us, extra {:.1} us; VMM edges {:.1} us = {:.0}% of the extra",
        native_rtt / 1e3,
        virt_rtt / 1e3,
        extra / 1e3,
        vmm_ns / 1e3,
        100.0 * share
    );
    assert!(extra > 0.0);
    assert!(
        share >= 0.6,
        "VMM edges explain {:.0}% of the extra RTT",
        100.0 * share
    );
}

/// Under a 64-byte flood beside the ping, with a deliberately small ring buffer: no edge reports
/// more than the run lasted, and the events that did not fit are counted and reported.
#[test]
fn sanity_under_flood_no_impossible_edge_and_losses_reported() {
    let lab = Lab::up(LabOptions::new()).expect("lab up");
    let v = lab.virt().clone();
    let tracer = common::start(&["latency", "--json", "--duration", "4", "--ring-kib", "16"]);
    let flooder = {
        let (s, r, dst) = (v.sender_ns.clone(), v.receiver_ns.clone(), v.receiver_ip);
        std::thread::spawn(move || {
            flood(FloodOptions {
                duration: Duration::from_secs(2),
                ..FloodOptions::new(s, r, SocketAddrV4::new(dst, 9000))
            })
        })
    };
    let stats = ping(&v.sender_ns, v.receiver_ip, 50, Duration::from_millis(20)).expect("ping");
    let fl = flooder.join().expect("flood thread").expect("flood runs");
    let report: Value = serde_json::from_str(&tracer.finish()).expect("JSON");
    let duration_ns = report["duration_s"].as_f64().unwrap() * 1e9;
    let lost = report["lost_events"]
        .as_u64()
        .expect("lost_events is reported");
    let worst = report["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["max_ns"].as_u64().unwrap())
        .max()
        .unwrap_or(0);
    println!(
        "under flood: {:.0} pps sent, ping {}/{} answered, {} edges, worst edge {:.3} ms, run {:.1} s, {lost} lost events",
        fl.sent_pps,
        stats.received,
        stats.transmitted,
        report["edges"].as_array().unwrap().len(),
        worst as f64 / 1e6,
        duration_ns / 1e9
    );
    assert!(
        (worst as f64) <= duration_ns,
        "an edge of {worst} ns in a {duration_ns} ns run"
    );
    assert!(
        lost > 0,
        "a 16 KiB ring cannot hold a flood's events: the loss must show"
    );
    // Every event the programs tried to send is accounted for, exactly.
    let ev = &report["events"];
    let (emitted, received) = (
        ev["emitted"].as_u64().unwrap(),
        ev["received"].as_u64().unwrap(),
    );
    println!("events: {emitted} emitted = {received} received + {lost} lost");
    assert_eq!(ev["lost"].as_u64(), Some(lost));
    assert_eq!(emitted, received + lost, "{ev}");
}

/// `--iface` keeps only hops on the named devices.
#[test]
fn iface_filter_keeps_only_the_named_device() {
    let lab = Lab::up(LabOptions::new()).expect("lab up");
    let v = lab.virt().clone();
    let (report, _) = trace_pings(&v.sender_ns, v.receiver_ip, 20, &["--iface", &v.tap_in]);
    let edges = report["edges"].as_array().unwrap();
    assert!(!edges.is_empty(), "hops on {} are seen", v.tap_in);
    for e in edges {
        for end in ["from", "to"] {
            assert_eq!(e[end]["iface"], v.tap_in.as_str(), "{e}");
        }
    }
}

/// The raw-tracepoint tier (what kernels refusing tp_btf run: every kernel read through
/// `bpf_probe_read_kernel`, not typed loads) on the same traffic: every hook attaches as a raw
/// tracepoint, the ICMP filter still finds the pings, and their paths still join across the VMM.
#[test]
fn raw_tracepoint_tier_joins_the_same_paths() {
    let lab = Lab::up(LabOptions::new()).expect("lab up");
    let v = lab.virt().clone();
    let (report, stats, stderr) = common::trace_pings_with_env(
        &v.sender_ns,
        v.receiver_ip,
        20,
        &["--sample", "1"],
        &[("VTRACE_RAW_TRACEPOINTS", "1")],
    );
    assert_eq!(stats.received, 20, "{stats:?}");
    let line = stderr
        .iter()
        .find(|l| l.starts_with("vtrace: attached"))
        .expect("the attached line");
    assert!(
        !line.contains("(tp_btf)") && line.contains("(raw_tp)"),
        "{line}"
    );
    let tx = format!("eth0@{}", v.sender_ns);
    let rx = format!("eth0@{}", v.receiver_ns);
    let (request, nreq) = common::path_mean(&report, &tx, &rx);
    let (reply, nrep) = common::path_mean(&report, &rx, &tx);
    println!(
        "raw tracepoints: request {:.1} us ({nreq}), reply {:.1} us ({nrep})",
        request / 1e3,
        reply / 1e3
    );
    assert!(
        nreq >= 18 && nrep >= 18,
        "most pings traced both ways: {nreq} {nrep}"
    );
    let joined = report["paths"].as_array().unwrap().iter().any(|p| {
        let hops = common::path_hops(p);
        hops.contains(&format!("net_dev_start_xmit@{}", v.tap_in))
            && hops.contains(&format!("netif_receive_skb@{}", v.tap_out))
    });
    assert!(
        joined,
        "a path crosses the VMM from {} to {}",
        v.tap_in, v.tap_out
    );
}
