//! Loads vtrace's eBPF object with the load-time configuration, attaches the hooks the user
//! asked for (tp_btf first, raw tracepoint as fallback), and reads what the programs produce.
//!
//! Every attachment is a bpf link owned by this process: when the process exits, however it
//! exits (even SIGKILL), the kernel drops the links and the programs with them.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePoint, RawTracePoint},
    Btf, Ebpf, EbpfLoader,
};
use vtrace_common::{Config, Counter, DropKey, Hook, HopEvent, COUNTER_SLOTS};

/// The eBPF object built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vtrace.bpf.o"));

pub fn object() -> &'static [u8] {
    OBJECT
}

/// How a hook ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attachment {
    /// BTF-typed tracepoint: typed arguments, the cheapest.
    TpBtf,
    /// Raw tracepoint: the fallback where tp_btf is refused.
    RawTracepoint,
}

impl Attachment {
    pub fn name(self) -> &'static str {
        match self {
            Attachment::TpBtf => "tp_btf",
            Attachment::RawTracepoint => "raw_tp",
        }
    }
}

/// Program names for a hook: `vt_<stage>_<hook>` and its `_raw` twin (see vtrace-ebpf/src/stages).
pub fn program_name(hook: Hook) -> &'static str {
    match hook {
        Hook::NetifReceiveSkb => "vt_rx_netif_receive_skb",
        Hook::NetifRx => "vt_rx_netif_rx",
        Hook::NapiGroReceiveEntry => "vt_rx_napi_gro_receive_entry",
        Hook::NetDevQueue => "vt_tx_net_dev_queue",
        Hook::NetDevStartXmit => "vt_tx_net_dev_start_xmit",
        Hook::NetDevXmit => "vt_tx_net_dev_xmit",
        Hook::QdiscDequeue => "vt_tx_qdisc_dequeue",
        Hook::SkbCopyDatagramIovec => "vt_sock_skb_copy_datagram_iovec",
        Hook::ConsumeSkb => "vt_free_consume_skb",
        Hook::KfreeSkb => "vt_free_kfree_skb",
    }
}

/// A loaded object with some hooks attached.
pub struct Tracer {
    ebpf: Ebpf,
    pub attached: Vec<(Hook, Attachment)>,
    /// Hop events userspace has read (kept by the session).
    pub received: u64,
    /// Program costs read just before `detach`, when the programs are gone.
    final_costs: Option<Vec<crate::cost::ProgramCost>>,
}

/// Options for [`Tracer::start`].
pub struct TracerOptions {
    pub config: Config,
    pub hooks: Vec<Hook>,
    /// Ring buffer size in bytes (a power of two multiple of the page size).
    pub ring_bytes: u32,
}

impl Tracer {
    /// Loads the object and attaches every requested hook. On any failure nothing stays
    /// attached: the links die with the `Ebpf` value dropped on the error path.
    pub fn start(opts: TracerOptions) -> Result<Tracer> {
        let btf =
            Btf::from_sys_fs().context("reading the kernel's BTF (/sys/kernel/btf/vmlinux)")?;
        #[allow(deprecated)]
        let ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("CONFIG", &opts.config, true)
            .map_max_entries("EVENTS", opts.ring_bytes)
            .load(OBJECT)
            .map_err(|e| anyhow!("loading vtrace's eBPF object: {e}{}", hint(&e.to_string())))?;
        let mut tracer = Tracer {
            ebpf,
            attached: Vec::new(),
            received: 0,
            final_costs: None,
        };
        for hook in &opts.hooks {
            let how = tracer.attach(*hook, &btf)?;
            tracer.attached.push((*hook, how));
        }
        Ok(tracer)
    }

    fn attach(&mut self, hook: Hook, btf: &Btf) -> Result<Attachment> {
        let name = program_name(hook);
        let tp = hook.tracepoint();
        let btf_err = match self.try_tp_btf(name, tp, btf) {
            Ok(()) => return Ok(Attachment::TpBtf),
            Err(e) => e,
        };
        let raw_name = format!("{name}_raw");
        self.try_raw(&raw_name, tp).map_err(|raw_err| {
            anyhow!(
                "cannot attach to {}:{tp}: tp_btf: {btf_err:#}; raw tracepoint: {raw_err:#}",
                hook.group()
            )
        })?;
        Ok(Attachment::RawTracepoint)
    }

