//! `vtrace serve` against the lab, `promtool` and a real Prometheus server. Everything listens
//! on 127.0.0.1 only. Needs root (run by `cargo xtask test`) and the Debian package
//! `prometheus` (installed by `cargo xtask setup`).

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use vtrace_lab::{ping, Lab, LabOptions};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

/// A tool the tests cannot do without: fail (never skip) when it is missing.
fn require_tool(path: &str) -> &str {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: run `cargo xtask setup` (it installs the Debian package prometheus, \
         which provides prometheus and promtool)"
    );
    path
}

/// A port free on 127.0.0.1 right now (the kernel picks it; the socket is closed again).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// IDs of the vtrace programs loaded now. IDs are never reused soon, so the programs of one
/// vtrace can be told from those of another running at the same time.
fn vt_program_ids() -> BTreeSet<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool runs");
    let v: Value = serde_json::from_slice(&out.stdout).expect("bpftool prints JSON");
    v.as_array()
        .map(|a| {
            a.iter()
                .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("vt_")))
                .filter_map(|p| p["id"].as_u64())
                .collect()
        })
        .unwrap_or_default()
}

/// A running `vtrace serve`; killed if a test fails before stopping it.
struct Exporter {
    running: Option<common::Running>,
    addr: SocketAddr,
    /// The programs this exporter loaded.
    programs: BTreeSet<u64>,
}

impl Exporter {
    fn start(extra: &[&str]) -> Exporter {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("address");
        let listen = addr.to_string();
        // --duration: a safety net should the test die without the guard running.
        let mut args = vec!["serve", "--listen", &listen, "--duration", "120"];
        args.extend_from_slice(extra);
        let before = vt_program_ids();
        let running = Some(common::start(&args));
        let programs: BTreeSet<u64> = vt_program_ids().difference(&before).copied().collect();
        assert!(
            programs.len() >= 10,
            "serve loads its 10 hooks: {programs:?}"
        );
        Exporter {
            running,
            addr,
            programs,
        }
    }

    /// SIGTERM; vtrace must exit 0 and leave none of its programs loaded.
    fn stop(mut self) {
        let running = self.running.take().expect("running");
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(running.pid() as i32, libc::SIGTERM) };
        running.finish();
        // The kernel frees programs asynchronously once the last reference is gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left: Vec<u64> = vt_program_ids()
                .intersection(&self.programs)
                .copied()
                .collect();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "programs {left:?} remain after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.kill9();
        }
    }
}

/// A plain HTTP/1.1 GET: (status, head, body).
fn http_get(addr: SocketAddr, target: &str) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: vtrace-test\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, head.to_string(), body.to_string()))
}

fn scrape(addr: SocketAddr) -> String {
    let (status, head, body) = http_get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "exposition format 0.0.4: {head}"
    );
    body
}

/// One sample line: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the samples of the text format (enough of it for these checks: label values with
/// escapes, no timestamps).
fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let name_end = line.find(['{', ' ']).expect("name");
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices();
            let mut key = String::new();
            let mut end = 0;
            while let Some((i, c)) = chars.next() {
                match c {
                    '}' => {
                        end = i + 1;
                        break;
                    }
                    ',' => {}
                    '=' => {
                        assert_eq!(chars.next().map(|x| x.1), Some('"'), "{line}");
                        let mut v = String::new();
                        loop {
                            match chars.next().expect("closing quote").1 {
                                '\\' => match chars.next().expect("escape").1 {
                                    'n' => v.push('\n'),
                                    c => v.push(c),
                                },
                                '"' => break,
                                c => v.push(c),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), v);
                    }
                    c => key.push(c),
                }
            }
            rest = &body[end..];
        }
        let value = rest
            .trim()
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("{line}"));
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// Sum of the edge histogram counts over the series starting at `iface`.
fn edge_count_from(s: &[Sample], iface: &str) -> f64 {
    s.iter()
        .filter(|x| x.name == "vtrace_edge_latency_seconds_count")
        .filter(|x| x.labels.get("from_iface").map(String::as_str) == Some(iface))
        .map(|x| x.value)
        .sum()
}

fn value_of(s: &[Sample], name: &str) -> Option<f64> {
    s.iter().find(|x| x.name == name).map(|x| x.value)
}

