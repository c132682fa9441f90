//! `vtrace drops` on the lab: real namespaces, bridges, taps, a userspace VMM, nftables and
//! real UDP traffic; every count is checked against a number known exactly.
//! Needs root (run by `cargo xtask test`).

mod common;

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::Command,
    time::Duration,
};

use serde_json::Value;
use vtrace_lab::{flood, netns, FloodOptions, Lab, LabOptions, VmmOptions};

/// Starts `vtrace drops --json --duration secs` and waits until it is attached.
fn start_drops(secs: u32) -> common::Running {
    let secs = secs.to_string();
    common::start(&["drops", "--json", "--duration", &secs])
}

/// Waits for vtrace to end and parses its one JSON object.
fn report_of(tracer: common::Running) -> Value {
    let out = tracer.finish();
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("one JSON object: {e}: {out}"))
}

/// The drop rows of `iface`.
fn drops_on<'a>(report: &'a Value, iface: &str) -> Vec<&'a Value> {
    report["drops"]
        .as_array()
        .expect("drops[]")
        .iter()
        .filter(|d| d["iface"] == iface)
        .collect()
}

/// Sum of the drops on `iface` with `reason` at a location starting with `loc_prefix`.
fn count(report: &Value, iface: &str, reason: &str, loc_prefix: &str) -> u64 {
    drops_on(report, iface)
        .iter()
        .filter(|d| d["reason"] == reason)
        .filter(|d| {
            d["location"]
                .as_str()
                .is_some_and(|l| l.starts_with(loc_prefix))
        })
        .map(|d| d["count"].as_u64().expect("count"))
        .sum()
}

/// The `ifaces[]` entry of `iface`.
fn iface_entry<'a>(report: &'a Value, iface: &str) -> &'a Value {
    report["ifaces"]
        .as_array()
        .expect("ifaces[]")
        .iter()
        .find(|i| i["iface"] == iface)
        .unwrap_or_else(|| panic!("no ifaces[] entry for {iface} in {report}"))
}

/// Prints every drop row and the run's counters (shown with `--nocapture`).
fn print_drops(what: &str, report: &Value) {
    println!(
        "{what}: run {:.2} s, kfree_skb_calls {}, lost_events {}, failed_map_inserts {}",
        report["duration_s"].as_f64().unwrap_or(0.0),
        report["kfree_skb_calls"],
        report["lost_events"],
        report["failed_map_inserts"]
    );
    for d in report["drops"].as_array().expect("drops[]") {
        println!(
            "  {:<24} {:<24} {:<36} {:>8}",
            d["iface"].as_str().unwrap_or("?"),
            d["reason"].as_str().unwrap_or("?"),
            d["location"].as_str().unwrap_or("?"),
            d["count"]
        );
    }
}

/// Sends `n` UDP datagrams to `dst` from inside namespace `ns`, `gap` apart, from an unconnected
/// socket (a connected one would be told of ICMP errors and refuse the next send). Returns how
/// many the kernel accepted.
fn send_udp(ns: &str, dst: SocketAddrV4, n: u32, gap: Duration) -> u32 {
    assert!(vtrace_lab::is_lab_addr(*dst.ip()), "lab addresses only");
    netns::run_in(ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        let mut sent = 0;
        for i in 0..n {
            let payload = i.to_le_bytes();
            if sock.send_to(&payload, dst)? == payload.len() {
                sent += 1;
            }
            std::thread::sleep(gap);
        }
        Ok(sent)
    })
    .expect("send in the namespace")
}

/// A bridge-family nftables table, deleted when dropped (even on a failed assertion).
struct NftTable {
    name: String,
}

