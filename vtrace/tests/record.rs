//! `vtrace record` and `vtrace report`: a live recording on the lab checked against a
//! `vtrace latency` run beside it, a generated Xen dom0 recording (tests/data/xen-dom0.vtrec,
//! written by `record::tests` in the binary) reported exactly, and bad files refused on one
//! line. The lab tests need root (run by `cargo xtask test`); the file tests do not.

mod common;

/// Links `record` holds on this machine: the tracepoint tier (ten packet hooks and
/// `napi:napi_poll`); the function tier is refused here.
const TRACEPOINT_LINKS: usize = vtrace_common::HOOK_COUNT;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use serde_json::Value;
use vtrace_lab::{ping, Lab, LabOptions, VirtualPath};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/xen-dom0.vtrec");

/// A scratch directory removed on drop (also when the test fails).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("vtrace-record-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn report(file: &Path, json: bool) -> Output {
    let mut args = vec!["report".to_string(), file.display().to_string()];
    if json {
        args.push("--json".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    common::run(&args)
}

fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_string)
        .collect()
}

fn hop_name(h: &Value) -> String {
    format!(
        "{}@{}",
        h["hook"].as_str().unwrap_or(""),
        h["iface"].as_str().unwrap_or("")
    )
}

/// from -> to: (count, mean_ns)
fn edges_of(latency: &Value) -> BTreeMap<(String, String), (u64, f64)> {
    latency["edges"]
        .as_array()
        .expect("edges[]")
        .iter()
        .map(|e| {
            (
                (hop_name(&e["from"]), hop_name(&e["to"])),
                (e["count"].as_u64().unwrap(), e["mean_ns"].as_f64().unwrap()),
            )
        })
        .collect()
}

/// hops: (count, mean_ns)
fn paths_of(latency: &Value) -> BTreeMap<Vec<String>, (u64, f64)> {
    latency["paths"]
        .as_array()
        .expect("paths[]")
        .iter()
        .map(|p| {
            (
                p["hops"].as_array().unwrap().iter().map(hop_name).collect(),
                (p["count"].as_u64().unwrap(), p["mean_ns"].as_f64().unwrap()),
            )
        })
        .collect()
}

/// ICMP to the receiver, on this lab's host devices only: other labs on the machine use the same
/// addresses in their own namespaces.
fn lab_filter(v: &VirtualPath) -> Vec<String> {
    let mut a: Vec<String> = ["--proto", "icmp", "--host", &v.receiver_ip.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for dev in [
        &v.sender_veth,
        &v.bridge_in,
        &v.tap_in,
        &v.tap_out,
        &v.bridge_out,
        &v.receiver_veth,
    ] {
        a.push("--iface".into());
        a.push(dev.clone());
    }
    a
}

/// The BPF links (attachments) a running process holds, from /proc/PID/fdinfo.
fn links_of(pid: u32) -> BTreeSet<u64> {
    let mut ids = BTreeSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    for e in dir.flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        for line in text.lines() {
            if let Some(id) = line.strip_prefix("link_id:") {
                ids.extend(id.trim().parse::<u64>());
            }
        }
    }
    ids
}

/// Waits up to 5 s for none of `links` to exist any more; returns those left. Precise where
/// `common::wait_unloaded` counts every vtrace on the machine (other runs may be going on).
fn links_left(links: &BTreeSet<u64>) -> Vec<u64> {
    let mut left = Vec::new();
    for _ in 0..50 {
        let out = Command::new("bpftool")
            .args(["-j", "link", "show"])
            .output()
            .expect("bpftool runs");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        left = v
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l["id"].as_u64())
                    .filter(|id| links.contains(id))
                    .collect()
            })
            .unwrap_or_default();
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    left
}

// ---------------------------------------------------------------------------------------------
// Offline: the generated Xen dom0 recording.

