//! `vtrace serve`: a long-lived Prometheus exporter.
//!
//! One current-thread runtime runs two things side by side: the tracing session (which drains
//! the ring buffer and, every second, folds what it read into a [`Snapshot`]), and a minimal
//! HTTP/1.1 responder that renders the latest snapshot on `GET /metrics` in the Prometheus text
//! exposition format 0.0.4. The responder never touches the tracer, so a slow or stuck scraper
//! cannot stop the ring buffer from being drained.
//!
//! Every counter is cumulative over the process life: the kernel counters and drop table are
//! never reset, and the per-edge HdrHistograms only ever grow. A restart of vtrace is a counter
//! reset, which Prometheus' `rate()` handles.

use std::{
    cell::RefCell,
    fmt::Write as _,
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use vtrace_common::{flags, Counter};

use crate::{
    cli::ServeArgs,
    cost::ProgramCost,
    drops::{DropEntry, Resolver},
    latency::{self, Pipeline},
    session::{self, Timing},
    tracer::{Counters, TracerOptions},
};

/// How often the snapshot is refreshed from the tracer.
const TICK: Duration = Duration::from_secs(1);
/// Connections served at once; more are closed at once (a scraper retries next interval).
const MAX_CONNECTIONS: usize = 32;
/// A request's head (request line and headers) must fit in this many bytes.
const MAX_REQUEST_HEAD: usize = 8192;
/// A client has this long to send its request and read the answer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The exposition format this module writes (the `version` parameter Prometheus checks).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds of the latency histogram buckets, in nanoseconds: 1 µs · 2^k, k = 0..=22
/// (1 µs to 4.19 s), then +Inf. Fixed, so series stay comparable across hosts and restarts.
const BUCKETS: usize = 23;
const fn bucket_bounds() -> [u64; BUCKETS] {
    let mut b = [0u64; BUCKETS];
    let mut k = 0;
    while k < BUCKETS {
        b[k] = 1000u64 << k;
        k += 1;
    }
    b
}
const BUCKET_NS: [u64; BUCKETS] = bucket_bounds();

/// One edge's histogram, as exported.
#[derive(Clone, Debug, PartialEq)]
struct EdgeSeries {
    from_hook: &'static str,
    from_iface: String,
    to_hook: &'static str,
    to_iface: String,
    /// Cumulative counts: observations <= `BUCKET_NS[i]`.
    buckets: [u64; BUCKETS],
    count: u64,
    sum_ns: u128,
}

/// What the tracer knew at the last tick; rendered per request.
#[derive(Clone, Debug, Default)]
struct Snapshot {
    counters: Counters,
    edges: Vec<EdgeSeries>,
    paths: usize,
    drops: Vec<DropEntry>,
    programs: Vec<ProgramCost>,
    sample_every: u32,
    /// Work functions of the function tier the run attached (see `work`).
    work: Vec<crate::work::WorkRow>,
}

/// Cumulative bucket counts and sum of one HdrHistogram.
///
/// HdrHistogram (3 significant digits) groups values into buckets 0.1% wide; each recorded
/// bucket is placed by its highest equivalent value, so a Prometheus bucket `le=B` never counts
/// an observation above B (exact below 2048 ns, where HdrHistogram buckets are 1 ns wide). The
/// sum uses each bucket's median equivalent value.
fn bucketize(h: &Histogram<u64>) -> ([u64; BUCKETS], u64, u128) {
    let mut per = [0u64; BUCKETS];
    let mut sum: u128 = 0;
    for v in h.iter_recorded() {
        let n = v.count_at_value();
        let top = v.value_iterated_to();
        sum += u128::from(n) * u128::from(h.median_equivalent(top));
        // Values above the last bound only count in +Inf (that is, in `count`).
        if let Some(i) = BUCKET_NS.iter().position(|b| top <= *b) {
            per[i] += n;
        }
    }
    let mut cumulative = [0u64; BUCKETS];
    let mut acc = 0u64;
    for i in 0..BUCKETS {
        acc += per[i];
        cumulative[i] = acc;
    }
    (cumulative, h.len(), sum)
}

/// Seconds as an exact decimal string from nanoseconds (for `le`: no float rounding).
fn ns_to_seconds(ns: u64) -> String {
    let (s, frac) = (ns / 1_000_000_000, ns % 1_000_000_000);
    if frac == 0 {
        return s.to_string();
    }
    let f = format!("{frac:09}");
    format!("{s}.{}", f.trim_end_matches('0'))
}

/// A label value escaped for the text format: backslash, double quote and newline.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// HELP text escaped for the text format: backslash and newline (quotes stay as they are).
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Writes metric families in the text format.
struct Exposition {
    out: String,
}

impl Exposition {
    fn new() -> Exposition {
        Exposition {
            out: String::with_capacity(16 * 1024),
        }
    }

    /// The HELP and TYPE lines; a family's samples must follow before the next family.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// vtrace's own process: CPU time and resident memory, read per request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: u64,
}

impl ProcessStats {
    fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        // SAFETY: sysconf has no preconditions.
        let (hz, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        parse_proc(&stat, &statm, hz, page)
    }
}

/// `/proc/self/stat` fields 14 and 15 (utime, stime, in clock ticks; see proc(5)) and
/// `/proc/self/statm` field 2 (resident pages). Field 2 of stat, the command name, is in
/// parentheses and may itself hold spaces and parentheses: fields are counted after the last ')'.
fn parse_proc(stat: &str, statm: &str, hz: i64, page: i64) -> Option<ProcessStats> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field N is at index N - 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    if hz <= 0 || page <= 0 {
        return None;
    }
    Some(ProcessStats {
        cpu_seconds: (utime + stime) as f64 / hz as f64,
        resident_bytes: resident.saturating_mul(page as u64),
    })
}

