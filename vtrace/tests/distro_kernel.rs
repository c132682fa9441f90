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
}
