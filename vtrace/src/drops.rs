//! `vtrace drops`: which device drops, where in the kernel, and why.
//!
//! Drops are counted in the kernel (`skb:kfree_skb`, aggregated by device, reason and
//! location: no event per drop), and shown beside the kernel's own per-device counters, which
//! also see the drops a driver only counts (xen-netback bumps rx_dropped and frees without a
//! reason; such drops are invisible to `kfree_skb`).

use std::{
    collections::{BTreeMap, HashMap},
    io::IsTerminal,
    time::Duration,
};

use anyhow::Result;
use serde::Serialize;
use vtrace_common::{flags, Config, Counter, Hook};

use crate::{
    cli::DropsArgs,
    kernel::{self, kallsyms::Kallsyms, netdev},
    session::{self, IfaceNamer, Timing},
    tracer::{DropRow, TracerOptions},
};

/// `enum skb_drop_reason` values that are not losses: a free before any drop decision, and a
/// normal consumption routed through kfree_skb_reason.
pub const NOT_LOSSES: [&str; 2] = ["NOT_DROPPED_YET", "CONSUMED"];

/// Whether a device as vtrace names it (`eth0`, or `eth0@netns`) is one of the `--iface` names
/// (empty: all). `--iface` takes kernel device names, which match in any namespace.
pub fn iface_selected(shown: &str, only: &[String]) -> bool {
    let base = shown.split('@').next().unwrap_or(shown);
    only.is_empty() || only.iter().any(|o| o == base)
}

/// Drop counts by (device, reason, location), as the previous refresh saw them.
type DropCounts = HashMap<(String, String, String), u64>;

#[derive(Clone, Debug, Serialize)]
pub struct DropEntry {
    pub iface: String,
    pub reason: String,
    pub location: String,
    pub count: u64,
    pub reason_code: u32,
    /// The data-path stage the dropping function belongs to (see `hooks::stage_of_function`),
    /// when it is one of the stages vtrace knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<crate::hooks::Stage>,
    /// `at_drop`: skb->dev when it was dropped; `arrival`: it had none then, and this is the
    /// device it last arrived on (skb->skb_iif). Only `arrival` is written out.
    #[serde(skip_serializing_if = "is_at_drop")]
    pub device: &'static str,
}

fn is_at_drop(device: &&str) -> bool {
    *device == "at_drop"
}

#[derive(Clone, Debug, Serialize)]
pub struct IfaceEntry {
    pub iface: String,
    pub traced_drops: u64,
    pub kernel_rx_dropped: Option<u64>,
    pub kernel_tx_dropped: Option<u64>,
    pub kernel_rx_missed_errors: Option<u64>,
    /// The traced count and the kernel's counters disagree (see `note`).
    pub mismatch: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The `--json` contract: `duration_s`, `lost_events`, `drops[]`, `ifaces[]` are stable.
#[derive(Clone, Debug, Serialize)]
pub struct DropsReport {
    pub duration_s: f64,
    pub lost_events: u64,
    pub drops: Vec<DropEntry>,
    pub ifaces: Vec<IfaceEntry>,
    pub kfree_skb_calls: u64,
    pub failed_map_inserts: u64,
    /// NAPI poll rounds per device, with the driver's poll function (read at run time): a
    /// device whose rounds use their whole budget has more waiting than one round takes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drivers: Vec<crate::discovery::DriverFunction>,
    /// Polls and per-batch work functions timed per call (see `work::WorkSet::Batches`): how
    /// long the rounds that drain a backlog take.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub work: Vec<crate::work::WorkRow>,
}

/// Turns raw kernel rows and counter deltas into the report.
pub struct Resolver {
    reasons: BTreeMap<u32, String>,
    kallsyms: Option<&'static Kallsyms>,
    namer: IfaceNamer,
    arrival_names: HashMap<(u32, u32), String>,
}

impl Resolver {
    /// The driver functions the programs found, named like the drop rows.
    pub fn drivers(
        &mut self,
        tracer: &crate::tracer::Tracer,
    ) -> Result<Vec<crate::discovery::DriverFunction>> {
        crate::discovery::discovered(tracer, &mut self.namer, self.kallsyms)
    }

    pub fn new() -> Result<Resolver> {
        let btf = kernel::btf::Btf::vmlinux().map_err(anyhow::Error::msg)?;
        Ok(Resolver {
            reasons: kernel::drop_reasons(btf)?,
            kallsyms: Kallsyms::shared(),
            namer: IfaceNamer::new(),
            arrival_names: HashMap::new(),
        })
    }

    pub fn reason(&self, code: u32) -> String {
        self.reasons
            .get(&code)
            .cloned()
            .unwrap_or_else(|| format!("reason_{code}"))
    }

    fn location(&self, addr: u64) -> String {
        match &self.kallsyms {
            Some(k) => k.format(addr),
            None => format!("{addr:#x}"),
        }
    }