/// `promtool check metrics` on `text` (stdin): its verdict and everything it printed.
fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new(require_tool(PROMTOOL))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ends");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// The exporter on the lab: edges from the lab's tap with counts, every family present, valid
/// histograms, counters that do not go down, and `promtool check metrics` without a remark.
#[test]
fn scrape_shows_the_lab_edges_and_passes_promtool() {
    require_tool(PROMTOOL);
    let lab = Lab::up(LabOptions::new()).expect("lab up");
    let v = lab.virt().clone();
    let exporter = Exporter::start(&["--sample", "1"]);

    // The small pages first.
    let (status, _, body) = http_get(exporter.addr, "/").expect("GET /");
    assert_eq!(status, 200);
    assert!(body.contains("/metrics"), "{body}");
    let (status, _, _) = http_get(exporter.addr, "/nope").expect("GET /nope");
    assert_eq!(status, 404);

    let stats = ping(&v.sender_ns, v.receiver_ip, 50, Duration::from_millis(20)).expect("ping");
    assert_eq!(stats.received, 50, "every ping answered: {stats:?}");

    // Packets reach the histograms once their join window (1 s) has passed, at the next tick;
    // a path once every segment of it is finished.
    let deadline = Instant::now() + Duration::from_secs(15);
    let text = loop {
        let text = scrape(exporter.addr);
        let s = samples(&text);
        if edge_count_from(&s, &v.tap_in) > 0.0 && value_of(&s, "vtrace_paths") > Some(0.0) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no edge from {} after 15 s:\n{text}",
            v.tap_in
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let s = samples(&text);
    let from_tap = edge_count_from(&s, &v.tap_in);
    let families = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
    let edge_series = s
        .iter()
        .filter(|x| x.name == "vtrace_edge_latency_seconds_count")
        .count();
    println!(
        "scrape: {} bytes, {} samples in {families} families, {edge_series} edge histograms; {from_tap} edge observations from {}",
        text.len(),
        s.len(),
        v.tap_in
    );

    for family in [
        "vtrace_edge_latency_seconds histogram",
        "vtrace_hook_packets_total counter",
        "vtrace_sampled_packets_total counter",
        "vtrace_drops_total counter",
        "vtrace_lost_events_total counter",
        "vtrace_failed_map_inserts_total counter",
        "vtrace_process_cpu_seconds_total counter",
        "vtrace_process_resident_memory_bytes gauge",
        "vtrace_program_runs_total counter",
        "vtrace_program_run_seconds_total counter",
        "vtrace_paths gauge",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family}\n")),
            "{family} missing"
        );
    }
    assert!(value_of(&s, "vtrace_lost_events_total").is_some());
    assert!(value_of(&s, "vtrace_sampled_packets_total").unwrap_or(0.0) > 0.0);
    assert!(value_of(&s, "vtrace_paths").unwrap_or(0.0) > 0.0);
    assert!(value_of(&s, "vtrace_process_resident_memory_bytes").unwrap_or(0.0) > 0.0);
    let xmit = s
        .iter()
        .find(|x| {
            x.name == "vtrace_hook_packets_total"
                && x.labels.get("hook").map(String::as_str) == Some("net_dev_start_xmit")
        })
        .expect("net_dev_start_xmit counted");
    assert!(
        xmit.value >= 100.0,
        "at least the pings both ways: {xmit:?}"
    );

    // Every histogram: buckets non-decreasing in `le`, +Inf == _count.
    let mut hists: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for x in s
        .iter()
        .filter(|x| x.name == "vtrace_edge_latency_seconds_bucket")
    {
        let mut key = x.labels.clone();
        let le = key.remove("le").expect("le");
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().expect("le is a number")
        };
        hists
            .entry(format!("{key:?}"))
            .or_default()
            .push((le, x.value));
    }
    for x in s
        .iter()
        .filter(|x| x.name == "vtrace_edge_latency_seconds_count")
    {
        let b = &hists[&format!("{:?}", x.labels)];
        assert!(
            b.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{b:?}"
        );
        assert_eq!(b.last().map(|l| l.1), Some(x.value), "+Inf == _count");
    }

    // Counters never go down between scrapes.
    std::thread::sleep(Duration::from_millis(1200));
    let again = samples(&scrape(exporter.addr));
    assert!(edge_count_from(&again, &v.tap_in) >= from_tap);
    for x in s.iter().filter(|x| x.name.ends_with("_total")) {
        let later = again
            .iter()
            .find(|y| y.name == x.name && y.labels == x.labels)
            .unwrap_or_else(|| panic!("{x:?} gone"));
        assert!(later.value >= x.value, "{x:?} went down to {}", later.value);
    }

    let (ok, said) = promtool_check(&text);
    println!("promtool check metrics: ok={ok} {said:?}");
    assert!(ok, "promtool check metrics failed: {said}");
    assert!(said.trim().is_empty(), "promtool has remarks: {said}");

    exporter.stop();
}

