//! Driver discovery, userspace side: which kernel function serves each device, as the eBPF
//! programs read it from the device's own function pointers (`dev->netdev_ops->ndo_start_xmit`
//! on sampled packets at `net_dev_start_xmit`, `napi->poll` at every `napi:napi_poll`), named
//! with /proc/kallsyms, and matched against the function tier: which function hook covers it,
//! and whether that hook is attached here.

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use aya::maps::{MapData, PerCpuHashMap};
use serde::{Deserialize, Serialize};
use vtrace_common::{driver_kind, work::WorkFn, DriverKey, DriverStats, Hook};

use crate::{kernel::kallsyms::Kallsyms, session::IfaceNamer, tracer::Tracer};

/// One driver function found serving one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DriverFunction {
    /// `name` or `name@netns`, as in the latency and drops reports.
    pub iface: String,
    /// `ndo_start_xmit` or `napi_poll`.
    pub role: String,
    /// The function's symbol as /proc/kallsyms names it (compiler suffixes kept), or its hex
    /// address when no symbol contains it.
    pub function: String,
    /// The module it lives in; `None` when built into the kernel.
    pub module: Option<String>,
    /// `ndo_start_xmit`: sampled packets that showed it; `napi_poll`: poll rounds.
    pub calls: u64,
    /// `napi_poll`: packets processed, and rounds that used the whole budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub napi: Option<NapiRounds>,
    /// The function-tier hook on this function, if vtrace has one.
    pub hook: Option<String>,
    /// `attached (fentry)`, `attached (kprobe)`, the reason it is not, or `no vtrace hook`.
    pub tier: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct NapiRounds {
    pub packets: u64,
    pub budget_exhausted: u64,
}

/// A row of the kernel's discovery map, summed over CPUs.
pub(crate) struct Row {
    pub key: DriverKey,
    pub stats: DriverStats,
}

pub(crate) fn read_rows(tracer: &Tracer) -> Result<Vec<Row>> {
    let map = tracer
        .map("DRIVERS")
        .ok_or_else(|| anyhow!("DRIVERS map missing from the object"))?;
    let drivers: PerCpuHashMap<&MapData, DriverKey, DriverStats> = PerCpuHashMap::try_from(map)?;
    let mut rows = Vec::new();
    for item in drivers.iter() {
        let (key, per_cpu) = item?;
        let mut stats = DriverStats::default();
        for s in per_cpu.iter() {
            // The CPU that inserted the row wrote the name; other CPUs' copies start zeroed.
            if s.func != 0 {
                stats.func = s.func;
            }
            if s.ifname[0] != 0 {
                stats.ifname = s.ifname;
            }
            stats.calls += s.calls;
            stats.work += s.work;
            stats.budget_full += s.budget_full;
        }
        rows.push(Row { key, stats });
    }
    Ok(rows)
}

/// The driver functions discovered so far, by device and role.
pub fn discovered(
    tracer: &Tracer,
    namer: &mut IfaceNamer,
    kallsyms: Option<&Kallsyms>,
) -> Result<Vec<DriverFunction>> {
    let mut out: BTreeMap<(String, u32), DriverFunction> = BTreeMap::new();
    for Row { key, stats } in read_rows(tracer)? {
        let iface = namer.name(&stats.ifname, key.netns).to_string();
        let symbol = kallsyms.and_then(|k| k.symbolize(stats.func));
        let (function, module) = match symbol {
            Some(s) if s.offset == 0 => (s.name.to_string(), s.module.map(str::to_string)),
            // A function pointer points at a function's start; anything else is shown raw.
            Some(s) => (s.to_string(), s.module.map(str::to_string)),
            None => (format!("{:#x}", stats.func), None),
        };
        let role = match key.kind {
            driver_kind::XMIT => "ndo_start_xmit",
            driver_kind::NAPI_POLL => "napi_poll",
            _ => continue,
        };
        let napi = (key.kind == driver_kind::NAPI_POLL).then_some(NapiRounds {
            packets: stats.work,
            budget_exhausted: stats.budget_full,
        });
        let hook = covering_hook(&function);
        let work = covering_work(&function);
        let found_at_run_time = tracer.work.drivers.iter().find(|d| d.addr == stats.func);
        let tier = match (hook, key.kind) {
            // A driver function found at run time and timed per call (or why not).
            (None, _) if found_at_run_time.is_some() => {
                match &found_at_run_time.expect("checked").result {
                    Ok(how) => format!("timed per call ({})", how.name()),
                    Err(why) => format!("not timed: {why}"),
                }
            }
            // A poll function the work tier times per call (veth_poll, virtnet_poll, ...).
            (None, driver_kind::NAPI_POLL) if work.is_some() => {
                work_status(tracer, work.expect("checked"))
            }
            // The tracepoint fires after every poll round, whichever driver: it already
            // measures what a hook on the poll function would (rounds, packets, budget).
            (None, driver_kind::NAPI_POLL) => {
                "covered by napi:napi_poll (rounds, packets, budget)".to_string()
            }
            // net_dev_start_xmit and net_dev_xmit fire right before and after every
            // ndo_start_xmit call (net/core/dev.c, `xmit_one`): the driver's transmit time is
            // their edge on the tracepoint tier, whichever driver.
            (None, _) => "covered by net_dev_start_xmit -> net_dev_xmit".to_string(),
            (Some(h), _) => tier_status(tracer, Some(h)),
        };
        out.insert(
            (iface.clone(), key.kind),
            DriverFunction {
                iface,
                role: role.to_string(),
                function,
                module,
                calls: stats.calls,
                napi,
                hook: hook
                    .map(|h| h.name())
                    .or(work.map(|w| w.name()))
                    .map(str::to_string)
                    .or(found_at_run_time.map(|d| d.function.clone())),
                tier,
            },
        );
    }
    Ok(out.into_values().collect())
}