/// The whole /metrics page.
fn render(snap: &Snapshot, process: Option<ProcessStats>) -> String {
    let mut e = Exposition::new();

    e.family(
        "vtrace_build_info",
        "gauge",
        "vtrace's version, as a label; always 1.",
    );
    e.sample(
        "vtrace_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );

    e.family(
        "vtrace_edge_latency_seconds",
        "histogram",
        "Time between two consecutive hops of a sampled packet (hook at a device), since vtrace started. \
         Only 1 packet in vtrace_sample_every is timed.",
    );
    let name_bucket = "vtrace_edge_latency_seconds_bucket";
    for s in &snap.edges {
        let base = [
            ("from_hook", s.from_hook),
            ("from_iface", s.from_iface.as_str()),
            ("to_hook", s.to_hook),
            ("to_iface", s.to_iface.as_str()),
        ];
        for (i, bound) in BUCKET_NS.iter().enumerate() {
            let le = ns_to_seconds(*bound);
            let mut labels = base.to_vec();
            labels.push(("le", &le));
            e.sample(name_bucket, &labels, s.buckets[i]);
        }
        let mut labels = base.to_vec();
        labels.push(("le", "+Inf"));
        e.sample(name_bucket, &labels, s.count);
        // f64 Display never uses an exponent and prints the shortest exact representation.
        e.sample(
            "vtrace_edge_latency_seconds_sum",
            &base,
            s.sum_ns as f64 / 1e9,
        );
        e.sample("vtrace_edge_latency_seconds_count", &base, s.count);
    }

    e.family(
        "vtrace_edges",
        "gauge",
        "Distinct edges (hook at a device to the next hook) seen since vtrace started.",
    );
    e.sample("vtrace_edges", &[], snap.edges.len());
    e.family(
        "vtrace_paths",
        "gauge",
        "Distinct complete packet paths through the host seen since vtrace started.",
    );
    e.sample("vtrace_paths", &[], snap.paths);
    e.family(
        "vtrace_sample_every",
        "gauge",
        "Hop events are recorded for 1 packet in this many (--sample); packet counts stay exact.",
    );
    e.sample("vtrace_sample_every", &[], snap.sample_every);

    e.family(
        "vtrace_hook_packets_total",
        "counter",
        "Packets seen at each hook (tracepoint), every packet, counted in the kernel (napi_poll: poll rounds).",
    );
    for h in latency::HOOKS {
        e.sample(
            "vtrace_hook_packets_total",
            &[("hook", h.name())],
            snap.counters.hook(h),
        );
    }
    e.family(
        "vtrace_sampled_packets_total",
        "counter",
        "Entry hops (netif_receive_skb, netif_rx, napi_gro_receive_entry, net_dev_queue) of packets chosen by the 1-in-N sample and the filters: a packet counts once per device it enters.",
    );
    e.sample(
        "vtrace_sampled_packets_total",
        &[],
        snap.counters.get(Counter::Sampled),
    );
    e.family(
        "vtrace_unparsed_packets_total",
        "counter",
        "Packets whose headers could not be read (not IPv4/IPv6, or headers not in the linear area).",
    );
    e.sample(
        "vtrace_unparsed_packets_total",
        &[],
        snap.counters.get(Counter::Unparsed),
    );
    e.family(
        "vtrace_lost_events_total",
        "counter",
        "Hop events that did not fit in the ring buffer (grow --ring-kib or sample fewer packets).",
    );
    e.sample(
        "vtrace_lost_events_total",
        &[],
        snap.counters.get(Counter::LostEvents),
    );
    e.family(
        "vtrace_failed_map_inserts_total",
        "counter",
        "Inserts refused by a full in-kernel map: tracked (sampled packets in flight) or drops (drop table).",
    );
    e.sample(
        "vtrace_failed_map_inserts_total",
        &[("map", "tracked")],
        snap.counters.get(Counter::TrackInsertFailed),
    );
    e.sample(
        "vtrace_failed_map_inserts_total",
        &[("map", "drops")],
        snap.counters.get(Counter::DropInsertFailed),
    );

    e.family(
        "vtrace_drops_total",
        "counter",
        "Packets dropped (skb:kfree_skb with a drop reason), by device, drop reason and kernel location.",
    );
    let mut drops: Vec<&DropEntry> = snap.drops.iter().collect();
    drops.sort_by(|a, b| {
        (&a.iface, &a.reason, &a.location).cmp(&(&b.iface, &b.reason, &b.location))
    });
    for d in drops {
        e.sample(
            "vtrace_drops_total",
            &[
                ("iface", &d.iface),
                ("reason", &d.reason),
                ("location", &d.location),
            ],
            d.count,
        );
    }

    e.family(
        "vtrace_program_runs_total",
        "counter",
        "Runs of each of vtrace's eBPF programs. 0 unless the kernel's BPF statistics are on (sysctl kernel.bpf_stats_enabled=1).",
    );
    for p in &snap.programs {
        e.sample(
            "vtrace_program_runs_total",
            &[("program", &p.program), ("hook", &p.hook)],
            p.runs,
        );
    }
    e.family(
        "vtrace_program_run_seconds_total",
        "counter",
        "Time spent in each of vtrace's eBPF programs. 0 unless the kernel's BPF statistics are on (sysctl kernel.bpf_stats_enabled=1).",
    );
    for p in &snap.programs {
        e.sample(
            "vtrace_program_run_seconds_total",
            &[("program", &p.program), ("hook", &p.hook)],
            p.run_ns as f64 / 1e9,
        );
    }

    render_work(&mut e, &snap.work);

    if let Some(p) = process {
        e.family(
            "vtrace_process_cpu_seconds_total",
            "counter",
            "User and system CPU time of the vtrace process (/proc/self/stat utime + stime).",
        );
        e.sample("vtrace_process_cpu_seconds_total", &[], p.cpu_seconds);
        e.family(
            "vtrace_process_resident_memory_bytes",
            "gauge",
            "Resident memory of the vtrace process (/proc/self/statm).",
        );
        e.sample(
            "vtrace_process_resident_memory_bytes",
            &[],
            p.resident_bytes,
        );
    }
    e.out
}

/// Bounds of `vtrace_work_duration_seconds`: every other log2 bucket bound of the kernel's
/// statistics, 2^10 ns (~1 us) to 2^30 ns (~1.07 s).
const WORK_BOUND_LOG2: [u32; 11] = [10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30];

/// The work functions: calls, time, a duration histogram, what they returned.
fn render_work(e: &mut Exposition, rows: &[crate::work::WorkRow]) {
    e.family(
        "vtrace_work_duration_seconds",
        "histogram",
        "Time per call of the function tier's work functions (vhost-net handlers, tun socket calls, xen-netback actions, NAPI polls); vhost_wakeup: from work queued for the vhost worker to its handler starting. Buckets are powers of two of nanoseconds.",
    );
    for r in rows {
        let base = [
            ("function", r.function.as_str()),
            ("module", r.module.as_str()),
            ("via", r.via.as_str()),
        ];
        let with_le = |le: &str| -> Vec<(&str, String)> {
            base.iter()
                .map(|(k, v)| (*k, v.to_string()))
                .chain([("le", le.to_string())])
                .collect()
        };
        let mut buckets: Vec<(String, u64)> = WORK_BOUND_LOG2
            .iter()
            // Bucket i counts durations in [2^i, 2^(i+1)) ns: those below 2^log2 are
            // buckets 0..log2.
            .map(|&log2| {
                (
                    ns_to_seconds(1u64 << log2),
                    r.buckets.iter().take(log2 as usize).sum(),
                )
            })
            .collect();
        buckets.push(("+Inf".into(), r.calls));
        for (le, n) in buckets {
            let l = with_le(&le);
            let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
            e.sample("vtrace_work_duration_seconds_bucket", &l, n);
        }
        e.sample(
            "vtrace_work_duration_seconds_sum",
            &base,
            r.total_ns as f64 / 1e9,
        );
        e.sample("vtrace_work_duration_seconds_count", &base, r.calls);
    }
    e.family(
        "vtrace_work_returned_total",
        "counter",
        "What the work functions returned, added up: packets (NAPI polls, xenvif_tx_action), bytes (tun calls), wake-ups with work (vhost_run_work_list).",
    );
    for r in rows {
        if let Some(unit) = &r.returned_unit {
            e.sample(
                "vtrace_work_returned_total",
                &[("function", &r.function), ("unit", unit)],
                r.returned,
            );
        }
    }
    e.family(
        "vtrace_work_errors_total",
        "counter",
        "Work function calls that returned a negative errno.",
    );
    for r in rows.iter().filter(|r| r.returned_unit.is_some()) {
        e.sample(
            "vtrace_work_errors_total",
            &[("function", &r.function)],
            r.errors,
        );
    }
}

/// What the tracer knows now, as a snapshot.
fn snapshot(
    pipeline: &mut Pipeline,
    resolver: &mut Resolver,
    tracer: &crate::tracer::Tracer,
    elapsed: Duration,
    last: bool,
    args: &ServeArgs,
    costs_failed: &mut bool,
) -> Result<Snapshot> {
    let counters = tracer.counters()?;
    // Folds the packets whose join window has passed into the histograms, also when the host
    // went quiet and no event moves the joiner's clock.
    pipeline.advance_to_now();
    let report = pipeline.report(elapsed.as_secs_f64(), &counters, last);
    let mut edges: Vec<EdgeSeries> = pipeline
        .aggregate()
        .edge_histograms()
        .map(|(from, to, h)| {
            let (buckets, count, sum_ns) = bucketize(h);
            EdgeSeries {
                from_hook: from.hook.name(),
                from_iface: from.iface.to_string(),
                to_hook: to.hook.name(),
                to_iface: to.iface.to_string(),
                buckets,
                count,
                sum_ns,
            }
        })
        .collect();
    edges.sort_by(|a, b| {
        (a.from_hook, &a.from_iface, a.to_hook, &a.to_iface).cmp(&(
            b.from_hook,
            &b.from_iface,
            b.to_hook,
            &b.to_iface,
        ))
    });
    let drops = resolver.entries(&tracer.drops()?, false, &args.filter.iface);
    // Program statistics are a nice-to-have: say once if they cannot be read, keep serving.
    let programs = match tracer.program_costs() {
        Ok(p) => p,
        Err(e) => {
            if !*costs_failed {
                eprintln!("vtrace: cannot read eBPF program statistics: {e:#}");
                *costs_failed = true;
            }
            Vec::new()
        }
    };
    Ok(Snapshot {
        counters,
        edges,
        paths: report.paths.len(),
        drops,
        programs,
        sample_every: args.sample,
        work: tracer.work_rows()?,
    })
}

pub fn run(args: &ServeArgs) -> Result<()> {
    let config = args
        .filter
        .config(flags::TRACK | flags::DROPS, args.sample)?;
    let opts = TracerOptions {
        config,
        hooks: latency::HOOKS.to_vec(),
        ring_bytes: args.ring_kib.saturating_mul(1024),
        // Function-tier hops only add to tracked packets' paths.
        functions: true,
        // Always on in production: the per-batch rows only, no per-frame timing.
        work: crate::work::WorkSet::Batches,
    };
    let timing = Timing {
        duration: args.duration.map(Duration::from_secs_f64),
        interval: TICK,
    };
    let mut resolver = Resolver::new()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        // Bind before anything is attached: a taken or foreign address fails with nothing
        // loaded in the kernel.
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let local = listener.local_addr().unwrap_or(args.listen);
        let shared = Arc::new(Mutex::new(Snapshot {
            sample_every: args.sample,
            ..Snapshot::default()
        }));
        let server = tokio::spawn(serve_http(listener, shared.clone()));
        eprintln!("vtrace: serving metrics on http://{local}/metrics");
        let pipeline = RefCell::new(Pipeline::new(args.window_ms));
        let mut costs_failed = false;
        let result = session::run(
            opts,
            timing,
            |ev| pipeline.borrow_mut().push(ev),
            |tracer, elapsed, last| {
                let snap = snapshot(
                    &mut pipeline.borrow_mut(),
                    &mut resolver,
                    tracer,
                    elapsed,
                    last,
                    args,
                    &mut costs_failed,
                )?;
                // A poisoned lock only means a request task panicked mid-render: the data is
                // whole (it is replaced, never edited in place).
                *shared.lock().unwrap_or_else(|p| p.into_inner()) = snap;
                Ok(())
            },
        )
        .await;
        server.abort();
        result
    })
}

