//! vtrace's own cost in the kernel: run count and run time of each attached program, from the
//! kernel's BPF statistics (`BPF_ENABLE_STATS`, the same switch as kernel.bpf_stats_enabled),
//! and `vtrace baseline`, which attaches empty programs at the same hooks for comparison.

use std::time::Duration;

use anyhow::{anyhow, Result};
use aya::{programs::BtfTracePoint, Btf, EbpfLoader};
use serde::{Deserialize, Serialize};
use vtrace_common::{Config, Hook};

use crate::tracer;

/// One program's runs so far.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProgramCost {
    pub hook: String,
    pub program: String,
    pub runs: u64,
    pub run_ns: u64,
    pub ns_per_run: f64,
}

impl ProgramCost {
    pub fn new(hook: Hook, program: &str, runs: u64, run_ns: u64) -> ProgramCost {
        ProgramCost::labeled(hook.name(), program, runs, run_ns)
    }

    /// A program that is not one hook's (`work:<row>` for the work functions).
    pub fn labeled(hook: &str, program: &str, runs: u64, run_ns: u64) -> ProgramCost {
        ProgramCost {
            hook: hook.to_string(),
            program: program.to_string(),
            runs,
            run_ns,
            ns_per_run: if runs > 0 {
                run_ns as f64 / runs as f64
            } else {
                0.0
            },
        }
    }
}

/// Keeps the kernel's run-time statistics on while held. Statistics cost two clock reads per
/// program run, so they are only on when asked for.
pub struct StatsGuard(#[allow(dead_code)] std::os::fd::OwnedFd);

pub fn enable_stats() -> Result<StatsGuard> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map(StatsGuard)
        .map_err(|e| anyhow!("enabling BPF run-time statistics: {e}"))
}

pub fn render(costs: &[ProgramCost]) -> String {
    let mut s = format!(
        "{:<26} {:>12} {:>14} {:>10}\n",
        "hook", "runs", "run time", "ns/run"
    );
    for c in costs {
        s.push_str(&format!(
            "{:<26} {:>12} {:>13.3}ms {:>10.1}\n",
            c.hook,
            c.runs,
            c.run_ns as f64 / 1e6,
            c.ns_per_run
        ));
    }
    s
}

/// `vtrace baseline`: empty programs at every latency hook for `duration`, then their costs as
/// JSON. Run beside a vtrace that has `--cost`, in the same run, to subtract the floor.
/// Without `stats` the costs read 0: that run measures what empty programs cost the traffic.
pub fn baseline(duration: Duration, stats: bool) -> Result<Vec<ProgramCost>> {
    let btf = Btf::from_sys_fs().map_err(|e| anyhow!("reading the kernel's BTF: {e}"))?;
    let _stats = if stats { Some(enable_stats()?) } else { None };
    // One object per hook: a loaded program is bound to one tracepoint.
    let mut loaded = Vec::new();
    for hook in crate::latency::HOOKS {
        let mut ebpf = EbpfLoader::new()
            .override_global("CONFIG", &Config::zeroed(), true)
            .map_max_entries("EVENTS", 4096)
            .load(tracer::object())
            .map_err(|e| anyhow!("loading the eBPF object: {e}"))?;
        let prog: &mut BtfTracePoint = ebpf
            .program_mut("vt_empty")
            .ok_or_else(|| anyhow!("vt_empty missing from the object"))?
            .try_into()?;
        prog.load(hook.name(), &btf)?;
        prog.attach()?;
        loaded.push((hook, ebpf));
    }
    eprintln!("vtrace: attached {} empty hooks", loaded.len());
    std::thread::sleep(duration);
    loaded
        .iter()
        .map(|(hook, ebpf)| {
            let info = ebpf
                .program("vt_empty")
                .ok_or_else(|| anyhow!("vt_empty missing"))?
                .info()?;
            Ok(ProgramCost::new(
                *hook,
                "vt_empty",
                info.run_count(),
                info.run_time().as_nanos() as u64,
            ))
        })
        .collect()
}
