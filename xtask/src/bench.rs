//! `cargo xtask bench`: what attaching vtrace costs, measured side by side in one run on the lab.
//!
//! - 64-byte UDP packets per second received across the native and the virtual path, without
//!   and with vtrace, in alternating off/on pairs; the median of the per-pair ratios is
//!   reported. "On" is `vtrace serve` with its defaults (the latency hooks and the drop counters
//!   in one process, 1 packet in 64 timed), what a host watched by Prometheus runs; each pair
//!   also measures `latency --sample 16` + `drops` (two processes, four times the samples).
//! - The same rate with empty programs at the same tracepoints (`vtrace baseline --no-stats`):
//!   the floor of any tracer attached there, so vtrace's own share of the loss is visible.
//! - ns per hook invocation from the kernel's BPF statistics (`vtrace latency --cost`), next to
//!   an empty program at the same hook in the same run (`vtrace baseline`): the difference is
//!   vtrace's own cost.
//! - vtrace's CPU (user + system, share of one core) and peak memory, and its lost events.
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

/// A denser sample than `vtrace serve`'s default (1 in 64), measured with `latency` and `drops`
/// in the same pairs: what timing four times more packets in two processes costs.
const DENSE_SAMPLE: &str = "16";
/// `vtrace serve`'s default sample, at which the per-hook cost is measured.
const SERVE_SAMPLE: &str = "64";

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
    dense_rss_kib: u64,
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
            dense_rss_kib: 0,
            lost: 0,
        };
        for i in 0..pairs {
            step(&format!("{name} path: pair {}/{pairs}", i + 1));
            let off = flood(opts.clone())?;
            let secs = (seconds + 2).to_string();
            // The production configuration: `vtrace serve` with its defaults (every latency hook
            // and the drop counters in one process, 1 packet in 64 timed), scraped at the end
            // for its lost events.
            let (on, cpu) = {
                let port = free_port()?;
                let listen = format!("127.0.0.1:{port}");
                let serve = start_vtrace(&vtrace, &["serve", "--listen", &listen, "-d", &secs])?;
                let cpu0 = cpu_ticks(&serve);
                let t0 = std::time::Instant::now();
                let on = flood(opts.clone())?;
                let cpu = (cpu_ticks(&serve) - cpu0) as f64
                    / ticks_per_sec()
                    / t0.elapsed().as_secs_f64();
                r.rss_kib = r.rss_kib.max(peak_rss_kib(&serve));
                r.lost += scrape_lost_events(port)?;
                let _ = finish(serve)?;
                (on.received_pps, cpu)
            };
            // `latency` + `drops`, two processes with their default hooks, at 1 in 16.
            let (dense_on, dense_cpu) = {
                let lat = start_vtrace(
                    &vtrace,
                    &[
                        "latency",
                        "--json",
                        "--sample",
                        DENSE_SAMPLE,
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
                r.dense_rss_kib = r
                    .dense_rss_kib
                    .max(peak_rss_kib(&lat) + peak_rss_kib(&drops));
                let report: Value =
                    serde_json::from_str(&finish(lat)?).context("vtrace latency JSON")?;
                let _ = finish(drops)?;
                r.lost += report["lost_events"].as_u64().unwrap_or(0);
                (on.received_pps, cpu)
            };
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
            SERVE_SAMPLE,
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
        "\n{:<8} {:>9} {:>9} {:>6} {:>6} {:>9} {:>10} {:>8} {:>10} {:>11} {:>6}",
        "path",
        "pps off",
        "pps on",
        "ratio",
        "CPU",
        "peak RSS",
        "ratio 1/16",
        "CPU 1/16",
        "RSS 1/16",
        "empty ratio",
        "lost"
    );
    for r in &results {
        let ratio_of = |v: &[f64]| {
            let ratios: Vec<f64> = v.iter().zip(&r.off).map(|(a, b)| a / b.max(1.0)).collect();
            median(&ratios)
        };
        println!(
            "{:<8} {:>9.0} {:>9.0} {:>6.3} {:>5.1}% {:>6}MiB {:>10.3} {:>7.1}% {:>7}MiB {:>11.3} {:>6}",
            r.name,
            median(&r.off),
            median(&r.on),
            ratio_of(&r.on),
            100.0 * median(&r.cpu),
            r.rss_kib / 1024,
            ratio_of(&r.dense_on),
            100.0 * median(&r.dense_cpu),
            r.dense_rss_kib / 1024,
            ratio_of(&r.floor),
            r.lost
        );
    }
    println!("(pps: median of {pairs} alternating off/on pairs of {seconds} s; ratio: median of the per-pair ratios; target >= 0.95)");
    println!("(on: `vtrace serve` with its defaults (latency hooks and drop counters, 1 in 64 timed); 1/16: `vtrace latency --sample {DENSE_SAMPLE}` + `vtrace drops`, two processes)");
    println!("(CPU: vtrace's user + system time, share of one core, target <= 5%; lost: events lost in all runs)");
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
    println!("(targets: <= 30 ns for a hop that only counts, <= 150 ns for a sampled hop; `latency --cost --sample {SERVE_SAMPLE}`, the virtual path)");
    match bpftrace {
        Some(ratio) => {
            println!("\nbpftrace on 4 of the same tracepoints: pps ratio {ratio:.3} (virtual path)")
        }
        None => println!("\nbpftrace is not installed: its reference ratio was not measured"),
    }
    Ok(())
}

/// A port free on loopback now, for `serve --listen` (the kernel picks it).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// `vtrace_lost_events_total` from a running `vtrace serve` on this port.
fn scrape_lost_events(port: u16) -> Result<u64> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).context("scraping serve")?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut body = String::new();
    c.read_to_string(&mut body)?;
    body.lines()
        .find_map(|l| l.strip_prefix("vtrace_lost_events_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .context("serve's metrics have no vtrace_lost_events_total")
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
