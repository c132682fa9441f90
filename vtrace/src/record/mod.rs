//! `vtrace record`: hop events and drops to a file; `vtrace report`: the latency and drops
//! reports from such a file, offline, on any machine.
//!
//! `record` attaches like `vtrace latency` plus the drop counting of `vtrace drops`, writes each
//! hop event as it arrives (device names resolved once, in device frames), and at the end a
//! trailer with the kernel's counters, the drop rows (names resolved) and the devices' own drop
//! counter deltas. `report` replays the hops through the same [`latency::Pipeline`] and builds
//! the same [`DropsReport`] as `vtrace drops`. The file format is described in [`format`].
//!
//! A file that ends early (vtrace killed, disk full) or goes bad part-way is still reported up
//! to the problem, with a note; `report` then exits non-zero with the problem on one line.

pub mod format;
#[cfg(test)]
mod tests;

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap},
    fs::File,
    io::{self, BufReader, BufWriter, Read, Write},
    path::Path,
    time::Duration,
};

use anyhow::{anyhow, Context, Result};
use serde::Serialize;
use vtrace_common::{flags, hop_flags, Counter, Hook, HopEvent};

use crate::{
    cli::{RecordArgs, ReportArgs},
    drops::{self, DropEntry, DropsReport},
    kernel::netdev,
    latency::{self, iface::Iface, join::HopIn, report::LatencyReport, Pipeline},
    session::{self, IfaceNamer, Timing},
    tracer::{Counters, Tracer, TracerOptions},
};
use format::{
    Device, DropRecord, FormatError, Frame, Header, Hop, IfaceCounters, Reader, Trailer, Writer,
};

/// How often `record` flushes its buffer (and checks for write errors).
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// How often `record` says how far it is.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How often, in recorded time, `report` finalizes the packets whose join window has passed
/// (what `vtrace latency` does at each refresh; keeps memory flat on long files).
const REPLAY_FLUSH_NS: u64 = 1_000_000_000;

// ---------------------------------------------------------------------------------------------
// vtrace record

/// What the session's callbacks share.
struct Recorder<W: Write> {
    writer: Writer<W>,
    devices: HashMap<([u8; 16], u32, u32), u32>,
    namer: IfaceNamer,
    /// The first write error; later events are not written, the next tick reports it.
    failed: Option<io::Error>,
}

impl<W: Write> Recorder<W> {
    fn event(&mut self, ev: &HopEvent) {
        if self.failed.is_some() {
            return;
        }
        if let Err(e) = self.write_event(ev) {
            self.failed = Some(e);
        }
    }

    fn write_event(&mut self, ev: &HopEvent) -> io::Result<()> {
        let Some(hook) = Hook::from_u32(ev.hook) else {
            return Ok(());
        };
        let key = (ev.ifname, ev.netns, ev.ifindex);
        let device = match self.devices.get(&key) {
            Some(id) => *id,
            None => {
                let id = self.devices.len() as u32 + 1;
                let name = self.namer.name(&ev.ifname, ev.netns);
                self.writer.device(&Device {
                    id,
                    ifindex: ev.ifindex,
                    netns: ev.netns,
                    ifname: ev.ifname,
                    name: name.to_string(),
                })?;
                self.devices.insert(key, id);
                id
            }
        };
        self.writer.hop(&Hop {
            ts_ns: ev.ts_ns,
            skb: ev.skb,
            fingerprint: ev.fingerprint,
            location: ev.location,
            device,
            cpu: ev.cpu,
            len: ev.len,
            reason: ev.reason,
            flags: ev.flags,
            hook,
        })
    }
}

