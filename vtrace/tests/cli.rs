//! The command line against the real kernel: the hook catalog, privileges, bad input and the
//! lifecycle (nothing stays attached, whatever way vtrace ends). Needs root.

mod common;

use std::{process::Command, time::Duration};

use serde_json::Value;

/// Built into this kernel (not modules), so their functions must be found in vmlinux BTF.
const BUILT_IN_FUNCTIONS: [&str; 6] = [
    "br_handle_frame",
    "br_forward",
    "tun_net_xmit",
    "tun_get_user",
    "veth_xmit",
    "start_xmit",
];

#[test]
fn hooks_reports_every_tier_with_reasons() {
    let out = common::run(&["hooks", "--json"]);
    assert!(
        out.status.success(),
        "exit 0 when the tracepoint tier works: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let hooks = v["hooks"].as_array().expect("hooks[]");
    let by_tier = |t: &'static str| hooks.iter().filter(move |h| h["tier"] == t);
    // The stable tracepoint tier loads and attaches here (tp_btf preferred).
    for h in by_tier("tracepoint") {
        assert_eq!(h["status"], "available", "{h}");
    }
    assert!(
        by_tier("tracepoint")
            .filter(|h| h["via"] == "tp_btf")
            .count()
            >= 10
    );
    // Function tier: each entry says what happened, with the errno when the kernel refused.
    let mut refused = 0;
    for h in by_tier("function") {
        match h["status"].as_str().unwrap() {
            "available" => assert!(h["via"] == "fentry" || h["via"] == "kprobe", "{h}"),
            "refused" => {
                refused += 1;
                assert!(h["errno"].is_string(), "a refusal names the errno: {h}");
                assert!(
                    h["reason"].as_str().is_some_and(|r| r.contains("kprobe")),
                    "{h}"
                );
            }
            "missing" => assert!(h["reason"].as_str().is_some_and(|r| !r.is_empty()), "{h}"),
            other => panic!("unknown status {other}"),
        }
    }
    // On this machine fentry is refused (EPERM) and kprobes are absent: say so when it differs.
    let fentry_refused_here = by_tier("function").any(|h| h["errno"] == "EPERM");
    if !fentry_refused_here {
        println!(
            "note: this kernel allows the function tier; the refusal path is not exercised here"
        );
    } else {
        assert!(refused >= BUILT_IN_FUNCTIONS.len());
    }
    for f in BUILT_IN_FUNCTIONS {
        let h = hooks
            .iter()
            .find(|h| h["hook"] == f)
            .expect("in the catalog");
        assert!(
            h["symbols"].as_array().is_some_and(|s| !s.is_empty()),
            "{f} resolved against this kernel's BTF: {h}"
        );
        assert_ne!(h["status"], "missing", "{h}");
    }
    // Xen and vhost-net are absent here: kept in the catalog, reported missing with the module.
    for f in ["xenvif_start_xmit", "handle_tx"] {
        let h = hooks
            .iter()
            .find(|h| h["hook"] == f)
            .expect("in the catalog");
        assert_eq!(h["status"], "missing", "{h}");
        assert!(h["reason"].as_str().unwrap().contains("module"), "{h}");
    }
    for t in ["tc", "xdp"] {
        assert_eq!(
            hooks.iter().find(|h| h["hook"] == t).unwrap()["status"],
            "available"
        );
    }
    assert_eq!(common::wait_unloaded(5), 0, "probing leaves nothing loaded");
}

/// Without privileges: one line naming what is missing and how to grant it, a non-zero exit,
/// nothing attached. Tried as an unprivileged user and as root without the BPF capabilities.
#[test]
fn refuses_without_privileges_in_one_line() {
    let before = common::vtrace_programs_loaded();
    let as_nobody = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            common::VTRACE,
            "latency",
            "--duration",
            "1",
        ])
        .output()
        .expect("setpriv runs");
    let dropped = Command::new("capsh")
        .args([
            "--drop=cap_bpf,cap_perfmon,cap_sys_admin",
            "--",
            "-c",
            &format!("{} hooks", common::VTRACE),
        ])
        .output()
        .expect("capsh runs");
    for (who, out) in [("nobody", as_nobody), ("root without CAP_BPF", dropped)] {
        let err = String::from_utf8_lossy(&out.stderr);
        println!("{who}: {err}");
        assert!(!out.status.success(), "{who}: must fail");
        assert_eq!(err.trim().lines().count(), 1, "{who}: one line: {err}");
        assert!(
            err.contains("CAP_BPF") && err.contains("setcap"),
            "{who}: names the capability and the fix: {err}"
        );
        assert!(out.stdout.is_empty());
    }
    assert_eq!(common::vtrace_programs_loaded(), before, "nothing attached");
}