/// A Prometheus server process with its own data directory; both gone on drop, also when the
/// test fails.
struct PrometheusServer {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl PrometheusServer {
    fn start(target: SocketAddr) -> PrometheusServer {
        let bin = require_tool(PROMETHEUS);
        let dir = std::env::temp_dir().join(format!(
            "vtrace-prometheus-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(dir.join("data")).expect("temp dir");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: vtrace\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write config");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("address");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        PrometheusServer { child, dir, addr }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    fn wait_ready(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok((200, _, _)) = http_get(self.addr, "/-/ready") {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("prometheus exited: {st}\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// An instant query: the `data.result` array.
    fn query(&self, promql: &str) -> Vec<Value> {
        let target = format!("/api/v1/query?query={}", percent_encode(promql));
        let (status, head, body) = http_get(self.addr, &target).expect("query");
        assert_eq!(status, 200, "{promql}: {head}\n{body}");
        let v: Value = serde_json::from_str(&body).expect("JSON answer");
        assert_eq!(v["status"], "success", "{promql}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The value of a one-element instant vector.
    fn scalar(&self, promql: &str) -> Option<f64> {
        self.query(promql)
            .first()
            .and_then(|r| r["value"][1].as_str().and_then(|s| s.parse().ok()))
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus scrapes the exporter every second: the target is up and the series are
/// queryable.
#[test]
fn prometheus_scrapes_the_exporter() {
    require_tool(PROMETHEUS);
    let lab = Lab::up(LabOptions::new()).expect("lab up");
    let v = lab.virt().clone();
    // The default sample (1 in 64): 600 pings each way time about 19 packets; the chance that
    // none of the 1,200 is sampled is below 1e-8.
    let exporter = Exporter::start(&[]);
    let mut prom = PrometheusServer::start(exporter.addr);
    prom.wait_ready(Duration::from_secs(30));

    let stats = ping(&v.sender_ns, v.receiver_ip, 600, Duration::from_millis(10)).expect("ping");
    assert_eq!(stats.received, 600, "every ping answered: {stats:?}");

    let deadline = Instant::now() + Duration::from_secs(20);
    let (up, lost, edges) = loop {
        let up = prom.scalar("up{job=\"vtrace\"}");
        let lost = prom.scalar("vtrace_lost_events_total");
        let edges = prom.scalar("sum(vtrace_edge_latency_seconds_count)");
        if up == Some(1.0) && lost.is_some() && edges.unwrap_or(0.0) > 0.0 {
            break (up, lost, edges);
        }
        assert!(
            Instant::now() < deadline,
            "after 20 s: up {up:?}, lost events {lost:?}, edge observations {edges:?}\ntargets: {:?}\n{}",
            prom.query("up"),
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let series = prom.scalar("count({job=\"vtrace\"})");
    let samples_scraped = prom.scalar("scrape_samples_scraped{job=\"vtrace\"}");
    let p50 = prom.scalar(
        "histogram_quantile(0.5, sum by (le) (vtrace_edge_latency_seconds_bucket{job=\"vtrace\"}))",
    );
    println!(
        "prometheus: up {up:?}, vtrace_lost_events_total {lost:?}, sum(edge counts) {edges:?}, \
         {series:?} series, {samples_scraped:?} samples per scrape, median edge {p50:?} s"
    );
    drop(prom);
    exporter.stop();
}

/// A taken or foreign --listen address: one line, non-zero exit, nothing loaded.
#[test]
fn bad_listen_address_fails_in_one_line_with_nothing_loaded() {
    let before = common::vtrace_programs_loaded();
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr").to_string();
    // 192.0.2.1 (TEST-NET-1) is on no interface here: EADDRNOTAVAIL.
    for (addr, expect) in [
        (taken_addr.as_str(), "in use"),
        ("192.0.2.1:9464", "assign"),
    ] {
        let out = common::run(&["serve", "--listen", addr, "--duration", "5"]);
        let err = String::from_utf8_lossy(&out.stderr);
        println!("--listen {addr}: {}", err.trim());
        assert!(!out.status.success(), "{addr}: must fail");
        assert_eq!(err.trim().lines().count(), 1, "{addr}: one line: {err}");
        assert!(
            err.starts_with("vtrace: cannot listen on") && err.contains(expect),
            "{addr}: {err}"
        );
        assert!(!err.contains("attached"), "{addr}: attached first: {err}");
        assert_eq!(
            common::vtrace_programs_loaded(),
            before,
            "{addr}: nothing loaded"
        );
    }
    drop(taken);
}
