//! `cargo xtask demo`: the main job on a built-in default. Brings up the lab, pings across the
//! native path (netns — bridge — netns) and the virtual path (netns — bridge — tap ⇄ VMM ⇄ tap —
//! bridge — netns) under vtrace, prints the per-stage breakdown of each and their comparison
//! next to the reference paper's Table III, then floods the virtual path with 64-byte packets
//! while the VMM reads slowly and shows where the drops happen. Tears everything down.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use vtrace_lab::{flood, ping, FloodOptions, Lab, LabOptions, VmmOptions};

pub fn run(seconds: u64) -> Result<()> {
    crate::require_root("the demo builds network namespaces and loads eBPF programs")?;
    let root = workspace_root();
    let vtrace = build_vtrace()?;
    let out_dir = root.join("target/demo");
    std::fs::create_dir_all(&out_dir)?;

    step("bringing up the lab (native and virtual paths, addresses in 198.18.0.0/15)");
    let lab = Lab::up(LabOptions::new())?;
    let (native, virt) = (lab.native().clone(), lab.virt().clone());
    println!(
        "  native:  {} -> bridge {} -> {}",
        native.sender_ns, native.bridge, native.receiver_ns
    );
    println!(
        "  virtual: {} -> bridge {} -> tap {} => VMM => tap {} -> bridge {} -> {}",
        virt.sender_ns,
        virt.bridge_in,
        virt.tap_in,
        virt.tap_out,
        virt.bridge_out,
        virt.receiver_ns
    );

    let count = (seconds * 10).max(10) as u32;
    let interval = Duration::from_millis(100);
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
                "virtual",
                "the virtual path",
                virt.sender_ns.as_str(),
                virt.receiver_ip,
            ),
        ],
        count,
        interval,
        seconds + 2,
    )?;
    println!("\n  this machine's Table III (ping RTT over the router, mean):");
    println!("    {:<28} {:>10} {:>10}", "", "native", "virtual");
    println!(
        "    {:<28} {:>10.3} {:>10.3}",
        "this lab (ms, measured)", rtts[0], rtts[1]
    );
    println!(
        "    {:<28} {:>10.3} {:>10.3}",
        "paper, Xen 3.2, idle (ms)",
        crate::vm_demo::PAPER_NATIVE_MS,
        crate::vm_demo::PAPER_VR_MS.1
    );
    drop(lab);

    step("64-byte flood across the virtual path while the VMM reads its tap slowly");
    let slow = Lab::up(LabOptions::new().with_vmm(VmmOptions {
        read_pause: Duration::from_micros(50),
        tap_queue_len: Some(64),
        ..VmmOptions::default()
    }))?;
    let v = slow.virt().clone();
    let devices = [
        &v.tap_in,
        &v.tap_out,
        &v.sender_veth,
        &v.receiver_veth,
        &v.bridge_in,
        &v.bridge_out,
    ];
    let (report, table) = flood_under_drops(
        &vtrace,
        &out_dir.join("drops.json"),
        (&v.sender_ns, &v.receiver_ns, v.receiver_ip),
        &devices.map(|d| d.as_str()),
        seconds,
    )?;
    println!(
        "  flood: {:.0} pps sent, {:.0} pps received ({:.0}% lost; the paper's Table II saw 60-96% with 64-byte packets on Xen 3.2)",
        report.sent_pps,
        report.received_pps,
        100.0 * (1.0 - report.received as f64 / report.sent.max(1) as f64)
    );
    println!("{table}");
    drop(slow);
    step(&format!("done; JSON reports are in {}", out_dir.display()));
    Ok(())
}

/// For each path (name, description, sender namespace, destination): pings under
/// `vtrace latency -o <name>.json` and prints the breakdown; then prints `vtrace compare` of the
/// first against the second. Returns ping's mean RTT of each (ms).
pub(crate) fn ping_and_compare(
    vtrace: &Path,
    out_dir: &Path,
    paths: [(&str, &str, &str, std::net::Ipv4Addr); 2],
    count: u32,
    interval: Duration,
    trace_secs: u64,
) -> Result<Vec<f64>> {
    let mut rtts = Vec::new();
    for (name, what, sender, dst) in paths {
        step(&format!(
            "tracing {count} pings across {what}: vtrace latency -o {name}.json"
        ));
        let json = out_dir.join(format!("{name}.json"));
        rtts.push(trace_pings(
            vtrace, &json, sender, dst, count, interval, trace_secs,
        )?);
    }
    let (a, b) = (paths[0].0, paths[1].0);
    step(&format!(
        "where {}'s extra time goes: vtrace compare {a}.json {b}.json",
        paths[1].1
    ));
    let cmp = Command::new(vtrace)
        .arg("compare")
        .arg(out_dir.join(format!("{a}.json")))
        .arg(out_dir.join(format!("{b}.json")))
        .output()
        .context("running vtrace compare")?;
    print!("{}", String::from_utf8_lossy(&cmp.stdout));
    eprint!("{}", String::from_utf8_lossy(&cmp.stderr));
    Ok(rtts)
}

