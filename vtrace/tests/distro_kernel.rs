//! The function tier on a distribution kernel, for real. This machine's kernel has no module
//! support and refuses fentry, so the fentry path for functions in modules (module BTF object,
//! vtrace's own program load with `attach_btf_obj_fd`) cannot run on it. Debian's kernel can:
//! bridge is a module there, with its BTF under /sys/kernel/btf/bridge. The test boots that
//! kernel in a QEMU guest (TCG; the lab's `guest_run`, Debian packages cached with the VM lab's
//! in target/vtrace-guest), loads bridge and dummy, runs this build's `vtrace latency` inside
//! it over pings through a bridge, and reads the report from the console. It also checks that
//! every tracepoint program passes that kernel's (older) verifier in its BTF-typed form.
//!
//! Needs root (QEMU is installed if missing) and a Debian mirror the first time. A machine that
//! cannot run the guest fails this test with the reason: it is not skipped.

use std::{path::Path, time::Duration};

use serde_json::Value;
use vtrace_lab::guest::GuestImage;
use vtrace_lab::guest_run::{run_in_guest, GuestRun};

/// Inside the guest: a bridge with a dummy port and a static neighbour behind it (addresses in
/// 198.18.0.0/15), vtrace attached, 20 pings sent through the bridge (they leave through the
/// dummy port, nobody answers), the report and vtrace's messages printed between markers.
const SCRIPT: &str = r#"
brctl addbr vtbr0
ip link add vtd0 type dummy
brctl addif vtbr0 vtd0
ip link set vtd0 up
ip addr add 198.18.5.1/24 dev vtbr0
ip link set vtbr0 up
arp -i vtbr0 -s 198.18.5.2 02:00:00:00:00:02
/bin/vtrace latency --json --duration 10 > /tmp/out 2> /tmp/err &
VT=$!
for i in $(seq 1 240); do grep -q "vtrace: attached" /tmp/err && break; sleep 0.5; done
ping -c 20 -i 0.1 198.18.5.2 > /dev/null
wait $VT
echo "VT_RC=$?"
echo VT_ERR_BEGIN; cat /tmp/err; echo VT_ERR_END
echo VT_BEGIN; cat /tmp/out; echo; echo VT_END
"#;

fn between<'a>(text: &'a str, begin: &str, end: &str) -> &'a str {
    let from = text
        .find(begin)
        .map(|i| i + begin.len())
        .unwrap_or(text.len());
    let to = text[from..]
        .find(end)
        .map(|i| from + i)
        .unwrap_or(text.len());
    &text[from..to]
}