/// The dom0 traffic of record::tests (guest 1 out through vif1.0 and eth0, the wire into guest 2
/// through vif2.0 with 2 drops in netback, and a VMM copy from tap0 into tap1), reported from
/// the file by the binary: every edge and path exactly, the copy joined, the drops and the
/// count-only netback drops.
#[test]
fn xen_dom0_fixture_reports_exactly() {
    let out = report(Path::new(FIXTURE), true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let lat = &v["latency"];
    let want_edges: BTreeMap<(String, String), (u64, f64)> = [
        ("netif_receive_skb@vif1.0", "net_dev_queue@eth0", 10, 1842.0),
        ("net_dev_queue@eth0", "net_dev_start_xmit@eth0", 10, 400.0),
        ("net_dev_start_xmit@eth0", "net_dev_xmit@eth0", 10, 1200.0),
        ("net_dev_xmit@eth0", "consume_skb@eth0", 10, 6006.0),
        ("netif_receive_skb@eth0", "net_dev_queue@vif2.0", 10, 1500.0),
        (
            "net_dev_queue@vif2.0",
            "net_dev_start_xmit@vif2.0",
            10,
            304.0,
        ),
        ("net_dev_start_xmit@vif2.0", "net_dev_xmit@vif2.0", 8, 900.0),
        ("net_dev_xmit@vif2.0", "consume_skb@vif2.0", 8, 12004.0),
        ("net_dev_start_xmit@vif2.0", "kfree_skb@vif2.0", 2, 701.0),
        ("net_dev_start_xmit@tap0", "net_dev_xmit@tap0", 5, 800.0),
        (
            "net_dev_xmit@tap0",
            "skb_copy_datagram_iovec@tap0",
            5,
            20008.0,
        ),
        (
            "skb_copy_datagram_iovec@tap0",
            "netif_receive_skb@tap1",
            5,
            1152.0,
        ),
        ("netif_receive_skb@tap1", "consume_skb@tap1", 5, 1104.0),
    ]
    .iter()
    .map(|(a, b, n, m)| ((a.to_string(), b.to_string()), (*n, *m)))
    .collect();
    assert_eq!(edges_of(lat), want_edges);
    let path = |hops: &[&str], n: u64, m: f64| {
        (
            hops.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            (n, m),
        )
    };
    let want_paths: BTreeMap<Vec<String>, (u64, f64)> = [
        path(
            &[
                "netif_receive_skb@vif1.0",
                "net_dev_queue@eth0",
                "net_dev_start_xmit@eth0",
                "net_dev_xmit@eth0",
                "consume_skb@eth0",
            ],
            10,
            9448.0,
        ),
        path(
            &[
                "netif_receive_skb@eth0",
                "net_dev_queue@vif2.0",
                "net_dev_start_xmit@vif2.0",
                "net_dev_xmit@vif2.0",
                "consume_skb@vif2.0",
            ],
            8,
            14708.0,
        ),
        path(
            &[
                "netif_receive_skb@eth0",
                "net_dev_queue@vif2.0",
                "net_dev_start_xmit@vif2.0",
                "kfree_skb@vif2.0",
            ],
            2,
            2505.0,
        ),
        // Joined across the copy into a new skb: one path from tap0 into tap1.
        path(
            &[
                "net_dev_start_xmit@tap0",
                "net_dev_xmit@tap0",
                "skb_copy_datagram_iovec@tap0",
                "netif_receive_skb@tap1",
                "consume_skb@tap1",
            ],
            5,
            23064.0,
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(paths_of(lat), want_paths);
    assert_eq!(lat["duration_s"], 4.0);
    assert_eq!(lat["lost_events"], 0);
    assert_eq!(lat["notes"].as_array().map(Vec::len), Some(0));

    let d = &v["drops"];
    assert_eq!(d["duration_s"], 4.0);
    assert_eq!(d["kfree_skb_calls"], 7);
    let drops = d["drops"].as_array().expect("drops[]");
    assert_eq!(drops.len(), 1, "NOT_DROPPED_YET is not a loss: {drops:?}");
    assert_eq!(drops[0]["iface"], "vif2.0");
    assert_eq!(drops[0]["reason"], "NOT_SPECIFIED");
    assert_eq!(
        drops[0]["location"],
        "xenvif_start_xmit+0x1b4 [xen_netback]"
    );
    assert_eq!(drops[0]["count"], 2);
    let ifaces = d["ifaces"].as_array().expect("ifaces[]");
    assert_eq!(ifaces.len(), 2, "{ifaces:?}");
    assert_eq!(ifaces[0]["iface"], "vif1.0");
    assert_eq!(ifaces[0]["kernel_rx_dropped"], 3);
    assert_eq!(ifaces[0]["mismatch"], true);
    assert_eq!(ifaces[1]["iface"], "vif2.0");
    assert_eq!(ifaces[1]["traced_drops"], 2);
    assert_eq!(ifaces[1]["kernel_tx_dropped"], 2);
    assert_eq!(ifaces[1]["mismatch"], false);

    let rec = &v["recording"];
    assert_eq!(rec["format_version"], 2);
    assert_eq!(rec["kernel_release"], "5.10.0-28-amd64");
    assert_eq!(rec["hop_events"], 123);
    assert_eq!(rec["complete"], true);
}

#[test]
fn xen_dom0_fixture_prints_both_tables() {
    let out = report(Path::new(FIXTURE), false);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "vtrace report:",
        "vtrace latency: 4.0s, 4 paths, 13 edges, 0 lost events",
        "skb_copy_datagram_iovec@tap0",
        "vtrace drops: 4.0s, 2 drops traced",
        "xenvif_start_xmit+0x1b4 [xen_netback]",
        "MISMATCH",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// Bad files.

/// Start offsets of the frames after the 13-byte magic and version, and the file's length.
fn frame_starts(b: &[u8]) -> Vec<usize> {
    let mut at = 13;
    let mut v = Vec::new();
    while at + 5 <= b.len() {
        v.push(at);
        let len = u32::from_le_bytes([b[at + 1], b[at + 2], b[at + 3], b[at + 4]]) as usize;
        at += 5 + len + 4;
    }
    v
}

/// Reports `bytes` and checks the refusal: non-zero exit, exactly one line on stderr, naming the
/// file, no panic. Returns the line and stdout.
fn refused(dir: &Scratch, name: &str, bytes: &[u8]) -> (String, String) {
    let path = dir.path(name);
    std::fs::write(&path, bytes).expect("write");
    let out = report(&path, true);
    let lines = stderr_lines(&out);
    let all = lines.join("\n");
    assert!(!all.contains("panicked"), "{name}: {all}");
    assert!(!out.status.success(), "{name}: accepted");
    assert_eq!(out.status.code(), Some(1), "{name}: {all}");
    assert_eq!(lines.len(), 1, "{name}: one line on stderr: {all}");
    assert!(
        lines[0].starts_with(&format!("vtrace: {}: ", path.display())),
        "{name}: {}",
        lines[0]
    );
    println!("{name:<24} {}", lines[0]);
    (
        lines[0].clone(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn bad_files_are_refused_on_one_line() {
    let dir = Scratch::new("bad");
    let good = std::fs::read(FIXTURE).expect("fixture");
    let frames = frame_starts(&good);
    assert!(frames.len() > 100);
    let trailer = *frames.last().unwrap();

    let (l, out) = refused(&dir, "empty", b"");
    assert!(l.ends_with("not a vtrace record file (empty file)"), "{l}");
    assert!(out.is_empty());

    // Random bytes (a fixed xorshift sequence).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let (l, _) = refused(&dir, "random", &random);
    assert!(l.contains("not a vtrace record file (starts with"), "{l}");
    let (l, _) = refused(&dir, "text", b"{\"latency\": {}}\n");
    assert!(l.contains("not a vtrace record file"), "{l}");

    // Another format version.
    let mut newer = good.clone();
    newer[11] = 3;
    let (l, out) = refused(&dir, "version3", &newer);
    assert!(
        l.contains("written by format version 3, this vtrace reads version 2"),
        "{l}"
    );
    assert!(out.is_empty(), "no report from a file of another version");

    // Cut in the header: nothing to report.
    for cut in [5, 11, 13, 20, frames[1] - 1] {
        let (l, out) = refused(&dir, &format!("cut-header-{cut}"), &good[..cut]);
        assert!(l.contains("truncated at byte"), "{l}");
        assert!(out.is_empty());
    }
    // Cut after the header: what comes before the cut is reported, with the problem.
    let cuts = [
        (frames[2], "at a frame boundary"),
        (frames[40] + 3, "in a frame's length"),
        (frames[60] + 30, "in a hop"),
        (trailer, "before the trailer"),
        (trailer + 40, "in the trailer"),
        (good.len() - 1, "in the trailer's checksum"),
    ];
    for (cut, what) in cuts {
        let (l, out) = refused(&dir, &format!("cut-{cut}"), &good[..cut]);
        assert!(
            l.contains("truncated at byte") || l.contains("without its trailer"),
            "{what}: {l}"
        );
        let v: Value = serde_json::from_str(&out).expect("the partial report");
        assert_eq!(v["recording"]["complete"], false);
        assert!(
            v["latency"]["notes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n.as_str().unwrap().contains("incomplete file")),
            "{what}: {v}"
        );
        if cut >= trailer {
            assert_eq!(
                v["recording"]["hop_events"], 123,
                "{what}: every hop is there"
            );
        }
    }

    // A corrupt frame length: a hop frame that claims 1000 bytes, and one that claims 54.
    let hop = frames[30];
    assert_eq!(good[hop], 0x03, "frame 30 is a hop");
    for (len, what) in [(1000u32, "1000"), (54, "54"), (u32::MAX, "4294967295")] {
        let mut bad = good.clone();
        bad[hop + 1..hop + 5].copy_from_slice(&len.to_le_bytes());
        let (l, _) = refused(&dir, &format!("bad-length-{what}"), &bad);
        assert!(
            l.contains(&format!("at byte {hop}"))
                && (l.contains("corrupt") || l.contains("truncated")),
            "{l}"
        );
    }
    // A flipped payload byte, an unknown frame kind, junk after the trailer.
    let mut flipped = good.clone();
    flipped[hop + 10] ^= 0x40;
    let (l, _) = refused(&dir, "flipped", &flipped);
    assert!(l.contains("fails its checksum"), "{l}");
    let mut kind = good.clone();
    kind[hop] = 0x42;
    let (l, _) = refused(&dir, "kind", &kind);
    assert!(l.contains("unknown frame kind 0x42"), "{l}");
    let mut junk = good.clone();
    junk.extend_from_slice(b"\x03garbage");
    let (l, out) = refused(&dir, "junk-after-trailer", &junk);
    assert!(l.contains("data after the trailer"), "{l}");
    let v: Value = serde_json::from_str(&out).expect("the report");
    assert_eq!(v["recording"]["hop_events"], 123);

    // Not a file, no file.
    for p in [dir.0.clone(), dir.path("missing")] {
        let out = report(&p, false);
        let lines = stderr_lines(&out);
        assert!(!out.status.success());
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(!lines[0].contains("panicked"));
    }
}

// ---------------------------------------------------------------------------------------------
// Live, on the lab (root).

/// Record while `vtrace latency` runs beside it, ping 20 times over the virtual path (through the
/// VMM and both taps), and compare the report of the file with the live report.
#[test]
fn live_record_matches_a_latency_run_beside_it() {
    let lab = Lab::up(LabOptions::new()).expect("lab up");
    let v = lab.virt().clone();
    let dir = Scratch::new("live");
    let file = dir.path("ping.vtrec");
    let filter = lab_filter(&v);
    let filter: Vec<&str> = filter.iter().map(String::as_str).collect();
    let file_arg = file.display().to_string();
    let mut rec_args = vec!["record", "-o", file_arg.as_str(), "--duration", "4"];
    rec_args.extend_from_slice(&filter);
    let mut lat_args = vec!["latency", "--json", "--duration", "4"];
    lat_args.extend_from_slice(&filter);
    let recorder = common::start(&rec_args);
    let live = common::start(&lat_args);
    let links = links_of(recorder.pid());
    assert_eq!(
        links.len(),
        TRACEPOINT_LINKS,
        "every hook attached: {links:?}"
    );
    let stats = ping(&v.sender_ns, v.receiver_ip, 20, Duration::from_millis(20)).expect("ping");
    assert_eq!(stats.received, 20, "{stats:?}");
    let live: Value = serde_json::from_str(&live.finish()).expect("latency JSON");
    recorder.finish();
    assert_eq!(
        links_left(&links),
        Vec::<u64>::new(),
        "nothing stays attached"
    );

    let out = report(&file, true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("report JSON");
    let lat = &r["latency"];
    let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    println!(
        "recorded {} hop events on {} devices, {size} bytes; report: {} edges, {} paths; live: {} edges, {} paths",
        r["recording"]["hop_events"],
        r["recording"]["devices"],
        lat["edges"].as_array().unwrap().len(),
        lat["paths"].as_array().unwrap().len(),
        live["edges"].as_array().unwrap().len(),
        live["paths"].as_array().unwrap().len(),
    );
    assert_eq!(r["recording"]["complete"], true);
    // Paths through the lab's taps: the request and the reply cross the VMM.
    let taps = [v.tap_in.as_str(), v.tap_out.as_str()];
    let through_taps: u64 = paths_of(lat)
        .iter()
        .filter(|(hops, _)| {
            taps.iter()
                .all(|t| hops.iter().any(|h| h.ends_with(&format!("@{t}"))))
        })
        .map(|(hops, (n, mean))| {
            println!(
                "  {n:>3} packets, mean {:>8.1} us: {}",
                mean / 1e3,
                hops.join(" -> ")
            );
            *n
        })
        .max()
        .unwrap_or(0);
    assert!(
        through_taps >= 18,
        "a path through both taps with >= 18 packets"
    );
    // Same edges and paths with the same counts as the live run.
    let (re, le) = (edges_of(lat), edges_of(&live));
    assert_eq!(
        re.iter().map(|(k, v)| (k, v.0)).collect::<Vec<_>>(),
        le.iter().map(|(k, v)| (k, v.0)).collect::<Vec<_>>(),
        "edges and counts"
    );
    // Means are close but not equal: each tracer stamps hops in its own programs, which run
    // one after the other at each tracepoint, so an edge also times the other tracer's program.
    let worst = re
        .iter()
        .map(|(k, (_, m))| (m - le[k].1).abs())
        .fold(0.0f64, f64::max);
    println!(
        "largest edge mean difference, record vs live: {:.1} us",
        worst / 1e3
    );
    let (rp, lp) = (paths_of(lat), paths_of(&live));
    assert_eq!(
        rp.iter().map(|(k, v)| (k, v.0)).collect::<Vec<_>>(),
        lp.iter().map(|(k, v)| (k, v.0)).collect::<Vec<_>>(),
        "paths and counts"
    );
    assert_eq!(r["drops"]["lost_events"], live["lost_events"]);
}

/// SIGTERM ends a recording cleanly (trailer written); SIGKILL leaves a file without its
/// trailer that still reports the pings, with the problem on one line.
#[test]
fn killed_recordings_still_report() {
    let lab = Lab::up(LabOptions::new()).expect("lab up");
    let v = lab.virt().clone();
    let dir = Scratch::new("kill");
    let filter = lab_filter(&v);
    for (signal, complete) in [("TERM", true), ("KILL", false)] {
        let file = dir.path(&format!("{signal}.vtrec"));
        let f = file.display().to_string();
        let mut args = vec!["record", "-o", f.as_str()];
        args.extend(filter.iter().map(String::as_str));
        let rec = common::start(&args);
        let links = links_of(rec.pid());
        assert!(!links.is_empty());
        let stats = ping(&v.sender_ns, v.receiver_ip, 20, Duration::from_millis(20)).expect("ping");
        assert_eq!(stats.received, 20);
        // Past a flush (every second).
        std::thread::sleep(Duration::from_millis(1500));
        if signal == "TERM" {
            let ok = Command::new("kill")
                .args(["-TERM", &rec.pid().to_string()])
                .status()
                .expect("kill");
            assert!(ok.success());
            rec.finish();
        } else {
            rec.kill9();
        }
        assert_eq!(
            links_left(&links),
            Vec::<u64>::new(),
            "nothing stays attached"
        );
        let out = report(&file, true);
        let lines = stderr_lines(&out);
        println!(
            "SIG{signal}: exit {:?}, stderr {lines:?}",
            out.status.code()
        );
        assert_eq!(out.status.success(), complete, "{lines:?}");
        assert!(!lines.join("\n").contains("panicked"));
        if !complete {
            assert_eq!(lines.len(), 1);
            assert!(lines[0].contains("without its trailer"), "{}", lines[0]);
        }
        let r: Value = serde_json::from_slice(&out.stdout).expect("report JSON");
        let best = paths_of(&r["latency"])
            .values()
            .map(|(n, _)| *n)
            .max()
            .unwrap_or(0);
        assert!(best >= 18, "SIG{signal}: the pings are in the file: {r}");
    }
}

/// A path that cannot be written, a full device, and a disk that fills during the recording:
/// one line, non-zero, nothing left attached.
#[test]
fn write_errors_end_the_recording_cleanly() {
    for (path, want) in [
        ("/nonexistent-vtrace-dir/rec", "cannot create"),
        ("/dev/full", "No space left on device"),
    ] {
        let out = common::run(&["record", "-o", path, "--duration", "2"]);
        let lines = stderr_lines(&out);
        println!("{path}: {lines:?}");
        assert!(!out.status.success());
        // The error on one line, last; refused before anything was attached.
        let last = lines.last().expect("an error line");
        assert!(
            last.starts_with("vtrace: ") && last.contains(want),
            "{last}"
        );
        assert!(!lines
            .iter()
            .any(|l| l.contains("attached") || l.contains("panicked")));
    }
    // A 16 KiB tmpfs, mounted in a private mount namespace that dies with vtrace.
    let lab = Lab::up(LabOptions::new()).expect("lab up");
    let v = lab.virt().clone();
    let dir = Scratch::new("full");
    let mnt = dir.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=16k vtrace-test {m} && exec {vt} record -o {m}/rec --duration 20",
        m = mnt.display(),
        vt = common::VTRACE
    );
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare runs");
    // Traffic until the file system is full (about 300 hop events); stop once vtrace exits.
    let started = std::time::Instant::now();
    let pid = child.id();
    // The links vtrace holds once attached (it execs in place of unshare and sh).
    let mut links = BTreeSet::new();
    while links.len() < TRACEPOINT_LINKS && started.elapsed() < Duration::from_secs(10) {
        links = links_of(pid);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(links.len(), TRACEPOINT_LINKS, "vtrace attached");
    let traffic = {
        let (ns, ip) = (v.sender_ns.clone(), v.receiver_ip);
        std::thread::spawn(move || {
            while Path::new(&format!("/proc/{pid}")).exists()
                && started.elapsed() < Duration::from_secs(15)
            {
                let _ = ping(&ns, ip, 20, Duration::from_millis(10));
            }
        })
    };
    let out = child.wait_with_output().expect("wait");
    let elapsed = started.elapsed();
    traffic.join().unwrap();
    let lines = stderr_lines(&out);
    println!("full disk after {:.1}s: {lines:?}", elapsed.as_secs_f64());
    assert!(!out.status.success());
    assert!(
        elapsed < Duration::from_secs(15),
        "stopped at the error, not at --duration"
    );
    let last = lines.last().expect("an error line");
    assert!(
        last.starts_with("vtrace: writing") && last.contains("No space left on device"),
        "{last}"
    );
    assert!(!lines.iter().any(|l| l.contains("panicked")));
    assert_eq!(
        links_left(&links),
        Vec::<u64>::new(),
        "nothing stays attached"
    );
}
