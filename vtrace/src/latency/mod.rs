//! `vtrace latency`: per-stage latency across the host data path, joined across copies.

pub mod compare;
pub mod iface;
pub mod join;
pub mod report;

use std::{cell::RefCell, io::IsTerminal, time::Duration};

use anyhow::Result;
use vtrace_common::{flags, Counter, Hook, HopEvent};

use crate::{
    cli::{FilterArgs, LatencyArgs},
    session::{self, IfaceNamer, Timing},
    tracer::{Counters, TracerOptions},
};
use join::{HopIn, Joiner};
use report::{Aggregate, LatencyReport};

/// The hooks `latency` attaches: the stable tracepoint tier.
pub const HOOKS: [Hook; vtrace_common::HOOK_COUNT] = Hook::TRACEPOINTS;

/// Whether a hop names its own device. A reader's copy and a normal free have none (they take
/// the device the skb was last seen on); a drop names the device it happened at, when the
/// kernel had one (`skb->dev`).
pub fn has_device(hook: Hook, ifindex: u32) -> bool {
    match hook {
        Hook::SkbCopyDatagramIovec | Hook::ConsumeSkb => false,
        Hook::KfreeSkb => ifindex != 0,
        _ => true,
    }
}

/// Hop events in, latency report out: names devices, joins hops into paths, aggregates.
/// Shared by `latency` (live), `serve` (exporter) and `report` (offline, from a record file).
pub struct Pipeline {
    joiner: Joiner,
    agg: Aggregate,
    namer: IfaceNamer,
}

impl Pipeline {
    /// `window_ms`: how long after its last hop a packet may still be joined by a copy.
    pub fn new(window_ms: f64) -> Pipeline {
        Pipeline {
            joiner: Joiner::new((window_ms * 1e6) as u64),
            agg: Aggregate::new(),
            namer: IfaceNamer::new(),
        }
    }

    /// One hop event from the kernel (or a record file).
    pub fn push(&mut self, ev: &HopEvent) {
        let Some(hook) = Hook::from_u32(ev.hook) else {
            return;
        };
        let iface = has_device(hook, ev.ifindex).then(|| self.namer.name(&ev.ifname, ev.netns));
        self.push_named(HopIn {
            ts: ev.ts_ns,
            skb: ev.skb,
            fingerprint: ev.fingerprint,
            hook,
            iface,
            first: ev.flags & vtrace_common::hop_flags::FIRST != 0,
        });
    }

    /// Moves the joiner's clock to now (CLOCK_MONOTONIC, as `bpf_ktime_get_ns`): live commands
    /// call it before each report so that the last packets of a burst are reported even when
    /// no further event comes.
    pub fn advance_to_now(&mut self) {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec we pass.
        if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } == 0 {
            self.joiner
                .advance(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
        }
    }

    /// One hop whose device is already named (record files carry names).
    pub fn push_named(&mut self, hop: HopIn) {
        self.joiner.push(hop);
        for obs in self.joiner.drain() {
            self.agg.add(obs);
        }
    }

    /// Names devices as the report does (`name@netns`).
    pub fn namer(&mut self) -> &mut IfaceNamer {
        &mut self.namer
    }

    /// The histograms so far (`report` first folds in the packets whose window has passed).
    pub fn aggregate(&self) -> &Aggregate {
        &self.agg
    }

    /// Finalizes the packets whose join window has passed (all of them with `last`) and
    /// returns the report so far, with notes on anything lost.
    pub fn report(&mut self, elapsed_s: f64, counters: &Counters, last: bool) -> LatencyReport {
        self.joiner.flush(last);
        for obs in self.joiner.drain() {
            self.agg.add(obs);
        }
        let mut report = self
            .agg
            .report(elapsed_s, counters.get(Counter::LostEvents));
        let failed = counters.get(Counter::TrackInsertFailed);
        if failed > 0 {
            report.notes.push(format!(
                "{failed} sampled packets could not be tracked (tracking map full)"
            ));
        }
        if report.lost_events > 0 {
            report.notes.push(format!(
                "{} hop events were lost (ring buffer full): sample fewer packets (--sample N) or grow --ring-kib",
                report.lost_events
            ));
        }
        report
    }
}

