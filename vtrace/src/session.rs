//! A tracing session: start the tracer, read hop events until `--duration` ends or the user
//! interrupts (SIGINT/SIGTERM), call back per event and per refresh tick, detach on return.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::signal::unix::SignalKind;
use vtrace_common::HopEvent;

use crate::{
    kernel::netdev,
    latency::iface::Iface,
    tracer::{self, Tracer, TracerOptions},
};

/// How often the event ring buffer is drained. At 80 bytes an event, the default 4 MiB ring
/// holds about 52,000 events: 5 million events a second before anything is lost.
pub const DRAIN_EVERY: Duration = Duration::from_millis(10);
/// How often the discovery map is read for driver functions to time (see `Tracer::time_discovered_drivers`).
pub const DISCOVER_EVERY: Duration = Duration::from_millis(250);
/// Events handled per drain tick at most, before the loop looks at signals again.
const DRAIN_BATCH: usize = 65_536;

/// How long to run and how often to refresh.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// None: until interrupted.
    pub duration: Option<Duration>,
    pub interval: Duration,
}

/// Names devices as users see them: the bare name in vtrace's own network namespace,
/// `name@netns` elsewhere (the `ip netns` name where there is one).
pub struct IfaceNamer {
    own_netns: u32,
    netns_names: HashMap<u32, String>,
    cache: crate::fasthash::FastMap<([u8; 16], u32), Iface>,
}

impl Default for IfaceNamer {
    fn default() -> Self {
        Self::new()
    }
}

impl IfaceNamer {
    pub fn new() -> IfaceNamer {
        IfaceNamer {
            own_netns: netdev::own_netns(),
            netns_names: netdev::netns_names().into_iter().collect(),
            cache: Default::default(),
        }
    }

    pub fn name(&mut self, ifname: &[u8; 16], netns: u32) -> Iface {
        if let Some(n) = self.cache.get(&(*ifname, netns)) {
            return *n;
        }
        let base = crate::ifname(ifname);
        let name = if netns == 0 || netns == self.own_netns {
            base
        } else {
            if !self.netns_names.contains_key(&netns) {
                self.netns_names = netdev::netns_names().into_iter().collect();
            }
            match self.netns_names.get(&netns) {
                Some(ns) => format!("{base}@{ns}"),
                None => format!("{base}@netns:{netns}"),
            }
        };
        let name = Iface::new(&name);
        self.cache.insert((*ifname, netns), name);
        name
    }
}