#[test]
fn module_functions_attach_with_fentry_on_a_debian_kernel() {
    let vtrace = Path::new(env!("CARGO_BIN_EXE_vtrace"));
    let out = run_in_guest(
        &GuestImage::default_cache_dir(),
        &GuestRun {
            modules: &["bridge", "dummy"],
            without_btf: &[],
            programs: &[vtrace],
            script: SCRIPT,
            timeout: Duration::from_secs(600),
        },
    )
    .unwrap_or_else(|e| panic!("the Debian guest did not run: {e:#}"));
    let console = out.console.replace('\r', "");
    let err = between(&console, "VT_ERR_BEGIN", "VT_ERR_END");
    println!("guest kernel {}\n{err}", out.kernel_release);
    assert_eq!(out.status, Some(0), "the guest script failed:\n{console}");
    assert!(
        console.contains("VT_RC=0"),
        "vtrace failed in the guest:\n{err}"
    );
    // The bridge's functions live in the module: attached by fentry through the module's BTF
    // object. br_handle_frame reads its `struct sk_buff **` with bpf_get_func_arg.
    let tier = err
        .lines()
        .find(|l| l.starts_with("vtrace: function tier:"))
        .unwrap_or_else(|| panic!("no function-tier line:\n{err}"));
    for f in [
        "br_handle_frame",
        "br_forward",
        "br_pass_frame_up",
        "br_dev_xmit",
    ] {
        assert!(
            tier.contains(&format!("{f}(fentry)")),
            "{f} not attached by fentry: {tier}"
        );
    }
    // Every tracepoint program passes this older verifier in its BTF-typed form: no hook fell
    // back to its raw tracepoint (vtrace says so on a line of its own when one does).
    let attached = err
        .lines()
        .find(|l| l.starts_with("vtrace: attached"))
        .unwrap_or_else(|| panic!("no attached line:\n{err}"));
    assert!(
        !attached.contains("(raw_tp)") && !err.contains("runs as a raw tracepoint"),
        "a tracepoint fell back to raw on {}:\n{err}",
        out.kernel_release
    );
    // The pings cross the bridge device: br_dev_xmit hops join the tracepoint hops' paths.
    let report: Value = serde_json::from_str(between(&console, "VT_BEGIN", "VT_END").trim())
        .unwrap_or_else(|e| panic!("vtrace's report: {e}\n{console}"));
    let joined: u64 = report["paths"]
        .as_array()
        .expect("paths")
        .iter()
        .filter(|p| {
            let hops = p["hops"].as_array().expect("hops");
            hops.iter()
                .any(|h| h["hook"] == "br_dev_xmit" && h["tier"] == "function")
                && hops.iter().any(|h| h["tier"] == "tracepoint")
        })
        .map(|p| p["count"].as_u64().unwrap_or(0))
        .sum();
    println!("packets whose path has a br_dev_xmit (fentry) hop: {joined}");
    assert!(
        joined >= 10,
        "expected most of the 20 pings' paths through br_dev_xmit, got {joined}:\n{report}"
    );
    // The dummy port's driver function, found from the device at run time (no catalog hook
    // has it), is timed per call from then on by the generic fentry/fexit pair.
    assert!(
        err.contains(
            "driver function dummy_xmit (ndo_start_xmit of vtd0): timed per call (fentry)"
        ),
        "dummy_xmit was not timed:\n{err}"
    );
    let dummy = report["work"]
        .as_array()
        .expect("work rows")
        .iter()
        .find(|r| r["function"] == "dummy_xmit")
        .unwrap_or_else(|| panic!("no dummy_xmit work row:\n{report}"));
    println!("dummy_xmit: {dummy}");
    assert_eq!(dummy["stage"], "driver_xmit");
    assert!(dummy["calls"].as_u64().unwrap() >= 5, "{dummy}");
    let row = report["drivers"]
        .as_array()
        .expect("driver rows")
        .iter()
        .find(|d| d["iface"] == "vtd0" && d["role"] == "ndo_start_xmit")
        .unwrap_or_else(|| panic!("no vtd0 driver row:\n{report}"));
    assert_eq!(row["tier"], "timed per call (fentry)", "{row}");
}

/// Inside the guest, twice (fentry, then `VTRACE_KPROBES=1` for the kprobe fallback): vtrace
/// attached, `vtrace-lab vhost` driving the kernel's vhost-net as a VMM does (500 frames out
/// through the TX ring: handle_tx, tun_sendmsg; then 5 pings from the host to the "guest"
/// behind the tap: tun_net_xmit, handle_rx, tun_recvmsg), vtrace stopped with SIGINT, its
/// messages and JSON report printed between markers. Addresses in 198.18.0.0/15.
const VHOST_SCRIPT: &str = r#"
traced_run() {
    L=$1; T=$2; P=$3; KP=$4
    VTRACE_KPROBES=$KP /bin/vtrace latency --json --cost --duration 300 > /tmp/out 2> /tmp/err &
    VT=$!
    VTRACE_KPROBES=$KP /bin/vtrace drops --json --duration 300 > /tmp/dout 2> /tmp/derr &
    VD=$!
    for i in $(seq 1 240); do grep -q "vtrace: attached" /tmp/err && break; sleep 0.5; done
    for i in $(seq 1 240); do grep -q "vtrace: attached" /tmp/derr && break; sleep 0.5; done
    /bin/vtrace-lab vhost --tap $T --frames 500 --src $P.2 --dst $P.1 --linger-ms 6000 \
        > /tmp/vh 2>&1 &
    VH=$!
    for i in $(seq 1 150); do
        n=$(cat /sys/class/net/$T/statistics/rx_packets 2>/dev/null || echo 0)
        [ "$n" -ge 500 ] && break
        sleep 0.2
    done
    ip addr add $P.1/24 dev $T
    mac=$(echo $P.2 | awk -F. '{ printf "02:00:%02x:%02x:%02x:%02x", $1, $2, $3, $4 }')
    arp -i $T -s $P.2 $mac
    ping -c 5 -i 0.3 -W 1 $P.2 > /dev/null 2>&1
    wait $VH
    echo "$L VH_RC=$?"
    cat /tmp/vh
    kill -INT $VT $VD
    wait $VT
    echo "$L VT_RC=$?"
    wait $VD
    echo "$L VD_RC=$?"
    echo "$L DROPS_BEGIN"; cat /tmp/dout; echo; echo "$L DROPS_END"
    echo "$L ERR_BEGIN"; cat /tmp/err; echo "$L ERR_END"
    echo "$L OUT_BEGIN"; cat /tmp/out; echo; echo "$L OUT_END"
}
traced_run fentry vtvh0 198.18.6 0
traced_run kprobe vtvh1 198.18.7 1
"#;