impl NftTable {
    /// `table bridge <name> { chain pre { type filter hook prerouting priority 0; <rule> } }`.
    fn bridge_prerouting(name: &str, rule: &str) -> NftTable {
        // The guard exists before the table does: a half-made table is removed too.
        let table = NftTable {
            name: name.to_string(),
        };
        let script = format!(
            "table bridge {name} {{\n  chain pre {{\n    type filter hook prerouting priority 0; policy accept;\n    {rule}\n  }}\n}}\n"
        );
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("nft runs");
        {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(script.as_bytes())
                .expect("write the nft script");
        }
        let out = child.wait_with_output().expect("nft ends");
        assert!(
            out.status.success(),
            "nft -f failed: {}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
        table
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "bridge", &self.name])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// An AF_PACKET socket (all protocols, all devices of the namespace it was opened in).
fn packet_socket_in(ns: &str) -> OwnedFd {
    netns::run_in(ns, || {
        let proto = (libc::ETH_P_ALL as u16).to_be() as libc::c_int;
        // SAFETY: plain syscall; the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                proto,
            )
        };
        if fd < 0 {
            anyhow::bail!("socket(AF_PACKET): {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })
    .expect("packet socket in the namespace")
}

/// Reads every frame queued on the (non-blocking) packet socket; returns (frames, frames that
/// are IPv4/UDP to `dst`).
fn drain_packet_socket(fd: &OwnedFd, dst: SocketAddrV4) -> (u64, u64) {
    let mut buf = [0u8; 2048];
    let (mut frames, mut matching) = (0u64, 0u64);
    loop {
        // SAFETY: `buf` is valid for its length for the call.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => break,
                _ => panic!("recv on the packet socket: {e}"),
            }
        }
        frames += 1;
        let f = &buf[..n as usize];
        // Ethernet (14) + IPv4 (IHL) + UDP.
        if f.len() < 14 + 20 + 8 || f[12..14] != [0x08, 0x00] || f[14] >> 4 != 4 || f[23] != 17 {
            continue;
        }
        let ihl = usize::from(f[14] & 0x0f) * 4;
        let daddr = Ipv4Addr::new(f[30], f[31], f[32], f[33]);
        let Some(udp) = f.get(14 + ihl..14 + ihl + 4) else {
            continue;
        };
        let dport = u16::from_be_bytes([udp[2], udp[3]]);
        if daddr == *dst.ip() && dport == dst.port() {
            matching += 1;
        }
    }
    (frames, matching)
}

/// FULL_RING exactness: with a slow VMM reader and a 64-slot tun ring, a flood overflows the
/// ring of tap_in; every frame `tun_net_xmit` drops is one FULL_RING drop traced there and one
/// tick of the tap's `tx_dropped`: the two must agree exactly.
#[test]
fn full_ring_drops_match_the_taps_tx_dropped() {
    let lab = Lab::up(LabOptions::new().with_vmm(VmmOptions {
        read_pause: Duration::from_micros(50),
        tap_queue_len: Some(64),
        ..VmmOptions::default()
    }))
    .expect("lab up");
    let v = lab.virt().clone();
    let tracer = start_drops(5);
    let fl = flood(FloodOptions {
        duration: Duration::from_secs(2),
        ..FloodOptions::new(
            v.sender_ns.clone(),
            v.receiver_ns.clone(),
            SocketAddrV4::new(v.receiver_ip, 9000),
        )
    })
    .expect("flood runs");
    let report = report_of(tracer);
    print_drops("full ring", &report);
    let full_ring = count(&report, &v.tap_in, "FULL_RING", "tun_net_xmit");
    let entry = iface_entry(&report, &v.tap_in);
    let tx_dropped = entry["kernel_tx_dropped"]
        .as_u64()
        .unwrap_or_else(|| panic!("tap {} is a host device: {entry}", v.tap_in));
    let vmm = lab.vmm_stats();
    println!(
        "full ring: flood sent {} ({:.0} pps), received {}; VMM forwarded {}; {} FULL_RING drops traced on {} vs tx_dropped {} (iface entry {entry})",
        fl.sent, fl.sent_pps, fl.received, vmm.in_to_out, full_ring, v.tap_in, tx_dropped
    );
    assert!(full_ring > 0, "the flood overflowed the 64-slot ring");
    assert_eq!(
        full_ring, tx_dropped,
        "FULL_RING drops traced on {} = its tx_dropped",
        v.tap_in
    );
    assert_eq!(entry["mismatch"], false, "{entry}");
    assert_eq!(report["failed_map_inserts"], 0);
    // Where: tun's transmit, the tap/vhost stage.
    for d in report["drops"].as_array().expect("drops") {
        if d["reason"] == "FULL_RING" && d["iface"] == v.tap_in.as_str() {
            assert_eq!(d["stage"], "tap_vhost", "{d}");
        }
    }
}

/// A bridge-family nftables rule dropping UDP to port 7777 from the native sender's port: each
/// of the 200 datagrams is one NETFILTER_DROP on that port (the host end of the sender's veth).
#[test]
fn nftables_drop_on_a_bridge_port_is_counted_exactly() {
    let lab = Lab::up(LabOptions::new()).expect("lab up");
    let n = lab.native().clone();
    let table_name = format!("vtrace_test_{}", lab.id());
    let table = NftTable::bridge_prerouting(
        &table_name,
        &format!("iifname \"{}\" udp dport 7777 drop", n.sender_veth),
    );
    let tracer = start_drops(3);
    let sent = send_udp(
        &n.sender_ns,
        SocketAddrV4::new(n.receiver_ip, 7777),
        200,
        Duration::from_millis(1),
    );
    let report = report_of(tracer);
    print_drops("nftables", &report);
    let dropped = count(&report, &n.sender_veth, "NETFILTER_DROP", "");
    println!(
        "nftables: sent {sent}, NETFILTER_DROP on {}: {dropped}",
        n.sender_veth
    );
    drop(table);
    let listed = Command::new("nft")
        .args(["list", "table", "bridge", &table_name])
        .output()
        .expect("nft runs");
    assert!(
        !listed.status.success(),
        "table {table_name} is removed by its guard"
    );
    assert_eq!(sent, 200);
    assert_eq!(dropped, 200, "NETFILTER_DROP drops on {}", n.sender_veth);
}

/// Runs the closed-port scenario on the native path: 100 datagrams to port 9 of the receiver,
/// where nothing listens, optionally with a packet socket open in the receiver namespace.
/// Returns the report and, with the packet socket, what it read (frames, frames to port 9).
fn closed_port(with_packet_socket: bool) -> (Value, String, Option<(u64, u64)>) {
    let lab = Lab::up(LabOptions::new()).expect("lab up");
    let n = lab.native().clone();
    let dst = SocketAddrV4::new(n.receiver_ip, 9);
    let tap = with_packet_socket.then(|| packet_socket_in(&n.receiver_ns));
    let tracer = start_drops(3);
    let sent = send_udp(&n.sender_ns, dst, 100, Duration::from_millis(1));
    assert_eq!(sent, 100);
    // Read the packet socket before vtrace ends: its clones are consumed (read), not purged.
    std::thread::sleep(Duration::from_millis(100));
    let seen = tap.as_ref().map(|fd| drain_packet_socket(fd, dst));
    let report = report_of(tracer);
    drop(tap);
    (report, format!("eth0@{}", n.receiver_ns), seen)
}

/// UDP to a closed port in a namespace: exactly one NO_SOCKET drop per datagram, on the
/// receiver's eth0 named with its namespace.
#[test]
fn udp_to_a_closed_port_is_one_no_socket_drop_per_datagram() {
    let (report, iface, _) = closed_port(false);
    print_drops("closed port", &report);
    let no_socket = count(&report, &iface, "NO_SOCKET", "");
    println!("closed port: 100 sent, NO_SOCKET on {iface}: {no_socket}");
    assert_eq!(no_socket, 100, "NO_SOCKET drops on {iface}");
    // A device inside a namespace has the kernel's counters beside the traced count too (read
    // over rtnetlink in its namespace). The stack's drops are not the device's: flagged.
    let entry = iface_entry(&report, &iface);
    assert!(entry["kernel_rx_dropped"].is_u64(), "{entry}");
    assert_eq!(entry["traced_drops"], 100);
    assert_eq!(entry["mismatch"], true, "{entry}");
}

/// The same with an AF_PACKET socket in the receiver namespace: the kernel hands it a clone of
/// every frame (consumed when read) and still drops the original once: 100 drops, not 200.
#[test]
fn clones_for_a_packet_socket_are_not_double_counted() {
    let (report, iface, seen) = closed_port(true);
    print_drops("closed port + packet socket", &report);
    let (frames, to_port) = seen.expect("packet socket was open");
    let no_socket = count(&report, &iface, "NO_SOCKET", "");
    println!(
        "closed port + packet socket: 100 sent, packet socket read {frames} frames ({to_port} to port 9), NO_SOCKET on {iface}: {no_socket}"
    );
    assert!(
        to_port > 0,
        "the packet socket saw the datagrams (else this test proves nothing)"
    );
    assert_eq!(no_socket, 100, "NO_SOCKET drops on {iface}");
}

/// A drop where the kernel no longer knows the device: frames queued on a packet socket that
/// is closed unread are purged with `skb->dev` unset. vtrace names the device they last
/// arrived on (skb->skb_iif, in the socket's namespace) instead of "unknown"; the UDP port is
/// closed, so the receiver also sends ICMP replies, which the socket sees leave.
#[test]
fn drops_without_a_device_name_where_the_packet_arrived() {
    let lab = Lab::up(LabOptions::new()).expect("lab up");
    let n = lab.native().clone();
    let dst = SocketAddrV4::new(n.receiver_ip, 9);
    let tap = packet_socket_in(&n.receiver_ns);
    let tracer = start_drops(3);
    assert_eq!(
        send_udp(&n.sender_ns, dst, 20, Duration::from_millis(1)),
        20
    );
    std::thread::sleep(Duration::from_millis(100));
    drop(tap); // closed unread: its queue is purged
    let report = report_of(tracer);
    print_drops("queue purge", &report);
    let iface = format!("eth0@{}", n.receiver_ns);
    let purged: Vec<&Value> = report["drops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["reason"] == "QUEUE_PURGE")
        .collect();
    let on_eth0: u64 = purged
        .iter()
        .filter(|d| d["iface"] == iface.as_str())
        .map(|d| d["count"].as_u64().unwrap())
        .sum();
    assert_eq!(
        on_eth0, 20,
        "the 20 datagrams that arrived on {iface}: {purged:?}"
    );
    // The rest are the receiver's own ICMP port-unreachable replies, which the packet socket
    // saw leave: they never arrived on any device, so "unknown" is the truth for them.
    for d in &purged {
        assert_eq!(d["device"], "arrival", "{d}");
        assert!(
            d["iface"] == iface.as_str() || d["iface"] == "unknown",
            "{d}"
        );
    }
}