/// Runs a session. `on_event` sees every hop event; `on_tick` runs every interval (with
/// `final_tick == false`) and once at the end (`true`), with the tracer to read counters from.
pub async fn run(
    opts: TracerOptions,
    timing: Timing,
    mut on_event: impl FnMut(&HopEvent),
    mut on_tick: impl FnMut(&Tracer, Duration, bool) -> Result<()>,
) -> Result<()> {
    // Handlers first: a SIGTERM while attaching must still end in a clean exit.
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    let mut tracer = Tracer::start(opts)?;
    if let Some(line) = function_tier_summary(&tracer) {
        eprintln!("vtrace: {line}");
    }
    if !tracer.work.attached.is_empty() || !tracer.work.refused.is_empty() {
        eprintln!("vtrace: {}", tracer.work.summary());
    }
    let mut ring = tracer.take_events()?;
    // The programs submit without waking this process (a wakeup per event costs the kernel
    // microseconds, more than the hop itself): the ring is drained on a short timer instead.
    let mut drain = tokio::time::interval(DRAIN_EVERY);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Driver functions the devices show are timed soon after they are first seen.
    let mut discover = tokio::time::interval(DISCOVER_EVERY);
    discover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let deadline = timing.duration.map(|d| tokio::time::Instant::now() + d);
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + timing.interval,
        timing.interval,
    );
    // Always said on stderr: scripts wait for this line before sending traffic.
    let how: Vec<String> = tracer
        .attached
        .iter()
        .map(|(h, a)| format!("{}:{}({})", h.group(), h.name(), a.name()))
        .collect();
    eprintln!("vtrace: attached {} hooks: {}", how.len(), how.join(" "));
    loop {
        tokio::select! {
            // Signals and the deadline first, so a busy ring cannot starve them.
            biased;
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
            _ = drain.tick() => {
                // Bounded: when events come faster than they are joined, the loop must still
                // get back to the signals, the deadline and (in `serve`) the HTTP task.
                for _ in 0..DRAIN_BATCH {
                    let Some(item) = ring.next() else { break };
                    if let Some(ev) = tracer::decode(&item) {
                        tracer.received += 1;
                        on_event(&ev);
                    }
                }
            }
            _ = discover.tick() => {
                for line in tracer.time_discovered_drivers() {
                    eprintln!("vtrace: {line}");
                }
            }
            _ = tick.tick() => {
                on_tick(&tracer, started.elapsed(), false)?;
            }
        }
    }
    // Stop new events, then drain what is left before the final report: until every event
    // the programs tried to send is accounted for (received + lost == emitted), or a second.
    let elapsed = started.elapsed();
    tracer.detach();
    let settle = Instant::now() + Duration::from_secs(1);
    loop {
        while let Some(item) = ring.next() {
            if let Some(ev) = tracer::decode(&item) {
                tracer.received += 1;
                on_event(&ev);
            }
        }
        let c = tracer.counters()?;
        let accounted = tracer.received + c.get(vtrace_common::Counter::LostEvents);
        if accounted >= c.get(vtrace_common::Counter::Emitted) || Instant::now() > settle {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    on_tick(&tracer, elapsed, true)?;
    drop(ring);
    drop(tracer);
    Ok(())
}

/// `run` on a single-threaded runtime of its own, for the commands that do nothing else
/// meanwhile (`latency`, `drops`, `record`; `serve` also runs its HTTP server).
pub fn run_blocking(
    opts: TracerOptions,
    timing: Timing,
    on_event: impl FnMut(&HopEvent),
    on_tick: impl FnMut(&Tracer, Duration, bool) -> Result<()>,
) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(opts, timing, on_event, on_tick))
}

/// Prints a command's final report: the JSON object with `--json`, else the table (clearing the
/// live screen first); with `-o FILE` the JSON also goes to the file.
pub fn emit_final<T: serde::Serialize>(
    report: &T,
    table: impl FnOnce() -> String,
    json: bool,
    output: Option<&std::path::Path>,
    live: bool,
) -> Result<()> {
    let text = serde_json::to_string(report)?;
    if let Some(path) = output {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    if json {
        println!("{text}");
    } else {
        if live {
            print!("\x1b[2J\x1b[H");
        }
        println!("{}", table());
    }
    Ok(())
}

/// One line on the function tier: what attached, and why the rest did not (grouped by reason).
pub fn function_tier_summary(tracer: &Tracer) -> Option<String> {
    let attached: Vec<String> = tracer
        .attached
        .iter()
        .filter(|(h, _)| h.is_function())
        .map(|(h, a)| format!("{}({})", h.name(), a.name()))
        .collect();
    if attached.is_empty() && tracer.refused.is_empty() {
        return None;
    }
    let mut by_reason: Vec<(&str, Vec<&str>)> = Vec::new();
    for (hook, why) in &tracer.refused {
        match by_reason.iter_mut().find(|(r, _)| *r == why.as_str()) {
            Some((_, hooks)) => hooks.push(hook.name()),
            None => by_reason.push((why.as_str(), vec![hook.name()])),
        }
    }
    let mut line = format!(
        "function tier: {} of {} hooks in use",
        attached.len(),
        attached.len() + tracer.refused.len()
    );
    if !attached.is_empty() {
        line.push_str(&format!(" ({})", attached.join(" ")));
    }
    for (why, hooks) in by_reason {
        line.push_str(&format!("; {}: {why}", hooks.join(", ")));
    }
    if attached.is_empty() {
        line.push_str(" -- tracing on the stable tracepoint tier only");
    }
    Some(line)
}