/// Floods `dst` (in `receiver`) from `sender` with 64-byte UDP for `seconds` while `vtrace
/// drops` watches the lab's own `devices` (other traffic on the host stays out of the table);
/// writes the JSON report to `json`, returns the flood's figures and vtrace's table.
pub(crate) fn flood_under_drops(
    vtrace: &Path,
    json: &Path,
    (sender, receiver, dst): (&str, &str, std::net::Ipv4Addr),
    devices: &[&str],
    seconds: u64,
) -> Result<(vtrace_lab::FloodReport, String)> {
    let trace_secs = (seconds + 2).to_string();
    let mut args = vec![
        "drops",
        "--duration",
        &trace_secs,
        "--interval",
        "3600",
        "-o",
        json.to_str().unwrap_or_default(),
    ];
    for d in devices {
        args.extend(["--iface", d]);
    }
    let tracer = start_vtrace(vtrace, &args)?;
    let report = flood(FloodOptions {
        duration: Duration::from_secs(seconds),
        ..FloodOptions::new(sender, receiver, SocketAddrV4::new(dst, 9000))
    })?;
    Ok((report, finish(tracer)?))
}

/// Pings `dst` from namespace `sender` while `vtrace latency` traces ICMP to it, writing the
/// JSON report to `json`; prints vtrace's table and ping's summary, returns ping's mean RTT (ms).
pub(crate) fn trace_pings(
    vtrace: &Path,
    json: &Path,
    sender: &str,
    dst: std::net::Ipv4Addr,
    count: u32,
    interval: Duration,
    trace_secs: u64,
) -> Result<f64> {
    let tracer = start_vtrace(
        vtrace,
        &[
            "latency",
            "--proto",
            "icmp",
            "--host",
            &dst.to_string(),
            "--duration",
            &trace_secs.to_string(),
            "--interval",
            "3600",
            "--top",
            "2",
            "-o",
            json.to_str().unwrap_or_default(),
        ],
    )?;
    let stats = ping(sender, dst, count, interval)?;
    let table = finish(tracer)?;
    println!("{table}");
    let rtt = stats.rtt.map(|r| r.avg_ms).unwrap_or(f64::NAN);
    println!(
        "  ping: {} sent, {} received, mean RTT {rtt:.3} ms",
        stats.transmitted, stats.received
    );
    Ok(rtt)
}

/// Builds the release vtrace binary and returns its path.
pub(crate) fn build_vtrace() -> Result<PathBuf> {
    step("building vtrace (release)");
    let root = workspace_root();
    let st = Command::new(crate::cargo())
        .args(["build", "--release", "-p", "vtrace"])
        .current_dir(&root)
        .status()?;
    if !st.success() {
        bail!("cargo build failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release/vtrace"))
}

pub(crate) fn step(what: &str) {
    println!("\n==> {what}");
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A vtrace run by a job: killed (and reaped) if the job ends before it does, so no error
/// path of a job leaves a tracer attached.
pub(crate) struct Vtrace {
    child: Option<Child>,
}

impl Vtrace {
    pub(crate) fn id(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }
}

impl Drop for Vtrace {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts vtrace and waits (at most 60 s) until it says its hooks are attached.
pub(crate) fn start_vtrace(bin: &Path, args: &[&str]) -> Result<Vtrace> {
    let mut child = Command::new(bin)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stderr = child.stderr.take().context("vtrace stderr")?;
    let run = Vtrace { child: Some(child) };
    // stderr is read on a thread of its own (echoed), so that vtrace never blocks on it and
    // the wait for "attached" can time out.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut ready = Some(ready_tx);
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            if l.starts_with("vtrace: attached") {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            } else {
                eprintln!("{l}");
            }
        }
    });
    match ready_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => Ok(run),
        Err(_) => bail!(
            "vtrace {} did not attach (see its messages above)",
            args.join(" ")
        ),
    }
}

/// Waits for vtrace to end by itself and returns what it printed.
pub(crate) fn finish(mut run: Vtrace) -> Result<String> {
    let child = run.child.take().context("vtrace already ended")?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("vtrace failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}