/// Accepts connections until aborted; each is served in its own task.
async fn serve_http(listener: TcpListener, shared: Arc<Mutex<Snapshot>>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                eprintln!("vtrace: accepting a metrics connection: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // too many at once: close this one
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, handle(stream, &shared)).await;
            drop(permit);
        });
    }
}

/// Serves one request and closes the connection (`Connection: close`: scrapers reconnect each
/// interval, and it keeps the responder trivial).
async fn handle(stream: TcpStream, shared: &Mutex<Snapshot>) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    while !head_complete(&head) {
        if head.len() > MAX_REQUEST_HEAD {
            let resp = response(
                400,
                "text/plain; charset=utf-8",
                b"request too large\n",
                true,
            );
            return write_all(&stream, &resp).await;
        }
        let n = read_some(&stream, &mut buf).await?;
        if n == 0 {
            break; // the client closed: answer what we have (or nothing)
        }
        head.extend_from_slice(&buf[..n]);
    }
    if head.is_empty() {
        return Ok(());
    }
    let resp = match route(&head) {
        Route::Metrics { head_only } => {
            let snap = shared.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let body = render(&snap, ProcessStats::read());
            response(200, CONTENT_TYPE, body.as_bytes(), !head_only)
        }
        Route::Index { head_only } => response(
            200,
            "text/html; charset=utf-8",
            INDEX.as_bytes(),
            !head_only,
        ),
        Route::NotFound => response(
            404,
            "text/plain; charset=utf-8",
            b"not found: try /metrics\n",
            true,
        ),
        Route::BadMethod => response(
            405,
            "text/plain; charset=utf-8",
            b"only GET and HEAD\n",
            true,
        ),
        Route::BadRequest => response(400, "text/plain; charset=utf-8", b"bad request\n", true),
    };
    write_all(&stream, &resp).await
}