    fn try_tp_btf(&mut self, name: &str, tp: &str, btf: &Btf) -> Result<()> {
        let prog: &mut BtfTracePoint = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} not in the object"))?
            .try_into()?;
        prog.load(tp, btf)
            .map_err(|e| anyhow!("{e}{}", hint(&format!("{e:?}"))))?;
        prog.attach()?;
        Ok(())
    }

    fn try_raw(&mut self, name: &str, tp: &str) -> Result<()> {
        let prog: &mut RawTracePoint = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} not in the object"))?
            .try_into()?;
        prog.load()
            .map_err(|e| anyhow!("{e}{}", hint(&format!("{e:?}"))))?;
        prog.attach(tp)?;
        Ok(())
    }

    /// The ring buffer of hop events; take it once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or_else(|| anyhow!("EVENTS map missing from the object"))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Run count and run time of every attached program (non-zero only while BPF statistics
    /// are enabled, see `cost::enable_stats`).
    pub fn program_costs(&self) -> Result<Vec<crate::cost::ProgramCost>> {
        if let Some(costs) = &self.final_costs {
            return Ok(costs.clone());
        }
        let mut out = Vec::new();
        for (hook, how) in &self.attached {
            let name = match how {
                Attachment::TpBtf => program_name(*hook).to_string(),
                Attachment::RawTracepoint => format!("{}_raw", program_name(*hook)),
            };
            let info = self
                .ebpf
                .program(&name)
                .ok_or_else(|| anyhow!("program {name} missing"))?
                .info()?;
            out.push(crate::cost::ProgramCost::new(
                *hook,
                &name,
                info.run_count(),
                info.run_time().as_nanos() as u64,
            ));
        }
        Ok(out)
    }

    /// Detaches and unloads every program, keeping the maps: after this no hop event is made,
    /// so draining the ring buffer once more accounts for every event (received + lost ==
    /// emitted).
    pub fn detach(&mut self) {
        self.final_costs = self.program_costs().ok();
        for (hook, how) in std::mem::take(&mut self.attached) {
            let name = match how {
                Attachment::TpBtf => program_name(hook).to_string(),
                Attachment::RawTracepoint => format!("{}_raw", program_name(hook)),
            };
            if let Some(prog) = self.ebpf.program_mut(&name) {
                let _ = match prog {
                    aya::programs::Program::BtfTracePoint(p) => p.unload(),
                    aya::programs::Program::RawTracePoint(p) => p.unload(),
                    _ => Ok(()),
                };
            }
        }
        // A program already running on another CPU finishes within an RCU grace period.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    /// Sums of the per-CPU counters.
    pub fn counters(&self) -> Result<Counters> {
        let map = self
            .ebpf
            .map("COUNTERS")
            .ok_or_else(|| anyhow!("COUNTERS map missing"))?;
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        let mut slots = [0u64; COUNTER_SLOTS as usize];
        for (i, slot) in slots.iter_mut().enumerate() {
            *slot = arr.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(Counters { slots })
    }

    /// Drops counted in the kernel, summed over CPUs.
    pub fn drops(&self) -> Result<BTreeMap<DropRow, u64>> {
        let map = self
            .ebpf
            .map("DROPS")
            .ok_or_else(|| anyhow!("DROPS map missing"))?;
        let drops: PerCpuHashMap<&MapData, DropKey, u64> = PerCpuHashMap::try_from(map)?;
        let mut out = BTreeMap::new();
        for item in drops.iter() {
            let (key, values) = item?;
            let row = DropRow {
                ifname: crate::ifname(&key.ifname),
                ifindex: key.ifindex,
                netns: key.netns,
                reason: key.reason,
                location: key.location,
                arrival: key.flags & vtrace_common::drop_flags::ARRIVAL_DEVICE != 0,
            };
            *out.entry(row).or_insert(0) += values.iter().sum::<u64>();
        }
        Ok(out)
    }
}

/// One row of the in-kernel drop table.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DropRow {
    pub ifname: String,
    pub ifindex: u32,
    pub netns: u32,
    pub reason: u32,
    pub location: u64,
    /// The skb had no device at the drop: `ifindex` is where it last arrived (`skb_iif`).
    pub arrival: bool,
}

/// The per-CPU counters, summed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub slots: [u64; COUNTER_SLOTS as usize],
}

impl Counters {
    pub fn hook(&self, hook: Hook) -> u64 {
        self.slots[hook as usize]
    }
    pub fn get(&self, c: Counter) -> u64 {
        self.slots[c as usize]
    }
}

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Option<HopEvent> {
    if bytes.len() < std::mem::size_of::<HopEvent>() {
        return None;
    }
    // SAFETY: the length was checked; HopEvent is plain data valid for any bytes; the read is
    // unaligned-safe.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const HopEvent) })
}

/// The hint a user needs after a kernel refusal.
pub fn hint(err: &str) -> &'static str {
    if err.contains("EPERM")
        || err.contains("Operation not permitted")
        || err.contains("os error 1)")
    {
        " (the kernel said EPERM: run as root, or grant CAP_BPF and CAP_PERFMON; on some kernels lockdown or a security module refuses this program type)"
    } else if err.contains("ENOENT") || err.contains("No such file") {
        " (not in this kernel: the tracepoint or function does not exist, or its module is not loaded)"
    } else if err.contains("EINVAL") {
        " (the kernel refused the program: see the verifier log above, and check kernel version >= 5.5 for tp_btf)"
    } else {
        ""
    }
}