#[test]
fn bad_input_gets_one_line_and_a_non_zero_exit() {
    let dir = std::env::temp_dir().join(format!("vtrace-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corrupt = dir.join("corrupt.json");
    std::fs::write(&corrupt, "{\"duration_s\": 1, \"edges\": [").unwrap();
    let c = corrupt.to_str().unwrap();
    for args in [
        vec!["compare", "/nonexistent/a.json", "/nonexistent/b.json"],
        vec!["compare", c, c],
        vec!["latency", "--iface", "a-name-too-long-for-linux"],
        vec!["latency", "--duration", "soon"],
        vec!["drops", "--interval", "0"],
        vec!["nonsense"],
    ] {
        let out = common::run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{args:?}: {err}"
        );
        let first = err.lines().next().unwrap_or("");
        assert!(
            first.starts_with("vtrace:") || first.starts_with("error:"),
            "{args:?}: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Everything vtrace attaches is a bpf link owned by the process: SIGKILL leaves nothing.
#[test]
fn kill_9_leaves_nothing_attached() {
    let before = common::vtrace_programs_loaded();
    let running = common::start(&["latency", "--duration", "60"]);
    assert!(
        common::vtrace_programs_loaded() >= before + 10,
        "the hooks are loaded while it runs"
    );
    running.kill9();
    assert_eq!(common::wait_unloaded(5), 0, "programs remain after kill -9");
}

/// SIGTERM and SIGINT stop it promptly, with its final report.
#[test]
fn sigterm_and_sigint_detach_within_a_second() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let running = common::start(&["latency", "--json", "--duration", "60"]);
        let t = std::time::Instant::now();
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(running.pid() as i32, sig) };
        let out = running.finish();
        let took = t.elapsed();
        assert!(took < Duration::from_secs(1), "signal {sig}: took {took:?}");
        let v: Value = serde_json::from_str(&out).expect("final report on signal");
        assert!(v["duration_s"].as_f64().unwrap() < 5.0);
        assert_eq!(common::wait_unloaded(5), 0);
    }
}

/// Where the function tier is refused (fentry EPERM, no kprobes here), tracing commands say so
/// in one line, run on the tracepoint tier (tp_btf, as `vtrace hooks` found it), and keep
/// nothing of the refused tier loaded.
#[test]
fn tracing_degrades_to_the_tracepoint_tier_with_a_notice() {
    let hooks: Value = serde_json::from_slice(&common::run(&["hooks", "--json"]).stdout).unwrap();
    let hooks = hooks["hooks"].as_array().unwrap().clone();
    let fentry_refused_here = hooks.iter().any(|h| h["errno"] == "EPERM");
    let running = common::start(&["latency", "--duration", "3", "--json"]);
    // While it runs: the tracepoint programs are loaded, no function-tier program is.
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .unwrap();
    let progs: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = progs
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    let function_progs = names.iter().filter(|n| n.starts_with("vt_fn_")).count();
    if fentry_refused_here {
        assert_eq!(
            function_progs, 0,
            "refused function hooks left loaded: {names:?}"
        );
    } else {
        println!(
            "note: this kernel allows fentry; {function_progs} function-tier programs attached"
        );
    }
    let out = running.finish();
    assert!(serde_json::from_str::<Value>(&out).is_ok());
    assert_eq!(common::wait_unloaded(5), 0);
}

/// The notice itself, and that the tracepoint hooks attach as `vtrace hooks` said they can.
#[test]
fn the_function_tier_notice_and_the_tracepoint_attachments() {
    let hooks: Value = serde_json::from_slice(&common::run(&["hooks", "--json"]).stdout).unwrap();
    let hooks = hooks["hooks"].as_array().unwrap().clone();
    let out = common::run(&["latency", "--duration", "1", "--json"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let notice: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("function tier:"))
        .collect();
    assert_eq!(notice.len(), 1, "one line about the function tier: {err}");
    if hooks.iter().any(|h| h["errno"] == "EPERM") {
        assert!(notice[0].contains("0 of 9 hooks in use"), "{err}");
        assert!(notice[0].contains("stable tracepoint tier only"), "{err}");
        assert!(notice[0].contains("EPERM"), "the reason is named: {err}");
    }
    let attached = err
        .lines()
        .find(|l| l.contains("vtrace: attached"))
        .expect("attached line");
    for h in hooks
        .iter()
        .filter(|h| h["tier"] == "tracepoint" && h["via"].is_string())
    {
        let want = format!(
            "{}({})",
            h["hook"].as_str().unwrap(),
            h["via"].as_str().unwrap()
        );
        assert!(attached.contains(&want), "{want} expected in: {attached}");
    }
}