/// The function-tier hook on `symbol` (a compiler variant such as `veth_xmit.cold` or
/// `foo.isra.0` counts as the function it was made from).
pub fn covering_hook(symbol: &str) -> Option<Hook> {
    let base = symbol.split('.').next().unwrap_or(symbol);
    Hook::FUNCTIONS.into_iter().find(|h| h.name() == base)
}

/// The work function (see `work`) timed on `symbol`, compiler variants included.
pub fn covering_work(symbol: &str) -> Option<WorkFn> {
    let base = symbol.split('.').next().unwrap_or(symbol);
    WorkFn::ALL
        .into_iter()
        .find(|w| !w.is_interval() && w.name() == base)
}

fn work_status(tracer: &Tracer, work: WorkFn) -> String {
    if let Some((_, how)) = tracer.work.attached.iter().find(|(w, _)| *w == work) {
        return format!("timed per call ({})", how.name());
    }
    match tracer.work.refused.iter().find(|(w, _)| *w == work) {
        Some((_, why)) => format!("not timed: {why}; rounds by napi:napi_poll"),
        None => "not timed (work functions not requested); rounds by napi:napi_poll".to_string(),
    }
}

fn tier_status(tracer: &Tracer, hook: Option<Hook>) -> String {
    let Some(hook) = hook else {
        return "no vtrace hook on this function".to_string();
    };
    // The final report is written after `detach`: what it took off was attached for the run.
    let during_run = tracer.attached.iter().chain(&tracer.detached);
    if let Some((_, how)) = during_run.into_iter().find(|(h, _)| *h == hook) {
        return format!("attached ({})", how.name());
    }
    match tracer.refused.iter().find(|(h, _)| *h == hook) {
        Some((_, why)) => format!("not attached: {why}"),
        None => "not attached (function tier not requested)".to_string(),
    }
}

/// The table printed under the latency and drops reports.
pub fn render(found: &[DriverFunction]) -> String {
    if found.is_empty() {
        return String::new();
    }
    let mut s = String::from("\ndriver functions, read from the devices at run time:\n");
    s.push_str(&format!(
        "  {:<22} {:<15} {:<28} {:>9} {:>9} {:>9}  {}\n",
        "device", "role", "function", "calls", "pkt/round", "full", "function tier"
    ));
    for d in found {
        let function = match &d.module {
            Some(m) => format!("{} [{m}]", d.function),
            None => d.function.clone(),
        };
        let (per_round, full) = match d.napi {
            Some(n) if d.calls > 0 => (
                format!("{:.1}", n.packets as f64 / d.calls as f64),
                n.budget_exhausted.to_string(),
            ),
            _ => ("-".to_string(), "-".to_string()),
        };
        let tier = match &d.hook {
            Some(h) if d.tier.starts_with("attached") || d.tier.starts_with("timed") => {
                format!("{h}: {}", d.tier)
            }
            // The reason is in the function tier's one-line summary and in --json.
            Some(h) if d.tier.starts_with("not timed") => format!("{h}: not timed"),
            Some(h) => format!("{h}: not attached"),
            None => d.tier.clone(),
        };
        s.push_str(&format!(
            "  {:<22} {:<15} {:<28} {:>9} {:>9} {:>9}  {}\n",
            d.iface, d.role, function, d.calls, per_round, full, tier
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiler_variants_are_covered_by_their_function_hook() {
        assert_eq!(covering_hook("veth_xmit"), Some(Hook::VethXmit));
        assert_eq!(
            covering_hook("start_xmit.cold"),
            Some(Hook::VirtioStartXmit)
        );
        assert_eq!(covering_hook("tun_net_xmit.isra.0"), Some(Hook::TunNetXmit));
        assert_eq!(covering_hook("ixgbe_xmit_frame"), None);
        assert_eq!(covering_hook("0xffffffff81000000"), None);
        // Poll functions are work functions, timed per call.
        assert_eq!(covering_work("veth_poll"), Some(WorkFn::VethPoll));
        assert_eq!(
            covering_work("virtnet_poll.cold"),
            Some(WorkFn::VirtnetPoll)
        );
        assert_eq!(covering_work("ixgbe_poll"), None);
        assert_eq!(
            covering_work("vhost_wakeup"),
            None,
            "an interval, not a function"
        );
    }
}