pub fn run(args: &LatencyArgs) -> Result<()> {
    let config = args.filter.config(flags::TRACK, args.sample)?;
    let opts = TracerOptions {
        config,
        hooks: HOOKS.to_vec(),
        ring_bytes: args.ring_kib.saturating_mul(1024),
        // Function-tier hops only add to tracked packets' paths.
        functions: true,
        work: crate::work::WorkSet::All,
    };
    let timing = Timing {
        duration: args.duration.map(Duration::from_secs_f64),
        interval: Duration::from_secs_f64(args.interval),
    };
    let _stats = if args.cost {
        Some(crate::cost::enable_stats()?)
    } else {
        None
    };
    // Both callbacks of the session feed the same pipeline.
    let pipeline = RefCell::new(Pipeline::new(args.window_ms));
    let mut final_report = None;
    let live = !args.json && std::io::stdout().is_terminal();
    session::run_blocking(
        opts,
        timing,
        |ev| pipeline.borrow_mut().push(ev),
        |tracer, elapsed, last| {
            let mut pipeline = pipeline.borrow_mut();
            pipeline.advance_to_now();
            let mut report = pipeline.report(elapsed.as_secs_f64(), &tracer.counters()?, last);
            if args.cost {
                report.cost = tracer.program_costs()?;
            }
            report.work = tracer.work_rows()?;
            let counters = tracer.counters()?;
            report.events = report::EventCounts {
                emitted: counters.get(Counter::Emitted),
                received: tracer.received,
                lost: counters.get(Counter::LostEvents),
            };
            if last {
                report.drivers = crate::discovery::discovered(
                    tracer,
                    pipeline.namer(),
                    crate::kernel::kallsyms::Kallsyms::shared(),
                )?;
                final_report = Some(report);
            } else if live {
                print!("\x1b[2J\x1b[H{}", report.render(args.top));
            } else if !args.json {
                println!("{}", report.render(args.top));
            }
            Ok(())
        },
    )?;
    if let Some(report) = final_report {
        session::emit_final(
            &report,
            || report.render(args.top),
            args.json,
            args.output.as_deref(),
            live,
        )?;
    }
    Ok(())
}

impl FilterArgs {
    /// The load-time configuration for these filters.
    pub fn config(&self, features: u32, sample: u32) -> Result<vtrace_common::Config> {
        let btf = crate::kernel::btf::Btf::vmlinux().map_err(|e| {
            anyhow::anyhow!("reading the kernel's BTF (/sys/kernel/btf/vmlinux): {e}")
        })?;
        let mut c = vtrace_common::Config::zeroed();
        c.offsets = crate::kernel::resolve_offsets(btf)?;
        c.flags = features;
        c.sample_every = sample.max(1);
        if !self.include_loopback {
            c.flags |= flags::SKIP_LOOPBACK;
        }
        if !self.iface.is_empty() {
            if self.iface.len() > vtrace_common::MAX_IFACE_FILTERS {
                anyhow::bail!("at most {} --iface names", vtrace_common::MAX_IFACE_FILTERS);
            }
            c.flags |= flags::FILTER_IFACE;
            c.iface_count = self.iface.len() as u32;
            for (i, name) in self.iface.iter().enumerate() {
                c.iface_names[i] = vtrace_common::ifname_bytes(name.as_bytes());
            }
        }
        if let Some(p) = self.proto {
            c.flags |= flags::FILTER_PROTO;
            c.proto = p.number() as u32;
        }
        if let Some(h) = self.host {
            c.flags |= flags::FILTER_HOST;
            c.host = match h {
                std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                std::net::IpAddr::V6(v6) => v6.octets(),
            };
        }
        if let Some(p) = self.port {
            c.flags |= flags::FILTER_PORT;
            c.port = p;
        }
        Ok(c)
    }
}