const INDEX: &str = "<!doctype html>\n<html><head><title>vtrace</title></head><body>\
<h1>vtrace</h1><p>Prometheus metrics: <a href=\"/metrics\">/metrics</a></p></body></html>\n";

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics { head_only: bool },
    Index { head_only: bool },
    NotFound,
    BadMethod,
    BadRequest,
}

fn head_complete(head: &[u8]) -> bool {
    head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")
}

/// Routes on the request line (`METHOD TARGET HTTP/x.y`); headers are not needed.
fn route(head: &[u8]) -> Route {
    let line_end = head.iter().position(|b| *b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Route::BadRequest;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Route::BadMethod,
    };
    // Prometheus may add query parameters (e.g. `params` in a scrape config): ignore them.
    let path = target.split('?').next().unwrap_or(target);
    match path {
        "/metrics" => Route::Metrics { head_only },
        "/" => Route::Index { head_only },
        _ => Route::NotFound,
    }
}

fn response(status: u16, content_type: &str, body: &[u8], with_body: bool) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if with_body {
        bytes.extend_from_slice(body);
    }
    bytes
}

// tokio is built without `io-util`: read and write with the readiness API of `net`.

async fn read_some(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        s.readable().await?;
        match s.try_read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn write_all(s: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        s.writable().await?;
        match s.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_bounded() {
        let mut h = Histogram::<u64>::new(3).expect("histogram");
        h.auto(true);
        for v in [500u64, 1000, 1001, 3_000, 1_000_000, 10_000_000_000] {
            h.record(v).expect("record");
        }
        let (b, count, sum) = bucketize(&h);
        assert_eq!(count, 6);
        assert_eq!(b[0], 2, "500 and 1000 ns are <= 1 us");
        assert_eq!(b[1], 3, "1001 ns is <= 2 us");
        assert_eq!(b[2], 4, "3000 ns is <= 4 us");
        assert!(b.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(b[BUCKETS - 1], 5, "10 s is only in +Inf");
        let exact: u128 = 500 + 1000 + 1001 + 3000 + 1_000_000 + 10_000_000_000;
        let err = (sum as f64 - exact as f64).abs() / exact as f64;
        assert!(err < 0.001, "sum {sum} vs {exact}");
    }

    #[test]
    fn bounds_and_le_strings() {
        assert_eq!(ns_to_seconds(BUCKET_NS[0]), "0.000001");
        assert_eq!(ns_to_seconds(BUCKET_NS[10]), "0.001024");
        assert_eq!(ns_to_seconds(BUCKET_NS[BUCKETS - 1]), "4.194304");
        assert_eq!(ns_to_seconds(2_000_000_000), "2");
    }

    #[test]
    fn escaping() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert_eq!(escape_help("x \"y\" \\ \n"), "x \"y\" \\\\ \\n");
    }

    #[test]
    fn render_has_every_family_and_escapes_labels() {
        let snap = Snapshot {
            edges: vec![EdgeSeries {
                from_hook: "net_dev_start_xmit",
                from_iface: "tap\"0".into(),
                to_hook: "skb_copy_datagram_iovec",
                to_iface: "tap\\0".into(),
                buckets: [1; BUCKETS],
                count: 2,
                sum_ns: 1_500,
            }],
            drops: vec![DropEntry {
                iface: "eth0@ns\n".into(),
                reason: "NO_SOCKET".into(),
                location: "udp_queue_rcv_one_skb+0x12".into(),
                count: 3,
                reason_code: 3,
                device: "at_drop",
                stage: None,
            }],
            sample_every: 16,
            ..Snapshot::default()
        };
        let text = render(
            &snap,
            Some(ProcessStats {
                cpu_seconds: 1.5,
                resident_bytes: 4096,
            }),
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
            "vtrace_program_run_seconds_total counter",
            "vtrace_program_runs_total counter",
            "vtrace_paths gauge",
            "vtrace_work_duration_seconds histogram",
            "vtrace_work_returned_total counter",
            "vtrace_work_errors_total counter",
        ] {
            assert!(text.contains(&format!("# TYPE {family}\n")), "{family}");
        }
        assert!(text.contains(
            "vtrace_edge_latency_seconds_bucket{from_hook=\"net_dev_start_xmit\",from_iface=\"tap\\\"0\",to_hook=\"skb_copy_datagram_iovec\",to_iface=\"tap\\\\0\",le=\"+Inf\"} 2\n"
        ));
        assert!(text.contains("vtrace_edge_latency_seconds_sum{from_hook=\"net_dev_start_xmit\",from_iface=\"tap\\\"0\",to_hook=\"skb_copy_datagram_iovec\",to_iface=\"tap\\\\0\"} 0.0000015\n"));
        assert!(text.contains("iface=\"eth0@ns\\n\""));
        assert!(text.contains("vtrace_process_cpu_seconds_total 1.5\n"));
        // Every non-comment line is `name{labels} value` with one space before the value.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap_or("");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    /// A work row becomes a cumulative histogram (log2 buckets folded into every other
    /// bound), a returned counter in its unit and an errors counter.
    #[test]
    fn work_rows_are_exported_as_histograms() {
        let mut buckets = [0u64; vtrace_common::work::WORK_BUCKETS];
        buckets[11] = 3; // [2048, 4096) ns
        buckets[20] = 1; // [~1.05, ~2.1) ms
        let row = crate::work::WorkRow {
            function: "xenvif_poll".into(),
            module: "xen_netback".into(),
            stage: crate::hooks::Stage::Netback,
            via: "fentry".into(),
            calls: 4,
            total_ns: 3 * 3000 + 1_500_000,
            mean_ns: 0.0,
            p50_le_ns: 4096,
            p99_le_ns: 2_097_152,
            max_ns: 1_500_000,
            returned: 100,
            returned_unit: Some("packets".into()),
            errors: 0,
            unmatched: 0,
            buckets,
        };
        let text = render(
            &Snapshot {
                work: vec![row],
                ..Snapshot::default()
            },
            None,
        );
        let labels = "function=\"xenvif_poll\",module=\"xen_netback\",via=\"fentry\"";
        for (le, n) in [
            ("0.000001024", 0),
            ("0.000004096", 3),
            ("0.001048576", 3),
            ("0.004194304", 4),
            ("+Inf", 4),
        ] {
            let line = format!("vtrace_work_duration_seconds_bucket{{{labels},le=\"{le}\"}} {n}\n");
            assert!(text.contains(&line), "{line}{text}");
        }
        assert!(text.contains(&format!(
            "vtrace_work_duration_seconds_count{{{labels}}} 4\n"
        )));
        assert!(text.contains(&format!(
            "vtrace_work_duration_seconds_sum{{{labels}}} 0.001509\n"
        )));
        assert!(text.contains(
            "vtrace_work_returned_total{function=\"xenvif_poll\",unit=\"packets\"} 100\n"
        ));
        assert!(text.contains("vtrace_work_errors_total{function=\"xenvif_poll\"} 0\n"));
    }

    #[test]
    fn proc_parsing() {
        let stat =
            "1234 (vt (a) b) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 100 1000 10";
        let p = parse_proc(stat, "5000 300 100 1 0 200 0\n", 100, 4096).expect("parsed");
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.resident_bytes, 300 * 4096);
        assert!(parse_proc("garbage", "", 100, 4096).is_none());
        assert!(parse_proc(stat, "5000", 100, 4096).is_none());
    }

    #[test]
    fn routing() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics { head_only: false }
        );
        assert_eq!(
            route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Route::Metrics { head_only: false }
        );
        assert_eq!(
            route(b"HEAD / HTTP/1.1\r\n\r\n"),
            Route::Index { head_only: true }
        );
        assert_eq!(route(b"GET /nope HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(route(b"\xff\xfe\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET / SPDY/3\r\n\r\n"), Route::BadRequest);
    }
}
