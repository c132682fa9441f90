//! Lab integration tests. They need root (namespaces, bridges, taps) and may run in
//! parallel: every lab gets a unique id, and every check is limited to its prefix.

use std::net::SocketAddrV4;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vtrace_lab::{flood, ping, FloodOptions, Lab, LabOptions, VmmOptions};

fn require_root() {
    // SAFETY: no arguments.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the lab tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    );
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Host devices and namespaces whose names start with `prefix`.
fn objects_with_prefix(prefix: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in run("ip", &["-o", "link", "show"]).lines() {
        if let Some(name) = line.split_whitespace().nth(1) {
            let name = name.trim_end_matches(':').split('@').next().unwrap_or(name);
            if name.starts_with(prefix) {
                found.push(format!("link {name}"));
            }
        }
    }
    for line in run("ip", &["netns", "list"]).lines() {
        if let Some(name) = line.split_whitespace().next() {
            if name.starts_with(prefix) {
                found.push(format!("netns {name}"));
            }
        }
    }
    found.sort();
    found
}

fn owner_file(id: &str) -> String {
    format!("/run/vtrace-lab/{id}.pid")
}

/// Something a test creates to collide with a lab name: an ifb device (a kind the lab
/// never creates) or a network namespace. Removed on drop, also when the test fails.
enum Squatter {
    Link(String),
    Netns(String),
}

impl Squatter {
    fn ifb(name: &str) -> Squatter {
        run("ip", &["link", "add", "name", name, "type", "ifb"]);
        Squatter::Link(name.to_string())
    }

    fn netns(name: &str) -> Squatter {
        run("ip", &["netns", "add", name]);
        Squatter::Netns(name.to_string())
    }

    /// How [`objects_with_prefix`] lists it.
    fn listed_as(&self) -> String {
        match self {
            Squatter::Link(n) => format!("link {n}"),
            Squatter::Netns(n) => format!("netns {n}"),
        }
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        let args: &[&str] = match self {
            Squatter::Link(n) => &["link", "del", "dev", n],
            Squatter::Netns(n) => &["netns", "del", n],
        };
        let _ = Command::new("ip").args(args).output();
    }
}

#[test]
fn both_paths_answer_pings_and_drop_removes_everything() {
    require_root();
    let lab = Lab::up(LabOptions::default()).expect("lab up");
    let prefix = lab.prefix().to_string();
    let id = lab.id().to_string();
    assert!(Path::new(&owner_file(&id)).exists());

    // Everything announced exists.
    let present = objects_with_prefix(&prefix);
    for ns in lab.namespaces() {
        assert!(
            present.contains(&format!("netns {ns}")),
            "missing netns {ns}: {present:?}"
        );
    }
    for dev in lab.host_devices() {
        assert!(
            present.contains(&format!("link {dev}")),
            "missing device {dev}: {present:?}"
        );
    }
    assert_eq!(lab.namespaces().len(), 4);
    assert_eq!(lab.host_devices().len(), 9);

    let n = lab.native();
    let native =
        ping(&n.sender_ns, n.receiver_ip, 3, Duration::from_millis(50)).expect("native ping");
    println!("native:  {native:?}");
    assert_eq!(native.received, 3, "native path: {native:?}");

    let v = lab.virt();
    let virt =
        ping(&v.sender_ns, v.receiver_ip, 3, Duration::from_millis(50)).expect("virtual ping");
    println!("virtual: {virt:?}");
    assert_eq!(virt.received, 3, "virtual path: {virt:?}");

    // The replies crossed the VMM: requests tap_in → tap_out, replies back.
    let stats = lab.vmm_stats();
    println!("vmm: {stats:?}");
    assert!(stats.in_to_out >= 3 && stats.out_to_in >= 3, "{stats:?}");
    assert_eq!(stats.dropped, 0);

    drop(lab);
    assert_eq!(
        objects_with_prefix(&prefix),
        Vec::<String>::new(),
        "leftovers of {prefix}"
    );
    assert!(!Path::new(&owner_file(&id)).exists());
}

#[test]
fn failed_up_removes_only_what_it_created() {
    require_root();
    // A name collision early (first device), in the middle (a namespace) and late
    // (the second tap, after the native path, both bridges and the first tap exist).
    for suffix in ["bn", "-vb", "ty"] {
        let id = Lab::unique_id();
        let prefix = format!("vl{id}");
        let name = format!("{prefix}{suffix}");
        let squatter = if suffix.starts_with('-') {
            Squatter::netns(&name)
        } else {
            Squatter::ifb(&name)
        };
        let err =
            Lab::up(LabOptions::default().with_id(id.clone())).expect_err("collision must fail");
        let msg = format!("{err:#}");
        println!("collision on {name}: {msg}");
        assert!(msg.contains(&name), "error does not name {name}: {msg}");

        let expected = squatter.listed_as();
        assert_eq!(
            objects_with_prefix(&prefix),
            vec![expected],
            "lab {prefix} left objects behind"
        );
        assert!(!Path::new(&owner_file(&id)).exists());
    }
}

#[test]
fn a_live_lab_id_is_refused_and_left_intact() {
    require_root();
    let lab = Lab::up(LabOptions {
        virtual_path: false,
        ..LabOptions::default()
    })
    .expect("lab up");
    let err = Lab::up(LabOptions::default().with_id(lab.id())).expect_err("id in use");
    assert!(format!("{err:#}").contains("taken"), "{err:#}");
    let n = lab.native();
    let s = ping(&n.sender_ns, n.receiver_ip, 1, Duration::from_millis(50)).expect("ping");
    assert_eq!(s.received, 1);
}

#[test]
fn vmm_delay_adds_two_crossings_to_the_virtual_rtt() {
    require_root();
    let vmm = VmmOptions {
        per_frame_delay: Duration::from_millis(2),
        ..VmmOptions::default()
    };
    let lab = Lab::up(LabOptions::default().with_vmm(vmm)).expect("lab up");
    let (n, v) = (lab.native(), lab.virt());
    let native =
        ping(&n.sender_ns, n.receiver_ip, 10, Duration::from_millis(20)).expect("native ping");
    let virt =
        ping(&v.sender_ns, v.receiver_ip, 10, Duration::from_millis(20)).expect("virtual ping");
    let (nr, vr) = (
        native.rtt.expect("native rtt"),
        virt.rtt.expect("virtual rtt"),
    );
    println!("native rtt {nr:?}\nvirtual rtt {vr:?}");
    // Each direction sleeps 2 ms in the VMM: at least 4 ms per round trip.
    assert!(
        vr.min_ms - nr.min_ms >= 3.9,
        "min: native {nr:?} virtual {vr:?}"
    );
    assert!(
        vr.avg_ms - nr.avg_ms >= 3.5,
        "avg: native {nr:?} virtual {vr:?}"
    );
}

#[test]
fn flood_over_the_native_path() {
    require_root();
    let lab = Lab::up(LabOptions {
        virtual_path: false,
        ..LabOptions::default()
    })
    .expect("lab up");
    let n = lab.native();
    let opts = FloodOptions {
        duration: Duration::from_millis(500),
        ..FloodOptions::new(
            &n.sender_ns,
            &n.receiver_ns,
            SocketAddrV4::new(n.receiver_ip, 9000),
        )
    };
    let r = flood(opts).expect("flood");
    println!(
        "native flood: sent {} ({:.0} pps), received {} ({:.0} pps) in {:?}",
        r.sent, r.sent_pps, r.received, r.received_pps, r.elapsed
    );
    assert!(r.received > 0, "{r:?}");
    assert!(r.received <= r.sent, "{r:?}");
}

#[test]
fn flood_receiver_needs_the_destination_address() {
    require_root();
    let lab = Lab::up(LabOptions {
        virtual_path: false,
        ..LabOptions::default()
    })
    .expect("lab up");
    let n = lab.native();
    // 198.18.0.9 is in the lab block but not an address of the receiver namespace.
    let dst: SocketAddrV4 = "198.18.0.9:9000".parse().expect("addr");
    let err = flood(FloodOptions::new(&n.sender_ns, &n.receiver_ns, dst)).expect_err("must fail");
    assert!(format!("{err:#}").contains("bind"), "{err:#}");
}

#[test]
fn a_panicking_test_still_tears_its_lab_down() {
    require_root();
    let id = Lab::unique_id();
    let prefix = format!("vl{id}");
    let result = std::panic::catch_unwind(|| {
        let _lab = Lab::up(LabOptions::default().with_id(id.clone())).expect("lab up");
        panic!("test failure while the lab is up");
    });
    assert!(result.is_err());
    assert_eq!(objects_with_prefix(&prefix), Vec::<String>::new());
}

#[test]
fn clean_removes_leftovers_of_dead_runs_but_not_live_labs() {
    require_root();
    // Leftovers of a "crashed" run: its owner file naming a dead process, a namespace, a veth
    // into it, a bridge.
    let id = Lab::unique_id();
    let p = format!("vl{id}");
    // Lab-shaped names without an owner file (a host's own `vlan100`-like devices) are never
    // touched: first clean with no owner file at all.
    run(
        "ip",
        &["link", "add", "name", &format!("{p}bn"), "type", "bridge"],
    );
    let report = Lab::clean_leftovers(&p, false).expect("clean");
    assert!(
        report.devices.is_empty(),
        "no owner file, nothing removed: {report:?}"
    );
    run("ip", &["link", "del", "dev", &format!("{p}bn")]);
    std::fs::create_dir_all("/run/vtrace-lab").expect("owner dir");
    // Above any pid_max: a process that cannot be alive.
    std::fs::write(owner_file(&id), "999999999\n").expect("stale owner file");
    run("ip", &["netns", "add", &format!("{p}-na")]);
    run(
        "ip",
        &["link", "add", "name", &format!("{p}bn"), "type", "bridge"],
    );
    run(
        "ip",
        &[
            "link",
            "add",
            "name",
            &format!("{p}na"),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &format!("{p}-na"),
        ],
    );
    // A device of a foreign kind that merely looks like a lab name is not touched.
    let _foreign = Squatter::ifb(&format!("{p}zz"));
    assert_eq!(objects_with_prefix(&p).len(), 4);

    let report = Lab::clean_leftovers(&p, false).expect("clean");
    println!("{report:?}");
    assert_eq!(report.namespaces, vec![format!("{p}-na")]);
    assert_eq!(report.devices.len(), 2, "{report:?}");
    assert_eq!(objects_with_prefix(&p), vec![format!("link {p}zz")]);

    // A running lab is skipped.
    let lab = Lab::up(LabOptions {
        virtual_path: false,
        ..LabOptions::default()
    })
    .expect("lab up");
    let report = Lab::clean_leftovers(lab.prefix(), false).expect("clean");
    assert_eq!(report.skipped_live, vec![lab.id().to_string()]);
    assert!(report.namespaces.is_empty() && report.devices.is_empty());
    let n = lab.native();
    assert_eq!(
        ping(&n.sender_ns, n.receiver_ip, 1, Duration::from_millis(50))
            .expect("ping")
            .received,
        1
    );
}