/// The work functions for real: vhost-net's handlers, its worker's wake-up and tun's socket
/// calls are timed on Debian's kernel, where vhost_net, vhost and tun are modules with BTF,
/// first with fentry/fexit (through the module path), then with kprobe/kretprobe
/// (`VTRACE_KPROBES=1`), which this machine's kernel lacks.
#[test]
fn vhost_net_work_is_timed_on_a_debian_kernel() {
    vhost_work_in_guest(&[], [("fentry", "fentry"), ("kprobe", "kprobe")]);
}

/// The same with the modules' BTF removed, as a kernel built without
/// CONFIG_DEBUG_INFO_BTF_MODULES has them: no fentry possible, every function (work rows and
/// packet hops) attaches by kprobe, found by its kallsyms symbol.
#[test]
fn modules_without_btf_fall_back_to_kprobes_on_a_debian_kernel() {
    let err = vhost_work_in_guest(
        &["vhost_net", "vhost", "tun"],
        [("fentry", "kprobe"), ("kprobe", "kprobe")],
    );
    let work = err
        .lines()
        .find(|l| l.starts_with("vtrace: work functions:"))
        .unwrap_or_default();
    assert!(!work.contains("(fentry)"), "{work}");
    // A function the stripped module does not have (vhost_run_work_list before 6.4) is
    // refused in those terms.
    if work.contains("vhost_run_work_list:") {
        assert!(
            work.contains(
                "module vhost has no BTF and vhost_run_work_list is not in /proc/kallsyms"
            ),
            "{work}"
        );
    }
    let tier = err
        .lines()
        .find(|l| l.starts_with("vtrace: function tier:"))
        .unwrap_or_default();
    for f in ["tun_net_xmit", "tun_do_read"] {
        assert!(tier.contains(&format!("{f}(kprobe)")), "{f}: {tier}");
    }
}