fn read_proc(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn kib(bytes: u64) -> String {
    if bytes >= 10 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

pub fn record(args: &RecordArgs) -> Result<()> {
    let config = args
        .filter
        .config(flags::TRACK | flags::DROPS, args.sample)?;
    let mut resolver = drops::Resolver::new()?;
    let path = args.output.as_path();
    let shown = path.display().to_string();
    let write_err = |e: io::Error| anyhow!("writing {shown}: {e}");
    let file = File::create(path).map_err(|e| anyhow!("cannot create {shown}: {e}"))?;
    let regular = file.metadata().map(|m| m.is_file()).unwrap_or(false);
    let header = Header {
        vtrace_version: env!("CARGO_PKG_VERSION").to_string(),
        kernel_release: read_proc("/proc/sys/kernel/osrelease"),
        hostname: read_proc("/proc/sys/kernel/hostname"),
        boot_id: read_proc("/proc/sys/kernel/random/boot_id"),
        clock: format::CLOCK_NOTE.to_string(),
        start_mono_ns: monotonic_ns(),
        start_unix_ns: unix_ns(),
        sample_every: config.sample_every,
        flags: config.flags,
        ring_kib: args.ring_kib,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    // The header goes out at once: a bad path or a full disk shows before anything attaches.
    let mut writer =
        Writer::new(BufWriter::with_capacity(256 << 10, file), &header).map_err(write_err)?;
    writer.flush().map_err(write_err)?;

    let opts = TracerOptions {
        config,
        hooks: latency::HOOKS.to_vec(),
        ring_bytes: args.ring_kib.saturating_mul(1024),
        // Function-tier hops only add to tracked packets' paths.
        functions: true,
        // Record files hold hop events and drops; work statistics are not in the format.
        work: crate::work::WorkSet::None,
    };
    let timing = Timing {
        duration: args.duration.map(Duration::from_secs_f64),
        interval: FLUSH_EVERY,
    };
    let before = netdev::snapshot();
    let rec = RefCell::new(Recorder {
        writer,
        devices: HashMap::new(),
        namer: IfaceNamer::new(),
        failed: None,
    });
    let mut last_progress = Duration::ZERO;
    let mut done = None;
    session::run_blocking(
        opts,
        timing,
        |ev| rec.borrow_mut().event(ev),
        |tracer, elapsed, last| {
            let mut rec = rec.borrow_mut();
            if let Some(e) = rec.failed.take() {
                return Err(write_err(e));
            }
            if !last {
                rec.writer.flush().map_err(write_err)?;
                if elapsed >= last_progress + PROGRESS_EVERY {
                    last_progress = elapsed;
                    eprintln!(
                        "vtrace record: {:.0}s, {} hop events, {} devices, {} written to {shown}",
                        elapsed.as_secs_f64(),
                        rec.writer.hops(),
                        rec.writer.devices(),
                        kib(rec.writer.bytes())
                    );
                }
                return Ok(());
            }
            let trailer = final_trailer(tracer, elapsed, &mut resolver, &before, args);
            rec.writer.trailer(&trailer).map_err(write_err)?;
            if regular {
                // Where the filesystem reports a full disk only here (NFS, quotas).
                rec.writer
                    .get_ref()
                    .get_ref()
                    .sync_data()
                    .map_err(write_err)?;
            }
            done = Some((
                rec.writer.hops(),
                rec.writer.devices(),
                rec.writer.bytes(),
                elapsed,
            ));
            Ok(())
        },
    )?;
    if let Some((hops, devices, bytes, elapsed)) = done {
        eprintln!(
            "vtrace record: wrote {hops} hop events ({devices} devices, {}) in {:.1}s to {shown}; `vtrace report {shown}` reads it",
            kib(bytes),
            elapsed.as_secs_f64()
        );
    }
    Ok(())
}

/// The trailer: counters, drops with their names, device counter deltas. A table that cannot be
/// read becomes a note rather than a lost recording.
fn final_trailer(
    tracer: &Tracer,
    elapsed: Duration,
    resolver: &mut drops::Resolver,
    before: &BTreeMap<String, netdev::DropCounters>,
    args: &RecordArgs,
) -> Trailer {
    let mut notes = Vec::new();
    let counters = match tracer.counters() {
        Ok(c) => c.slots.to_vec(),
        Err(e) => {
            notes.push(format!("the kernel counters could not be read: {e:#}"));
            Vec::new()
        }
    };
    let drops = match tracer.drops() {
        Ok(rows) => resolver
            .entries(&rows, true, &args.filter.iface)
            .into_iter()
            .map(|d| DropRecord {
                iface: d.iface,
                reason: d.reason,
                location: d.location,
                reason_code: d.reason_code,
                count: d.count,
                arrival: d.device == "arrival",
            })
            .collect(),
        Err(e) => {
            notes.push(format!("the drop table could not be read: {e:#}"));
            Vec::new()
        }
    };
    let only = &args.filter.iface;
    let ifaces = netdev::snapshot()
        .into_iter()
        .filter(|(name, _)| crate::drops::iface_selected(name, only))
        .map(|(iface, now)| {
            let d = now.delta(
                before
                    .get(&iface)
                    .unwrap_or(&netdev::DropCounters::default()),
            );
            IfaceCounters {
                iface,
                rx_dropped: d.rx_dropped,
                tx_dropped: d.tx_dropped,
                rx_missed_errors: d.rx_missed_errors,
                rx_fifo_errors: d.rx_fifo_errors,
                tx_fifo_errors: d.tx_fifo_errors,
            }
        })
        .collect();
    let drivers = match resolver.drivers(tracer) {
        Ok(d) => d,
        Err(e) => {
            notes.push(format!(
                "the driver discovery table could not be read: {e:#}"
            ));
            Vec::new()
        }
    };
    Trailer {
        duration_s: elapsed.as_secs_f64(),
        end_mono_ns: monotonic_ns(),
        hop_events: 0,
        counters,
        drops,
        ifaces,
        notes,
        drivers,
    }
}

// ---------------------------------------------------------------------------------------------
// vtrace report

/// What a record file holds, replayed.
pub struct Replayed {
    pub latency: LatencyReport,
    pub drops: DropsReport,
    pub hops: u64,
    pub devices: u64,
    /// Why the file could not be read to its end (None: complete, trailer included).
    pub problem: Option<String>,
}

/// Replays the frames after the header through the latency pipeline and builds both reports.
pub fn replay<R: Read>(reader: &mut Reader<R>, header: &Header, window_ms: f64) -> Replayed {
    let mut pipeline = Pipeline::new(window_ms);
    let mut devices: HashMap<u32, (Iface, u32)> = HashMap::new();
    let mut trailer: Option<Trailer> = None;
    let mut problem: Option<FormatError> = None;
    let mut last_ts: Option<u64> = None;
    let mut next_flush: Option<u64> = None;
    loop {
        match reader.next_frame() {
            Ok(Some(Frame::Device(d))) => {
                devices.insert(d.id, (Iface::new(&d.name), d.ifindex));
            }
            Ok(Some(Frame::Hop(h))) => {
                // The reader checked that the device was defined.
                let Some((name, ifindex)) = devices.get(&h.device) else {
                    continue;
                };
                // Named as `vtrace latency` names hops.
                let iface = crate::latency::has_device(h.hook, *ifindex).then_some(*name);
                pipeline.push_named(HopIn {
                    ts: h.ts_ns,
                    skb: h.skb,
                    fingerprint: h.fingerprint,
                    hook: h.hook,
                    iface,
                    first: h.flags & hop_flags::FIRST != 0,
                });
                last_ts = Some(last_ts.map_or(h.ts_ns, |t| t.max(h.ts_ns)));
                match next_flush {
                    None => next_flush = Some(h.ts_ns.saturating_add(REPLAY_FLUSH_NS)),
                    Some(t) if h.ts_ns >= t => {
                        let _ = pipeline.report(0.0, &Counters::default(), false);
                        next_flush = Some(h.ts_ns.saturating_add(REPLAY_FLUSH_NS));
                    }
                    Some(_) => {}
                }
            }
            Ok(Some(Frame::Trailer(t))) => trailer = Some(t),
            Ok(None) => break,
            Err(e) => {
                problem = Some(e);
                break;
            }
        }
    }
    let mut counters = Counters::default();
    if let Some(t) = &trailer {
        for (slot, v) in counters.slots.iter_mut().zip(&t.counters) {
            *slot = *v;
        }
    }
    let duration_s = match &trailer {
        Some(t) => t.duration_s,
        None => last_ts
            .map(|t| t.saturating_sub(header.start_mono_ns) as f64 / 1e9)
            .unwrap_or(0.0),
    };
    let mut latency = pipeline.report(duration_s, &counters, true);
    latency.events = crate::latency::report::EventCounts {
        emitted: counters.get(vtrace_common::Counter::Emitted),
        received: reader.hops(),
        lost: counters.get(vtrace_common::Counter::LostEvents),
    };
    let problem = match (problem, &trailer) {
        (Some(e), _) => Some(e.to_string()),
        (None, None) => Some(format!(
            "ends at byte {} without its trailer: the recording was cut short (vtrace killed, or the disk full)",
            reader.position()
        )),
        (None, Some(_)) => None,
    };
    if let Some(p) = &problem {
        latency.notes.push(format!(
            "incomplete file: {p}; this report covers the {} hop events before that{}",
            reader.hops(),
            if trailer.is_some() {
                ""
            } else {
                ", and the kernel counters, lost events and drops (in the trailer) are unknown"
            }
        ));
    }
    if let Some(t) = &trailer {
        for n in &t.notes {
            latency.notes.push(format!("while recording: {n}"));
        }
    }
    let drops = drops_report(trailer.as_ref(), duration_s, &counters);
    Replayed {
        latency,
        drops,
        hops: reader.hops(),
        devices: devices.len() as u64,
        problem,
    }
}

/// The `vtrace drops` report from the trailer's rows and counter deltas.
fn drops_report(trailer: Option<&Trailer>, duration_s: f64, counters: &Counters) -> DropsReport {
    let mut drops: Vec<DropEntry> = trailer
        .map(|t| t.drops.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|d| !crate::drops::NOT_LOSSES.contains(&d.reason.as_str()))
        .map(|d| DropEntry {
            iface: d.iface.clone(),
            reason: d.reason.clone(),
            location: d.location.clone(),
            count: d.count,
            reason_code: d.reason_code,
            stage: crate::hooks::stage_of_location(&d.location),
            device: if d.arrival { "arrival" } else { "at_drop" },
        })
        .collect();
    drops.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(a.iface.cmp(&b.iface))
            .then(a.reason.cmp(&b.reason))
            .then(a.location.cmp(&b.location))
    });
    let deltas: BTreeMap<String, netdev::DropCounters> = trailer
        .map(|t| t.ifaces.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|i| {
            (
                i.iface.clone(),
                netdev::DropCounters {
                    rx_dropped: i.rx_dropped,
                    tx_dropped: i.tx_dropped,
                    rx_missed_errors: i.rx_missed_errors,
                    rx_fifo_errors: i.rx_fifo_errors,
                    tx_fifo_errors: i.tx_fifo_errors,
                },
            )
        })
        .collect();
    DropsReport {
        duration_s,
        lost_events: counters.get(Counter::LostEvents),
        ifaces: drops::iface_entries(&drops, &BTreeMap::new(), &deltas, &[]),
        drops,
        kfree_skb_calls: counters.hook(Hook::KfreeSkb),
        failed_map_inserts: counters.get(Counter::DropInsertFailed),
        drivers: trailer.map(|t| t.drivers.clone()).unwrap_or_default(),
        // Record files hold no work statistics.
        work: Vec::new(),
    }
}

/// The `recording` object of `report --json`: where the file comes from.
#[derive(Serialize)]
struct RecordingInfo<'a> {
    file: String,
    format_version: u16,
    vtrace_version: &'a str,
    kernel_release: &'a str,
    hostname: &'a str,
    boot_id: &'a str,
    clock: &'a str,
    start_mono_ns: u64,
    start_unix_ns: u64,
    sample_every: u32,
    command: &'a str,
    hop_events: u64,
    devices: u64,
    complete: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<&'a str>,
}

