//! Helpers for the integration tests: run the real `vtrace` binary against real namespaces,
//! devices and traffic made by the lab (vtrace-lab), and check what stays in the kernel.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

pub const VTRACE: &str = env!("CARGO_BIN_EXE_vtrace");

/// A running vtrace, started and attached.
pub struct Running {
    child: Child,
    stderr: mpsc::Receiver<String>,
}

/// Starts vtrace and returns once it says its hooks are attached.
pub fn start(args: &[&str]) -> Running {
    start_with_env(args, &[])
}

/// `start` with extra environment variables.
pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Running {
    let mut child = Command::new(VTRACE)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vtrace starts");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut ready = Some(ready_tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with("vtrace: attached") {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            }
            let _ = tx.send(line);
        }
    });
    if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
        let _ = child.kill();
        let out = child.wait_with_output().expect("wait");
        let err: Vec<String> = rx.try_iter().collect();
        panic!("vtrace did not attach: {:?} {}", out.status, err.join("\n"));
    }
    Running { child, stderr: rx }
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for vtrace to end by itself (`--duration`) and returns stdout.
    pub fn finish(self) -> String {
        self.finish_with_stderr().0
    }

    /// Waits for vtrace to end by itself and returns stdout and the lines of stderr.
    pub fn finish_with_stderr(mut self) -> (String, Vec<String>) {
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .expect("piped")
            .read_to_string(&mut out)
            .expect("read stdout");
        let status = self.child.wait().expect("wait");
        let err: Vec<String> = self.stderr.try_iter().collect();
        assert!(
            status.success(),
            "vtrace failed: {status:?}\n{}",
            err.join("\n")
        );
        (out, err)
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs vtrace to completion.
pub fn run(args: &[&str]) -> Output {
    Command::new(VTRACE)
        .args(args)
        .output()
        .expect("vtrace runs")
}

/// vtrace programs loaded in the kernel right now (bpftool shows names cut to 15 characters).
pub fn vtrace_programs_loaded() -> usize {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool runs");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool prints JSON");
    v.as_array()
        .map(|a| {
            a.iter()
                .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("vt_")))
                .count()
        })
        .unwrap_or(0)
}

/// Waits up to `secs` for no vtrace program to remain (the kernel frees them asynchronously).
pub fn wait_unloaded(secs: u64) -> usize {
    let mut n = vtrace_programs_loaded();
    for _ in 0..secs * 10 {
        if n == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        n = vtrace_programs_loaded();
    }
    n
}

/// `hook@iface` of a hop in a `vtrace latency --json` report.
pub fn hop_name(h: &serde_json::Value) -> String {
    format!(
        "{}@{}",
        h["hook"].as_str().unwrap_or(""),
        h["iface"].as_str().unwrap_or("")
    )
}

/// The `hook@iface` names of a path's hops.
pub fn path_hops(path: &serde_json::Value) -> Vec<String> {
    path["hops"]
        .as_array()
        .expect("hops")
        .iter()
        .map(hop_name)
        .collect()
}

/// Count-weighted mean of the report's paths that start at `from_iface` and reach `to_iface`,
/// and how many packets took them.
pub fn path_mean(report: &serde_json::Value, from_iface: &str, to_iface: &str) -> (f64, u64) {
    let mut sum = 0.0;
    let mut n = 0u64;
    for p in report["paths"].as_array().expect("paths") {
        let hops = p["hops"].as_array().expect("hops");
        let starts = hops.first().is_some_and(|h| h["iface"] == from_iface);
        let reaches = hops.iter().any(|h| h["iface"] == to_iface);
        if starts && reaches {
            let c = p["count"].as_u64().unwrap_or(0);
            sum += p["mean_ns"].as_f64().unwrap_or(0.0) * c as f64;
            n += c;
        }
    }
    assert!(n > 0, "no path from {from_iface} to {to_iface} in {report}");
    (sum / n as f64, n)
}

/// Runs `vtrace latency --json` for ICMP to `dst` while pinging it from namespace `sender`
/// (`count` pings, 20 ms apart); returns the report and ping's figures.
pub fn trace_pings(
    sender: &str,
    dst: std::net::Ipv4Addr,
    count: u32,
    extra: &[&str],
) -> (serde_json::Value, vtrace_lab::PingStats) {
    let (report, stats, _) = trace_pings_with_env(sender, dst, count, extra, &[]);
    (report, stats)
}

/// `trace_pings` with extra environment variables for vtrace; also returns its stderr lines.
pub fn trace_pings_with_env(
    sender: &str,
    dst: std::net::Ipv4Addr,
    count: u32,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (serde_json::Value, vtrace_lab::PingStats, Vec<String>) {
    let secs = (count as f64 * 0.02 + 3.0).ceil().to_string();
    let host = dst.to_string();
    let mut args = vec![
        "latency",
        "--json",
        "--proto",
        "icmp",
        "--host",
        &host,
        "--duration",
        &secs,
    ];
    args.extend_from_slice(extra);
    let tracer = start_with_env(&args, env);
    let stats = vtrace_lab::ping(sender, dst, count, Duration::from_millis(20)).expect("ping runs");
    let (out, stderr) = tracer.finish_with_stderr();
    let report = serde_json::from_str(&out).expect("one JSON object");
    (report, stats, stderr)
}