    /// The stage of the function holding `addr` (where kfree_skb was called from).
    fn stage(&self, addr: u64) -> Option<crate::hooks::Stage> {
        let sym = self.kallsyms?.symbolize(addr)?;
        crate::hooks::stage_of_function(sym.name, sym.module)
    }

    pub fn entries(
        &mut self,
        rows: &BTreeMap<DropRow, u64>,
        all_reasons: bool,
        only: &[String],
    ) -> Vec<DropEntry> {
        let mut out: HashMap<(String, String, String), DropEntry> = HashMap::new();
        for (row, count) in rows {
            let reason = self.reason(row.reason);
            if !all_reasons && NOT_LOSSES.contains(&reason.as_str()) {
                continue;
            }
            let iface = if row.ifindex == 0 {
                "unknown".to_string()
            } else if row.arrival {
                // No device at the drop: the one it last arrived on, named now.
                let (ifindex, netns) = (row.ifindex, row.netns);
                self.arrival_names
                    .entry((ifindex, netns))
                    .or_insert_with(|| {
                        netdev::name_of(ifindex, netns)
                            .unwrap_or_else(|| format!("ifindex:{ifindex}"))
                    })
                    .clone()
            } else {
                let mut name = [0u8; 16];
                let b = row.ifname.as_bytes();
                name[..b.len().min(15)].copy_from_slice(&b[..b.len().min(15)]);
                self.namer.name(&name, row.netns).to_string()
            };
            if !iface_selected(&iface, only) {
                continue;
            }
            let location = self.location(row.location);
            let stage = self.stage(row.location);
            let e = out
                .entry((iface.clone(), reason.clone(), location.clone()))
                .or_insert(DropEntry {
                    iface,
                    reason,
                    location,
                    count: 0,
                    reason_code: row.reason,
                    stage,
                    device: if row.arrival { "arrival" } else { "at_drop" },
                });
            e.count += count;
        }
        let mut v: Vec<DropEntry> = out.into_values().collect();
        v.sort_by(|a, b| b.count.cmp(&a.count).then(a.iface.cmp(&b.iface)));
        v
    }
}

/// Per device: the traced drops beside the kernel's counter deltas (host namespace devices;
/// devices in other namespaces show only the traced count).
pub fn iface_entries(
    drops: &[DropEntry],
    before: &BTreeMap<String, netdev::DropCounters>,
    after: &BTreeMap<String, netdev::DropCounters>,
    only: &[String],
) -> Vec<IfaceEntry> {
    let mut traced: BTreeMap<String, u64> = BTreeMap::new();
    for d in drops {
        *traced.entry(d.iface.clone()).or_insert(0) += d.count;
    }
    for (name, now) in after {
        let delta = now.delta(before.get(name).unwrap_or(&netdev::DropCounters::default()));
        if delta.total() > 0 {
            traced.entry(name.clone()).or_insert(0);
        }
    }
    traced
        .into_iter()
        .filter(|(name, _)| iface_selected(name, only))
        .map(|(iface, traced_drops)| {
            let delta = after
                .get(&iface)
                .map(|now| now.delta(before.get(&iface).unwrap_or(&netdev::DropCounters::default())));
            let (mismatch, note) = match delta {
                Some(d) => {
                    let kernel = d.rx_dropped + d.tx_dropped + d.rx_missed_errors;
                    if kernel > traced_drops {
                        (true, Some(format!("the kernel counted {} more drops than kfree_skb showed: drops a driver only counts (no drop reason)", kernel - traced_drops)))
                    } else if kernel < traced_drops {
                        (true, Some(format!("{} traced drops are not in the device's counters (dropped by the stack, not the device)", traced_drops - kernel)))
                    } else {
                        (false, None)
                    }
                }
                None => (false, None),
            };
            IfaceEntry {
                iface,
                traced_drops,
                kernel_rx_dropped: delta.map(|d| d.rx_dropped),
                kernel_tx_dropped: delta.map(|d| d.tx_dropped),
                kernel_rx_missed_errors: delta.map(|d| d.rx_missed_errors),
                mismatch,
                note,
            }
        })
        .collect()
}

pub fn run(args: &DropsArgs) -> Result<()> {
    let btf = kernel::btf::Btf::vmlinux().map_err(anyhow::Error::msg)?;
    let mut config = Config::zeroed();
    config.offsets = kernel::resolve_offsets(btf)?;
    config.flags = flags::DROPS;
    let opts = TracerOptions {
        config,
        // napi_poll: rounds per device, a few per millisecond at most, not per packet.
        hooks: vec![Hook::KfreeSkb, Hook::NapiPoll],
        ring_bytes: 4096 * 4,
        functions: false,
        // Where backlogs form: polls and netback's and vhost's batches, timed per call.
        work: crate::work::WorkSet::Batches,
    };
    let timing = Timing {
        duration: args.timing.duration.map(Duration::from_secs_f64),
        interval: Duration::from_secs_f64(args.timing.interval),
    };
    let mut resolver = Resolver::new()?;
    let before = netdev::snapshot();
    let live = !args.json && std::io::stdout().is_terminal();
    let mut last: Option<(Duration, DropCounts)> = None;
    let mut final_report = None;
    session::run_blocking(
        opts,
        timing,
        |_| {},
        |tracer, elapsed, is_last| {
            let rows = tracer.drops()?;
            let drops = resolver.entries(&rows, args.all_reasons, &args.iface);
            let counters = tracer.counters()?;
            if is_last {
                let after = netdev::snapshot();
                final_report = Some(DropsReport {
                    duration_s: elapsed.as_secs_f64(),
                    lost_events: counters.get(Counter::LostEvents),
                    ifaces: iface_entries(&drops, &before, &after, &args.iface),
                    drops,
                    kfree_skb_calls: counters.hook(Hook::KfreeSkb),
                    failed_map_inserts: counters.get(Counter::DropInsertFailed),
                    drivers: resolver.drivers(tracer)?,
                    work: tracer.work_rows()?,
                });
                return Ok(());
            }
            if args.json {
                return Ok(());
            }
            // Rates since the previous refresh.
            let now: HashMap<(String, String, String), u64> = drops
                .iter()
                .map(|d| {
                    (
                        (d.iface.clone(), d.reason.clone(), d.location.clone()),
                        d.count,
                    )
                })
                .collect();
            let mut text = format!(
                "vtrace drops: {:.0}s, {} drop points\n",
                elapsed.as_secs_f64(),
                drops.len()
            );
            text.push_str(&format!(
                "{:<24} {:<28} {:<36} {:>10} {:>10}\n",
                "iface", "reason", "location", "count", "per sec"
            ));
            for d in drops.iter().take(args.top) {
                let key = (d.iface.clone(), d.reason.clone(), d.location.clone());
                let rate = match &last {
                    Some((t, prev)) => {
                        let dt = (elapsed - *t).as_secs_f64().max(1e-3);
                        (d.count - prev.get(&key).copied().unwrap_or(0).min(d.count)) as f64 / dt
                    }
                    None => d.count as f64 / elapsed.as_secs_f64().max(1e-3),
                };
                text.push_str(&format!(
                    "{:<24} {:<28} {:<36} {:>10} {:>10.0}\n",
                    d.iface, d.reason, d.location, d.count, rate
                ));
            }
            if live {
                print!("\x1b[2J\x1b[H{text}");
            } else {
                println!("{text}");
            }
            last = Some((elapsed, now));
            Ok(())
        },
    )?;
    if let Some(r) = final_report {
        session::emit_final(&r, || render(&r), args.json, args.output.as_deref(), live)?;
    }
    Ok(())
}

pub fn render(r: &DropsReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let total: u64 = r.drops.iter().map(|d| d.count).sum();
    let _ = writeln!(
        s,
        "vtrace drops: {:.1}s, {total} drops traced, {} lost events",
        r.duration_s, r.lost_events
    );
    let _ = writeln!(
        s,
        "{:<24} {:<28} {:<36} {:>10}  stage",
        "iface", "reason", "location", "count"
    );
    for d in &r.drops {
        // `<` marks a drop without a device: the one it arrived on.
        let iface = if d.device == "arrival" {
            format!("{}<", d.iface)
        } else {
            d.iface.clone()
        };
        let stage = match d.stage {
            Some(st) => serde_json::to_value(st)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            None => "-".to_string(),
        };
        let _ = writeln!(
            s,
            "{:<24} {:<28} {:<36} {:>10}  {stage}",
            iface, d.reason, d.location, d.count
        );
    }
    if r.drops.iter().any(|d| d.device == "arrival") {
        let _ = writeln!(
            s,
            "(< no device at the drop: the device the packet arrived on)"
        );
    }
    let _ = writeln!(
        s,
        "\nper device: traced vs the kernel's own counters (delta over the run)"
    );
    let _ = writeln!(
        s,
        "{:<24} {:>10} {:>12} {:>12} {:>12}",
        "iface", "traced", "rx_dropped", "tx_dropped", "rx_missed"
    );
    let opt = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
    for i in &r.ifaces {
        let _ = writeln!(
            s,
            "{:<24} {:>10} {:>12} {:>12} {:>12}{}",
            i.iface,
            i.traced_drops,
            opt(i.kernel_rx_dropped),
            opt(i.kernel_tx_dropped),
            opt(i.kernel_rx_missed_errors),
            if i.mismatch { "  MISMATCH" } else { "" }
        );
        if let Some(n) = &i.note {
            let _ = writeln!(s, "    {n}");
        }
    }
    s.push_str(&crate::discovery::render(&r.drivers));
    s.push_str(&crate::work::render(&r.work));
    if r.failed_map_inserts > 0 {
        let _ = writeln!(
            s,
            "note: {} drops could not be added to the in-kernel table (full)",
            r.failed_map_inserts
        );
    }
    s
}
