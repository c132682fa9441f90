//! Driver discovery on the lab: the function each device's driver runs is read from the device
//! itself at run time (`ndo_start_xmit` through `dev->netdev_ops`, the NAPI poll through
//! `napi->poll`) and named from /proc/kallsyms. The lab's devices are veth, tun/tap and bridge,
//! whose functions are known, so the discovered names can be checked.
//! Needs root (run by `cargo xtask test`).

mod common;

use std::{process::Command, time::Duration};

use serde_json::Value;
use vtrace_lab::{Lab, LabOptions};

/// The discovered row for `iface` and `role`.
fn row<'a>(report: &'a Value, iface: &str, role: &str) -> &'a Value {
    report["drivers"]
        .as_array()
        .expect("drivers in the report")
        .iter()
        .find(|d| d["iface"] == iface && d["role"] == role)
        .unwrap_or_else(|| panic!("no {role} row for {iface} in {}", report["drivers"]))
}

fn in_kallsyms(symbol: &str) -> bool {
    std::fs::read_to_string("/proc/kallsyms")
        .expect("read /proc/kallsyms")
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some(symbol))
}

fn ethtool(ns: Option<&str>, dev: &str, feature: &str, on: bool) {
    let mut cmd = match ns {
        Some(ns) => Lab::in_ns(ns, "ethtool"),
        None => Command::new("ethtool"),
    };
    let status = cmd
        .args(["-K", dev, feature, if on { "on" } else { "off" }])
        .status()
        .expect("ethtool runs (cargo xtask setup installs it)");
    assert!(status.success(), "ethtool -K {dev} {feature}");
}

#[test]
fn latency_names_each_devices_driver_functions() {
    let lab = Lab::up(LabOptions::new()).expect("lab up");
    let n = lab.native().clone();
    let v = lab.virt().clone();
    // A veth polls with NAPI once GRO is on and its peer sends packets GRO may take (the peer
    // without TSO: drivers/net/veth.c, `veth_skb_is_eligible_for_gro`).
    ethtool(Some(&n.receiver_ns), "eth0", "gro", true);
    ethtool(None, &n.receiver_veth, "tso", false);

    let tracer = common::start(&["latency", "--json", "--sample", "1", "--duration", "4"]);
    for (ns, dst) in [(&n.sender_ns, n.receiver_ip), (&v.sender_ns, v.receiver_ip)] {
        let stats = vtrace_lab::ping(ns, dst, 20, Duration::from_millis(20)).expect("ping runs");
        assert_eq!(stats.received, 20, "pings answered: {stats:?}");
    }
    let report: Value = serde_json::from_str(&tracer.finish()).expect("one JSON object");

    let sender_eth0 = format!("eth0@{}", n.sender_ns);
    let receiver_eth0 = format!("eth0@{}", n.receiver_ns);
    let expect = [
        (sender_eth0.as_str(), "ndo_start_xmit", "veth_xmit"),
        (n.sender_veth.as_str(), "ndo_start_xmit", "veth_xmit"),
        (n.receiver_veth.as_str(), "ndo_start_xmit", "veth_xmit"),
        (v.tap_in.as_str(), "ndo_start_xmit", "tun_net_xmit"),
        (v.tap_out.as_str(), "ndo_start_xmit", "tun_net_xmit"),
        (receiver_eth0.as_str(), "napi_poll", "veth_poll"),
    ];
    for (iface, role, function) in expect {
        let r = row(&report, iface, role);
        println!(
            "{iface:<24} {role:<15} {} calls={} tier={}",
            r["function"], r["calls"], r["tier"]
        );
        assert_eq!(r["function"], function, "{iface} {role}: {r}");
        assert!(in_kallsyms(function), "{function} is a real kernel symbol");
        assert!(r["calls"].as_u64().unwrap_or(0) >= 1, "{r}");
    }
    // The ping requests and replies the receiver's NAPI took: every poll round counted with
    // the packets it processed.
    let napi = row(&report, &receiver_eth0, "napi_poll");
    let rounds = napi["calls"].as_u64().unwrap();
    let packets = napi["napi"]["packets"].as_u64().unwrap();
    assert!(packets >= 20 && packets >= rounds, "{napi}");
    // Functions with a function-tier hook say whether it is attached; here fentry and kprobes
    // are refused, so they say why.
    let tap = row(&report, &v.tap_in, "ndo_start_xmit");
    assert_eq!(tap["hook"], "tun_net_xmit");
    let tier = tap["tier"].as_str().unwrap();
    assert!(
        tier.starts_with("attached (") || tier.starts_with("not attached: "),
        "{tier}"
    );
    // A poll function the work tier times says so, or why not (refused here).
    assert_eq!(napi["hook"], "veth_poll");
    let tier = napi["tier"].as_str().unwrap();
    assert!(
        tier.starts_with("timed per call (")
            || (tier.starts_with("not timed: ") && tier.ends_with("rounds by napi:napi_poll")),
        "{tier}"
    );
    drop(lab);
}

#[test]
fn drops_counts_napi_rounds_per_device() {
    let lab = Lab::up(LabOptions::new()).expect("lab up");
    let n = lab.native().clone();
    ethtool(Some(&n.receiver_ns), "eth0", "gro", true);
    ethtool(None, &n.receiver_veth, "tso", false);
    let tracer = common::start(&["drops", "--json", "--duration", "3"]);
    let stats =
        vtrace_lab::ping(&n.sender_ns, n.receiver_ip, 10, Duration::from_millis(20)).expect("ping");
    assert_eq!(stats.received, 10);
    let report: Value = serde_json::from_str(&tracer.finish()).expect("one JSON object");
    let napi = row(&report, &format!("eth0@{}", n.receiver_ns), "napi_poll");
    assert_eq!(napi["function"], "veth_poll", "{napi}");
    assert!(napi["napi"]["packets"].as_u64().unwrap() >= 10, "{napi}");
    drop(lab);
}