/// Boots the guest with vhost_net and tun (those in `without_btf` stripped of their BTF),
/// runs `VHOST_SCRIPT` and checks each run (label, expected attachment) of it; returns the
/// first run's stderr. The driver is this build's `vtrace-lab` (built beside `vtrace` by
/// `cargo test --workspace`).
fn vhost_work_in_guest(without_btf: &[&str], runs: [(&str, &str); 2]) -> String {
    let vtrace = Path::new(env!("CARGO_BIN_EXE_vtrace"));
    let lab = vtrace.with_file_name("vtrace-lab");
    assert!(
        lab.exists(),
        "{} is missing: build the workspace (cargo xtask test does)",
        lab.display()
    );
    let out = run_in_guest(
        &GuestImage::default_cache_dir(),
        &GuestRun {
            modules: &["vhost_net", "tun"],
            without_btf,
            programs: &[vtrace, &lab],
            script: VHOST_SCRIPT,
            timeout: Duration::from_secs(900),
        },
    )
    .unwrap_or_else(|e| panic!("the Debian guest did not run: {e:#}"));
    let console = out.console.replace('\r', "");
    assert_eq!(out.status, Some(0), "the guest script failed:\n{console}");
    for (label, via) in runs {
        let err = between(
            &console,
            &format!("{label} ERR_BEGIN"),
            &format!("{label} ERR_END"),
        );
        println!("guest kernel {}, {label} run:\n{err}", out.kernel_release);
        assert!(
            console.contains(&format!("{label} VH_RC=0")),
            "the vhost driver failed in the {label} run:\n{console}"
        );
        assert!(
            console.contains(&format!("{label} VT_RC=0")),
            "vtrace failed in the {label} run:\n{err}"
        );
        let line = err
            .lines()
            .find(|l| l.starts_with("vtrace: work functions:"))
            .unwrap_or_else(|| panic!("no work-functions line:\n{err}"));
        for f in [
            "handle_tx",
            "handle_rx",
            "vhost_wakeup",
            "tun_sendmsg",
            "tun_recvmsg",
        ] {
            assert!(
                line.contains(&format!("{f}({via})")),
                "{f} not attached by {via}: {line}"
            );
        }
        let report: Value = serde_json::from_str(
            between(
                &console,
                &format!("{label} OUT_BEGIN"),
                &format!("{label} OUT_END"),
            )
            .trim(),
        )
        .unwrap_or_else(|e| panic!("vtrace's report ({label}): {e}\n{console}"));
        let row = |f: &str| -> &Value {
            report["work"]
                .as_array()
                .expect("work rows")
                .iter()
                .find(|r| r["function"] == f)
                .unwrap_or_else(|| panic!("no {f} row ({label}):\n{report}"))
        };
        for r in report["work"].as_array().expect("work rows") {
            println!(
                "  {label}: {:<14} calls {:>5}  mean {:>9.0} ns  p99<= {:>9} ns  max {:>9} ns  returned {} {}  unmatched {}",
                r["function"].as_str().unwrap_or("?"),
                r["calls"],
                r["mean_ns"].as_f64().unwrap_or(0.0),
                r["p99_le_ns"],
                r["max_ns"],
                r["returned"],
                r["returned_unit"].as_str().unwrap_or(""),
                r["unmatched"]
            );
            assert_eq!(r["via"], via, "{r}");
        }
        // The 500 frames went out through handle_tx; the 5 echo requests came in through
        // handle_rx, one tun_recvmsg each, returning their bytes (98-byte frames + header).
        for f in ["handle_tx", "handle_rx", "tun_sendmsg", "vhost_wakeup"] {
            assert!(
                row(f)["calls"].as_u64().unwrap() >= 1,
                "{f} never timed ({label})"
            );
            assert!(
                row(f)["max_ns"].as_u64().unwrap() > 0,
                "{f} took no time ({label})"
            );
        }
        let recv = row("tun_recvmsg");
        assert!(
            recv["calls"].as_u64().unwrap() >= 5,
            "tun_recvmsg ({label}): {recv}"
        );
        assert!(
            recv["returned"].as_u64().unwrap() >= 5 * 98,
            "tun_recvmsg's bytes ({label}): {recv}"
        );
        assert_eq!(row("tun_sendmsg")["errors"], 0, "({label})");
        // --cost: the work programs' own run time, from the kernel's BPF statistics.
        let costs: Vec<&Value> = report["cost"]
            .as_array()
            .expect("cost rows")
            .iter()
            .filter(|c| c["hook"].as_str().unwrap_or("").starts_with("work:"))
            .collect();
        for c in &costs {
            println!(
                "  {label}: cost {:<22} {:<16} runs {:>5}  {:>7.0} ns/run",
                c["hook"].as_str().unwrap_or("?"),
                c["program"].as_str().unwrap_or("?"),
                c["runs"],
                c["ns_per_run"].as_f64().unwrap_or(0.0)
            );
        }
        // `drops` times the per-batch rows only (handlers, wake-up), not tun's per-frame calls.
        assert!(
            console.contains(&format!("{label} VD_RC=0")),
            "vtrace drops failed in the {label} run"
        );
        let drops: Value = serde_json::from_str(
            between(
                &console,
                &format!("{label} DROPS_BEGIN"),
                &format!("{label} DROPS_END"),
            )
            .trim(),
        )
        .unwrap_or_else(|e| panic!("vtrace drops' report ({label}): {e}\n{console}"));
        let drops_work: Vec<&str> = drops["work"]
            .as_array()
            .map(|a| a.iter().filter_map(|r| r["function"].as_str()).collect())
            .unwrap_or_default();
        println!("  {label}: drops timed {drops_work:?}");
        for f in ["handle_tx", "handle_rx", "vhost_wakeup"] {
            assert!(
                drops_work.contains(&f),
                "drops did not time {f} ({label}): {drops}"
            );
        }
        assert!(!drops_work.contains(&"tun_sendmsg"), "({label}): {drops}");
        let handle_tx: Vec<&&Value> = costs
            .iter()
            .filter(|c| c["hook"] == "work:handle_tx" && c["runs"].as_u64().unwrap_or(0) >= 1)
            .collect();
        assert_eq!(
            handle_tx.len(),
            2,
            "entry and return programs ({label}): {costs:?}"
        );
    }
    between(&console, "fentry ERR_BEGIN", "fentry ERR_END").to_string()
}