/// `YYYY-MM-DD HH:MM:SS UTC` from ns since the Unix epoch (civil-from-days, proleptic
/// Gregorian).
fn utc(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub fn report(args: &ReportArgs) -> Result<()> {
    let path: &Path = &args.file;
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|e| anyhow!("{shown}: {e}"))?;
    let size = file
        .metadata()
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len());
    let mut reader = Reader::new(BufReader::with_capacity(1 << 20, file), size);
    let header = reader.header().map_err(|e| anyhow!("{shown}: {e}"))?;
    let r = replay(&mut reader, &header, args.window_ms);
    if args.json {
        let info = RecordingInfo {
            file: shown.clone(),
            format_version: format::VERSION,
            vtrace_version: &header.vtrace_version,
            kernel_release: &header.kernel_release,
            hostname: &header.hostname,
            boot_id: &header.boot_id,
            clock: &header.clock,
            start_mono_ns: header.start_mono_ns,
            start_unix_ns: header.start_unix_ns,
            sample_every: header.sample_every,
            command: &header.command,
            hop_events: r.hops,
            devices: r.devices,
            complete: r.problem.is_none(),
            problem: r.problem.as_deref(),
        };
        let v = serde_json::json!({
            "recording": info,
            "latency": r.latency,
            "drops": r.drops,
        });
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "vtrace report: {shown}: {} hop events on {} devices, recorded {} on {} (kernel {}, vtrace {}), 1 packet in {} timed",
            r.hops,
            r.devices,
            utc(header.start_unix_ns),
            if header.hostname.is_empty() { "?" } else { &header.hostname },
            header.kernel_release,
            header.vtrace_version,
            header.sample_every.max(1),
        );
        println!("{}", r.latency.render(args.top));
        print!("{}", drops::render(&r.drops));
    }
    io::stdout().flush().context("writing the report")?;
    match r.problem {
        Some(p) => Err(anyhow!(
            "{shown}: {p}; the report covers the {} hop events before that",
            r.hops
        )),
        None => Ok(()),
    }
}
