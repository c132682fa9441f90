//! `cargo xtask bench`: what attaching vtrace costs, measured side by side in one run on the lab.
//!
//! - 64-byte UDP packets per second received across the native and the virtual path, without
//!   and with vtrace (`latency` + `drops`, their default hooks), in alternating off/on pairs;
//!   the median of the per-pair ratios is reported.
//! - The same rate with empty programs at the same tracepoints (`vtrace baseline --no-stats`):
//!   the floor of any tracer attached there, so vtrace's own share of the loss is visible.
//! - ns per hook invocation from the kernel's BPF statistics (`vtrace latency --cost`), next to
//!   an empty program at the same hook in the same run (`vtrace baseline`): the difference is
//!   vtrace's own cost.
//! - vtrace's user-space CPU (share of one core) and peak memory, and its lost events.
//! - The same pps ratio for an equivalent bpftrace script, when bpftrace is installed.
//!
//! Figures, not assertions: this machine is noisy, so targets are read from the table.

use std::{
    net::SocketAddrV4,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::Value;
use vtrace_lab::{flood, FloodOptions, Lab, LabOptions};

use crate::demo::{build_vtrace, finish, start_vtrace, step, Vtrace};

/// Sampling used for the "on" runs: what `vtrace serve` runs with by default.
const SAMPLE: &str = "64";
/// A denser sample, measured in the same pairs: what timing four times more packets costs.
const DENSE_SAMPLE: &str = "16";

struct PathRuns {
    name: &'static str,
    off: Vec<f64>,
    on: Vec<f64>,
    /// With empty programs at the same tracepoints: the floor any tracer there pays.
    floor: Vec<f64>,
    cpu: Vec<f64>,
    /// The same "on" run at `DENSE_SAMPLE`.
    dense_on: Vec<f64>,
    dense_cpu: Vec<f64>,
    rss_kib: u64,
    lost: u64,
}

pub fn run(pairs: usize, seconds: u64) -> Result<()> {
    crate::require_root("the bench builds network namespaces and loads eBPF programs")?;
    let vtrace = build_vtrace()?;
    step("bringing up the lab");
    let lab = Lab::up(LabOptions::new())?;
    let (n, v) = (lab.native().clone(), lab.virt().clone());
    let dur = Duration::from_secs(seconds);
    let mut results = Vec::new();
    for (name, sender, receiver, dst) in [
        ("native", &n.sender_ns, &n.receiver_ns, n.receiver_ip),
        ("virtual", &v.sender_ns, &v.receiver_ns, v.receiver_ip),
    ] {
        let opts = FloodOptions {
            duration: dur,
            ..FloodOptions::new(
                sender.clone(),
                receiver.clone(),
                SocketAddrV4::new(dst, 9000),
            )
        };
        let mut r = PathRuns {
            name,
            off: vec![],
            on: vec![],
            floor: vec![],
            cpu: vec![],
            dense_on: vec![],
            dense_cpu: vec![],
            rss_kib: 0,
            lost: 0,
        };
        for i in 0..pairs {
            step(&format!("{name} path: pair {}/{pairs}", i + 1));
            let off = flood(opts.clone())?;
            let secs = (seconds + 2).to_string();
            // latency + drops with their default hooks, at one sample rate: pps, CPU, memory.
            let mut traced = |sample: &str| -> Result<(f64, f64)> {
                let lat = start_vtrace(
                    &vtrace,
                    &[
                        "latency",
                        "--json",
                        "--sample",
                        sample,
                        "-d",
                        &secs,
                        "--interval",
                        "3600",
                    ],
                )?;
                let drops = start_vtrace(
                    &vtrace,
                    &["drops", "--json", "-d", &secs, "--interval", "3600"],
                )?;
                let cpu0 = cpu_ticks(&lat) + cpu_ticks(&drops);
                let t0 = std::time::Instant::now();
                let on = flood(opts.clone())?;
                let cpu = (cpu_ticks(&lat) + cpu_ticks(&drops) - cpu0) as f64
                    / ticks_per_sec()
                    / t0.elapsed().as_secs_f64();
                r.rss_kib = r.rss_kib.max(peak_rss_kib(&lat) + peak_rss_kib(&drops));
                let report: Value =
                    serde_json::from_str(&finish(lat)?).context("vtrace latency JSON")?;
                let _ = finish(drops)?;
                r.lost += report["lost_events"].as_u64().unwrap_or(0);
                Ok((on.received_pps, cpu))
            };
            let (on, cpu) = traced(SAMPLE)?;
            let (dense_on, dense_cpu) = traced(DENSE_SAMPLE)?;
            let empty = start_vtrace(&vtrace, &["baseline", "--no-stats", "-d", &secs])?;
            let floor = flood(opts.clone())?;
            let _ = finish(empty)?;
            let ratio = |pps: f64| pps / off.received_pps.max(1.0);
            println!(
                "  off {:>9.0} pps   on {:>9.0} pps ({:.3}, CPU {:.1}%)   at 1/{DENSE_SAMPLE} {:>9.0} pps ({:.3}, CPU {:.1}%)   empty programs {:>9.0} pps ({:.3})",
                off.received_pps,
                on,
                ratio(on),
                100.0 * cpu,
                dense_on,
                ratio(dense_on),
                100.0 * dense_cpu,
                floor.received_pps,
                ratio(floor.received_pps),
            );
            r.off.push(off.received_pps);
            r.on.push(on);
            r.floor.push(floor.received_pps);
            r.cpu.push(cpu);
            r.dense_on.push(dense_on);
            r.dense_cpu.push(dense_cpu);
        }
        results.push(r);
    }

    step("ns per hook invocation: vtrace vs an empty program at the same hook, same run");
    let secs = (seconds + 2).to_string();
    let base = start_vtrace(&vtrace, &["baseline", "-d", &secs])?;
    let lat = start_vtrace(
        &vtrace,
        &[
            "latency",
            "--json",
            "--cost",
            "--sample",
            SAMPLE,
            "-d",
            &secs,
            "--interval",
            "3600",
        ],
    )?;
    flood(FloodOptions {
        duration: dur,
        ..FloodOptions::new(
            v.sender_ns.clone(),
            v.receiver_ns.clone(),
            SocketAddrV4::new(v.receiver_ip, 9000),
        )
    })?;
    let report: Value = serde_json::from_str(&finish(lat)?)?;
    let empty: Value = serde_json::from_str(&finish(base)?)?;
    let bpftrace = bpftrace_ratio(&v, dur)?;
    drop(lab);

    println!(
        "\n{:<10} {:>10} {:>10} {:>7} {:>9} {:>11} {:>7} {:>9} {:>11} {:>12}",
        "path",
        "pps off",
        "pps on",
        "ratio",
        "user CPU",
        "ratio 1/16",
        "CPU 1/16",
        "empty ratio",
        "peak RSS",
        "lost events"
    );
    for r in &results {
        let ratio_of = |v: &[f64]| {
            let ratios: Vec<f64> = v.iter().zip(&r.off).map(|(a, b)| a / b.max(1.0)).collect();
            median(&ratios)
        };
        println!(
            "{:<10} {:>10.0} {:>10.0} {:>7.3} {:>8.1}% {:>11.3} {:>7.1}% {:>11.3} {:>8}KiB {:>12}",
            r.name,
            median(&r.off),
            median(&r.on),
            ratio_of(&r.on),
            100.0 * median(&r.cpu),
            ratio_of(&r.dense_on),
            100.0 * median(&r.dense_cpu),
            ratio_of(&r.floor),
            r.rss_kib,
            r.lost
        );
    }
    println!("(pps: median of {pairs} alternating off/on pairs of {seconds} s; ratio: median of the per-pair ratios; target >= 0.95)");
    println!("(on: latency --sample {SAMPLE} (serve's default) + drops; 1/16: the same with --sample {DENSE_SAMPLE}; user CPU: share of one core, target <= 5%)");
    println!("(empty ratio: the same flood with an empty program at each of the same tracepoints: the floor any tracer attached there pays)");
    println!(
        "\n{:<26} {:>12} {:>12} {:>12} {:>12}",
        "hook", "runs", "vtrace ns", "empty ns", "cost ns"
    );
    for c in report["cost"].as_array().into_iter().flatten() {
        let hook = c["hook"].as_str().unwrap_or("");
        let e = empty
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["hook"] == hook);
        let (ns, ens) = (
            c["ns_per_run"].as_f64().unwrap_or(0.0),
            e.and_then(|e| e["ns_per_run"].as_f64()).unwrap_or(0.0),
        );
        println!(
            "{:<26} {:>12} {:>12.1} {:>12.1} {:>12.1}",
            hook,
            c["runs"],
            ns,
            ens,
            ns - ens
        );
    }
    println!("(targets: <= 30 ns for a hop that only counts, <= 150 ns for a sampled hop; sample 1 in {SAMPLE})");
    match bpftrace {
        Some(ratio) => {
            println!("\nbpftrace on 4 of the same tracepoints: pps ratio {ratio:.3} (virtual path)")
        }
        None => println!("\nbpftrace is not installed: its reference ratio was not measured"),
    }
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// utime + stime of a process, in clock ticks (/proc/PID/stat fields 14 and 15).
fn cpu_ticks(child: &Vtrace) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap_or_default();
    // The command name may hold spaces: count fields after its closing parenthesis.
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn peak_rss_kib(child: &Vtrace) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", child.id()))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The reference: a naive bpftrace script on four of the same tracepoints, when installed.
fn bpftrace_ratio(v: &vtrace_lab::VirtualPath, dur: Duration) -> Result<Option<f64>> {
    if !Path::new("/usr/bin/bpftrace").exists() && !Path::new("/usr/sbin/bpftrace").exists() {
        return Ok(None);
    }
    let opts = FloodOptions {
        duration: dur,
        ..FloodOptions::new(
            v.sender_ns.clone(),
            v.receiver_ns.clone(),
            SocketAddrV4::new(v.receiver_ip, 9000),
        )
    };
    let off = flood(opts.clone())?;
    let script = "tracepoint:net:netif_receive_skb,tracepoint:net:net_dev_queue,tracepoint:net:net_dev_xmit,tracepoint:skb:consume_skb { @[probe] = count(); @t[args.skbaddr] = nsecs; }";
    let mut bt = Command::new("bpftrace")
        .args(["-e", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting bpftrace")?;
    // Only a bpftrace that says it attached is measured: otherwise the ratio would be ~1.
    let out = bt.stdout.take().context("bpftrace stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if l.starts_with("Attaching") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(20)).is_err() {
        let _ = bt.kill();
        let _ = bt.wait();
        anyhow::bail!("bpftrace did not attach its probes");
    }
    let on = flood(opts)?;
    let _ = bt.kill();
    let _ = bt.wait();
    Ok(Some(on.received_pps / off.received_pps.max(1.0)))
}
