//! Loads vtrace's eBPF object with the load-time configuration, attaches the hooks the user
//! asked for (tp_btf first, raw tracepoint as fallback), and reads what the programs produce.
//!
//! Every attachment is a bpf link owned by this process: when the process exits, however it
//! exits (even SIGKILL), the kernel drops the links and the programs with them.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePoint, FEntry, KProbe, RawTracePoint},
    Btf, Ebpf, EbpfLoader,
};
use vtrace_common::{
    counter_slot, Config, Counter, DropKey, DropStats, Hook, HopEvent, COUNTER_SLOTS, HOOK_ROWS,
};

/// Entries of the tracking map: its per-CPU LRU lists split max_entries between the possible
/// CPUs, so each CPU gets `TRACKED_PER_CPU`.
pub(crate) fn tracked_entries() -> u32 {
    let cpus = aya::util::nr_cpus().unwrap_or(1).max(1) as u32;
    vtrace_common::TRACKED_PER_CPU.saturating_mul(cpus)
}

/// Set to 1, vtrace attaches the raw-tracepoint twins without trying tp_btf: what kernels that
/// refuse tp_btf run, for comparing the two tiers on one kernel (and for testing the fallback).
pub const RAW_TRACEPOINTS_ENV: &str = "VTRACE_RAW_TRACEPOINTS";

fn raw_tracepoints_only() -> bool {
    std::env::var(RAW_TRACEPOINTS_ENV).is_ok_and(|v| v == "1")
}

/// Set to 1, vtrace attaches the function tier with kprobes (and kretprobes) without trying
/// fentry/fexit: what kernels that refuse fentry run, for testing that fallback on a kernel
/// that has both.
pub const KPROBES_ENV: &str = "VTRACE_KPROBES";

/// `Some(reason)` when fentry is not to be tried (`VTRACE_KPROBES=1`).
pub fn fentry_skipped() -> Option<String> {
    std::env::var(KPROBES_ENV)
        .is_ok_and(|v| v == "1")
        .then(|| format!("skipped ({KPROBES_ENV}=1)"))
}

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
    /// fentry on a kernel function (BPF trampoline).
    Fentry,
    /// kprobe on a kernel function: the fallback where fentry is refused.
    Kprobe,
}

impl Attachment {
    pub fn name(self) -> &'static str {
        match self {
            Attachment::TpBtf => "tp_btf",
            Attachment::RawTracepoint => "raw_tp",
            Attachment::Fentry => "fentry",
            Attachment::Kprobe => "kprobe",
        }
    }
}

/// The program that implements `hook` attached as `how` (see vtrace-ebpf/src/stages).
pub fn program_for(hook: Hook, how: Attachment) -> String {
    match how {
        Attachment::TpBtf | Attachment::Fentry => program_name(hook).to_string(),
        Attachment::RawTracepoint => format!("{}_raw", program_name(hook)),
        Attachment::Kprobe => format!("{}_kp", program_name(hook)),
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
        Hook::NapiPoll => "vt_nic_napi_poll",
        Hook::BrHandleFrame => "vt_fn_br_handle_frame",
        Hook::BrForward => "vt_fn_br_forward",
        Hook::BrPassFrameUp => "vt_fn_br_pass_frame_up",
        Hook::BrDevXmit => "vt_fn_br_dev_xmit",
        Hook::TunNetXmit => "vt_fn_tun_net_xmit",
        Hook::TunDoRead => "vt_fn_tun_do_read",
        Hook::XenvifStartXmit => "vt_fn_xenvif_start_xmit",
        Hook::VethXmit => "vt_fn_veth_xmit",
        Hook::VirtioStartXmit => "vt_fn_virtio_start_xmit",
    }
}

/// A loaded object with some hooks attached.
pub struct Tracer {
    ebpf: Ebpf,
    /// Programs vtrace loaded itself (fentry on module functions, see kernel::prog_load):
    /// dropped with the Tracer, or by `detach`, which detaches and frees them.
    loaded_raw: Vec<(Hook, crate::kernel::prog_load::Attached)>,
    pub attached: Vec<(Hook, Attachment)>,
    /// What `detach` took off: the run's hooks, for the reports written after it.
    pub detached: Vec<(Hook, Attachment)>,
    /// Function-tier hooks that could not be attached, and why.
    pub refused: Vec<(Hook, String)>,
    /// Hop events userspace has read (kept by the session).
    pub received: u64,
    /// Program costs read just before `detach`, when the programs are gone.
    final_costs: Option<Vec<crate::cost::ProgramCost>>,
    /// The work functions timed with the function tier (see `work`).
    pub work: crate::work::WorkTier,
    /// Which work functions, and driver functions found at run time, are timed.
    work_set: crate::work::WorkSet,
    /// vtrace's object relocated against this tracer's maps, for the programs vtrace loads
    /// itself; made before the ring buffer is taken out of `ebpf`.
    linker: LazyLinker,
}

/// Options for [`Tracer::start`].
pub struct TracerOptions {
    pub config: Config,
    pub hooks: Vec<Hook>,
    /// Ring buffer size in bytes (a power of two multiple of the page size).
    pub ring_bytes: u32,
    /// Also attach the function tier where the kernel allows it.
    pub functions: bool,
    /// Which work functions to time (see `work`).
    pub work: crate::work::WorkSet,
}

/// Checks that the running kernel's prototype of a function hook has the packet (and the
/// device) where the eBPF program reads them (`Hook::function_args`).
pub fn check_signature(
    info: &crate::kernel::btf::Btf,
    hook: Hook,
) -> std::result::Result<(), String> {
    let args = hook
        .function_args()
        .ok_or_else(|| format!("{} is not a function hook", hook.name()))?;
    check_args(info, hook.name(), args)
}

/// Whether function `name`'s prototype has the packet and device where `args` says.
/// (`tun_do_read` passes the skb as `void *ptr`: tun's ring holds skbs and XDP frames.)
fn check_args(
    info: &crate::kernel::btf::Btf,
    name: &str,
    args: vtrace_common::FunctionArgs,
) -> std::result::Result<(), String> {
    let params = info.func_param_types(name).map_err(|e| e.to_string())?;
    let want_skb = if args.skb_indirect {
        "sk_buff**"
    } else {
        "sk_buff*"
    };
    let ok_skb = params
        .get(args.skb)
        .is_some_and(|t| t == want_skb || (name == "tun_do_read" && t == "void*"));
    let ok_dev = args
        .dev
        .is_none_or(|i| params.get(i).is_some_and(|t| t == "net_device*"));
    if ok_skb && ok_dev {
        Ok(())
    } else {
        Err(format!(
            "{name}({}) differs from what vtrace reads (packet at argument {}): not attached",
            params.join(", "),
            args.skb
        ))
    }
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
            .map_max_entries("TRACKED", tracked_entries())
            .load(OBJECT)
            .map_err(|e| anyhow!("loading vtrace's eBPF object: {e}{}", hint(&e.to_string())))?;
        let mut tracer = Tracer {
            ebpf,
            loaded_raw: Vec::new(),
            attached: Vec::new(),
            detached: Vec::new(),
            refused: Vec::new(),
            received: 0,
            final_costs: None,
            work: Default::default(),
            work_set: opts.work,
            linker: LazyLinker::default(),
        };
        for hook in &opts.hooks {
            let how = tracer.attach(*hook, &btf)?;
            tracer.attached.push((*hook, how));
        }
        if opts.functions || opts.work != crate::work::WorkSet::None {
            tracer.attach_functions(&btf, opts.functions, opts.work);
        }
        Ok(tracer)
    }

    /// The function tier: every function hook the kernel allows, fentry first, then kprobe.
    /// A hook that cannot be attached is recorded in `refused` with the reason, and nothing
    /// of it stays loaded.
    fn attach_functions(&mut self, btf: &Btf, hops: bool, work: crate::work::WorkSet) {
        let info = match crate::kernel::btf::Btf::vmlinux() {
            Ok(i) => i,
            Err(e) => {
                if hops {
                    for hook in Hook::FUNCTIONS {
                        self.refused
                            .push((hook, format!("cannot read the kernel's BTF: {e}")));
                    }
                }
                return;
            }
        };
        let kprobes = crate::hooks::kprobe_support();
        let kallsyms = crate::kernel::kallsyms::Kallsyms::shared();
        // The object relocated against this Tracer's maps, made on the first module function.
        let mut linker = std::mem::take(&mut self.linker);
        if work != crate::work::WorkSet::None {
            // Driver functions are found and attached later, after the ring buffer has been
            // taken out of `ebpf`: the linker needs every map, so it is made now.
            if let Err(e) = linker.get(&self.ebpf, btf) {
                eprintln!("vtrace: driver functions will not be timed: {e}");
            }
        }
        for hook in Hook::FUNCTIONS.into_iter().filter(|_| hops) {
            match self.attach_function(hook, btf, info, &kprobes, kallsyms, &mut linker) {
                Ok(how) => self.attached.push((hook, how)),
                Err(why) => self.refused.push((hook, why)),
            }
        }
        if work != crate::work::WorkSet::None {
            self.work = crate::work::WorkTier::attach_all(
                &mut self.ebpf,
                &mut linker,
                &crate::work::AttachContext {
                    btf,
                    vmlinux: info,
                    kprobes: &kprobes,
                    kallsyms,
                },
                work,
            );
        }
        self.linker = linker;
    }

    /// Times the driver functions the discovery hooks have found on the devices since the
    /// last call (see `WorkTier::time_drivers`); returns a line per function tried.
    pub fn time_discovered_drivers(&mut self) -> Vec<String> {
        if self.work_set == crate::work::WorkSet::None {
            return Vec::new();
        }
        let Ok(rows) = crate::discovery::read_rows(self) else {
            return Vec::new();
        };
        let found: Vec<(u64, &'static str, String)> = rows
            .iter()
            .filter(|r| r.stats.func != 0 && !self.work.examined(r.stats.func))
            .filter_map(|r| {
                let role = match r.key.kind {
                    vtrace_common::driver_kind::XMIT => "ndo_start_xmit",
                    vtrace_common::driver_kind::NAPI_POLL => "napi_poll",
                    _ => return None,
                };
                self.work_set
                    .includes_driver(role)
                    .then(|| (r.stats.func, role, crate::ifname(&r.stats.ifname)))
            })
            .collect();
        if found.is_empty() {
            return Vec::new();
        }
        let (Some(kallsyms), Some(linker), Ok(vmlinux)) = (
            crate::kernel::kallsyms::Kallsyms::shared(),
            self.linker.ready(),
            crate::kernel::btf::Btf::vmlinux(),
        ) else {
            return Vec::new();
        };
        self.work.time_drivers(linker, vmlinux, kallsyms, &found)
    }

    fn attach_function(
        &mut self,
        hook: Hook,
        btf: &Btf,
        info: &crate::kernel::btf::Btf,
        kprobes: &Result<(), String>,
        kallsyms: Option<&crate::kernel::kallsyms::Kallsyms>,
        linker: &mut LazyLinker,
    ) -> std::result::Result<Attachment, String> {
        use crate::hooks::{try_program, CATALOG};
        let name = hook.name();
        let module = CATALOG
            .iter()
            .find(|h| h.name == name)
            .and_then(|h| h.module);
        let fentry_said = if info.has_func(name) {
            check_signature(info, hook)?;
            if let Some(skipped) = fentry_skipped() {
                format!("fentry: {skipped}")
            } else {
                match try_program::<FEntry>(
                    &mut self.ebpf,
                    &program_for(hook, Attachment::Fentry),
                    |p| {
                        p.load(name, btf)?;
                        p.attach().map(drop)
                    },
                ) {
                    Ok(()) => return Ok(Attachment::Fentry),
                    Err(e) => format!("fentry: {}", e.message),
                }
            }
        } else {
            let module_btf = module.and_then(|m| crate::kernel::btf::Btf::module(m, info).ok());
            match (module, module_btf) {
                (Some(m), Some(mb)) if mb.has_func(name) => {
                    // In a module: aya 0.14 cannot target module BTF, vtrace loads it itself.
                    check_signature(&mb, hook)?;
                    if let Some(skipped) = fentry_skipped() {
                        format!("fentry: {skipped}")
                    } else {
                        match self.attach_module_fentry(hook, m, &mb, btf, linker) {
                            Ok(()) => return Ok(Attachment::Fentry),
                            Err(e) => format!("fentry: {e}"),
                        }
                    }
                }
                // A kernel built without module BTF (CONFIG_DEBUG_INFO_BTF_MODULES): no
                // fentry, and no prototype to check; a kprobe by symbol still attaches.
                (Some(m), _)
                    if std::path::Path::new(&format!("/sys/module/{m}")).exists()
                        && !std::path::Path::new(&format!("/sys/kernel/btf/{m}")).exists() =>
                {
                    format!(
                        "fentry: module {m} has no BTF (/sys/kernel/btf/{m}; prototype unchecked)"
                    )
                }
                (Some(m), _) => {
                    return Err(format!(
                        "not in this kernel (module {m} not loaded, or {name} inlined)"
                    ))
                }
                (None, _) => return Err(format!("{name} is not in this kernel's BTF")),
            }
        };
        if let Err(why) = kprobes {
            return Err(format!("{fentry_said}; kprobe: {why}"));
        }
        // kprobes attach by symbol: the function itself, else a compiler variant of it.
        let symbol = kallsyms
            .and_then(|k| k.lookup(name).first().map(|s| s.name.clone()))
            .ok_or_else(|| format!("{fentry_said}; kprobe: {name} not in /proc/kallsyms"))?;
        match try_program::<KProbe>(
            &mut self.ebpf,
            &program_for(hook, Attachment::Kprobe),
            |p| {
                p.load()?;
                p.attach(&symbol, 0).map(drop)
            },
        ) {
            Ok(()) => Ok(Attachment::Kprobe),
            Err(e) => Err(format!("{fentry_said}; kprobe: {}", e.message)),
        }
    }

    /// fentry on `hook`'s function in kernel module `module` (its split BTF `module_btf`),
    /// loaded by vtrace itself (kernel::prog_load). Kept in `loaded_raw` until detached.
    fn attach_module_fentry(
        &mut self,
        hook: Hook,
        module: &str,
        module_btf: &crate::kernel::btf::Btf,
        btf: &Btf,
        linker: &mut LazyLinker,
    ) -> std::result::Result<(), String> {
        let linker = linker.get(&self.ebpf, btf)?;
        let attached = crate::kernel::prog_load::fentry_in_module(
            linker,
            &program_for(hook, Attachment::Fentry),
            module,
            module_btf,
            hook.name(),
        )
        .map_err(|e| e.message)?;
        self.loaded_raw.push((hook, attached));
        Ok(())
    }

    fn unload(&mut self, hook: Hook, how: Attachment) {
        crate::hooks::unload_program(&mut self.ebpf, &program_for(hook, how));
    }

    fn attach(&mut self, hook: Hook, btf: &Btf) -> Result<Attachment> {
        let name = program_name(hook);
        let tp = hook.name();
        let btf_err = if raw_tracepoints_only() {
            anyhow!("skipped: {RAW_TRACEPOINTS_ENV}=1")
        } else {
            match self.try_tp_btf(name, tp, btf) {
                Ok(()) => return Ok(Attachment::TpBtf),
                Err(e) => e,
            }
        };
        // Whatever tp_btf left loaded goes before the fallback is loaded.
        self.unload(hook, Attachment::TpBtf);
        let raw_name = format!("{name}_raw");
        self.try_raw(&raw_name, tp).map_err(|raw_err| {
            anyhow!(
                "cannot attach to {}:{tp}: tp_btf: {btf_err:#}; raw tracepoint: {raw_err:#}",
                hook.group()
            )
        })?;
        if !raw_tracepoints_only() {
            // Works, a little dearer (every field read is a helper call): say why, once.
            eprintln!(
                "vtrace: {}:{tp} runs as a raw tracepoint; tp_btf was refused: {btf_err:#}",
                hook.group()
            );
        }
        Ok(Attachment::RawTracepoint)
    }

    fn try_tp_btf(&mut self, name: &str, tp: &str, btf: &Btf) -> Result<()> {
        let prog: &mut BtfTracePoint = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} not in the object"))?
            .try_into()?;
        prog.load(tp, btf).map_err(|e| {
            // The verifier's reason, on one line, rather than its whole log.
            let hint = hint(&format!("{e:?}"));
            match &e {
                aya::programs::ProgramError::LoadError {
                    io_error,
                    verifier_log,
                } => {
                    let log = format!("{verifier_log:?}");
                    let reason = crate::kernel::prog_load::verifier_reason(&log);
                    anyhow!("BPF_PROG_LOAD: {io_error}: verifier: {reason}{hint}")
                }
                _ => anyhow!("{e}{hint}"),
            }
        })?;
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
            let name = program_for(*hook, *how);
            if let Some((_, raw)) = self.loaded_raw.iter().find(|(h, _)| h == hook) {
                let info = raw
                    .info()
                    .map_err(|e| anyhow!("reading program {name}: {e}"))?;
                out.push(crate::cost::ProgramCost::new(
                    *hook,
                    &name,
                    info.run_cnt,
                    info.run_time_ns,
                ));
                continue;
            }
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
        out.extend(self.work.costs(&self.ebpf)?);
        Ok(out)
    }

    /// Detaches and unloads every program, keeping the maps: after this no hop event is made,
    /// so draining the ring buffer once more accounts for every event (received + lost ==
    /// emitted).
    pub fn detach(&mut self) {
        self.final_costs = self.program_costs().ok();
        // Closing the link and program fds detaches and frees what vtrace loaded itself.
        self.loaded_raw.clear();
        self.work.detach(&mut self.ebpf);
        for (hook, how) in std::mem::take(&mut self.attached) {
            self.unload(hook, how);
            self.detached.push((hook, how));
        }
    }

    /// The work functions' report rows so far (see `work`), then the driver functions timed.
    pub fn work_rows(&self) -> Result<Vec<crate::work::WorkRow>> {
        let mut rows = Vec::new();
        if !self.work.attached.is_empty() {
            rows = crate::work::rows(&self.work.attached, &crate::work::read(&self.ebpf)?);
        }
        if !self.work.drivers.is_empty() {
            if let Some(kallsyms) = crate::kernel::kallsyms::Kallsyms::shared() {
                rows.extend(self.work.driver_rows(&self.ebpf, kallsyms)?);
            }
        }
        Ok(rows)
    }

    /// One of the object's maps, to read (see `discovery`).
    pub fn map(&self, name: &str) -> Option<&aya::maps::Map> {
        self.ebpf.map(name)
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
        let drops: PerCpuHashMap<&MapData, DropKey, DropStats> = PerCpuHashMap::try_from(map)?;
        let mut out = BTreeMap::new();
        for item in drops.iter() {
            let (key, values) = item?;
            // The CPUs that created their copy of the row read the name and namespace; the
            // others' copies are zero.
            let named = values
                .iter()
                .find(|v| v.ifname[0] != 0 || v.netns != 0)
                .copied()
                .unwrap_or_default();
            let row = DropRow {
                ifname: crate::ifname(&named.ifname),
                ifindex: key.ifindex,
                netns: named.netns,
                reason: key.reason,
                location: key.location,
                arrival: key.flags & vtrace_common::drop_flags::ARRIVAL_DEVICE != 0,
            };
            *out.entry(row).or_insert(0) += values.iter().map(|v| v.count).sum::<u64>();
        }
        Ok(out)
    }
}

/// The object relocated against one `Ebpf`'s maps (kernel::prog_load::Linker), made on first
/// use: parsing the object again is only needed when a function is in a module. A failure is
/// kept, so every module function reports it.
#[derive(Default)]
pub struct LazyLinker(Option<std::result::Result<crate::kernel::prog_load::Linker, String>>);

impl LazyLinker {
    pub fn get(
        &mut self,
        ebpf: &Ebpf,
        btf: &Btf,
    ) -> std::result::Result<&crate::kernel::prog_load::Linker, String> {
        self.0
            .get_or_insert_with(|| {
                crate::kernel::prog_load::Linker::new(OBJECT, ebpf, btf).map_err(|e| e.message)
            })
            .as_ref()
            .map_err(|e| e.clone())
    }

    /// The linker if it has been made (by `get`).
    pub fn ready(&self) -> Option<&crate::kernel::prog_load::Linker> {
        self.0.as_ref().and_then(|r| r.as_ref().ok())
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
#[derive(Clone, Copy, Debug)]
pub struct Counters {
    pub slots: [u64; COUNTER_SLOTS as usize],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            slots: [0; COUNTER_SLOTS as usize],
        }
    }
}

impl Counters {
    /// Every packet seen at `hook`.
    pub fn hook(&self, hook: Hook) -> u64 {
        self.slot(hook as u32, Counter::Packets)
    }

    /// Counter `c` summed over every hook's row.
    pub fn get(&self, c: Counter) -> u64 {
        (0..HOOK_ROWS).map(|h| self.slot(h, c)).sum()
    }

    fn slot(&self, hook: u32, c: Counter) -> u64 {
        self.slots
            .get(counter_slot(hook, c) as usize)
            .copied()
            .unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The argument positions the function-tier programs read, against this kernel's BTF:
    /// every function hook built into this kernel must match, and a wrong position is caught.
    #[test]
    fn function_hook_arguments_match_this_kernels_btf() {
        let info = crate::kernel::btf::Btf::from_sys_vmlinux().expect("BTF");
        let mut checked = Vec::new();
        for hook in Hook::FUNCTIONS {
            if info.has_func(hook.name()) {
                check_signature(&info, hook).unwrap_or_else(|e| panic!("{e}"));
                checked.push(hook.name());
            }
        }
        // bridge, tun, veth and virtio-net are built into this kernel; xen-netback is not.
        for f in [
            "br_handle_frame",
            "br_forward",
            "br_pass_frame_up",
            "br_dev_xmit",
            "tun_net_xmit",
            "tun_do_read",
            "veth_xmit",
            "start_xmit",
        ] {
            assert!(
                checked.contains(&f),
                "{f} not in this kernel's BTF: {checked:?}"
            );
        }
        let wrong = Hook::BrHandleFrame.function_args().unwrap();
        assert!(
            check_args(&info, "br_forward", wrong).is_err(),
            "a pointer-to-pointer is not br_forward's argument 0"
        );
    }

    /// Both twins of every tracepoint program pass this kernel's verifier with the offsets
    /// resolved from its BTF: the tp_btf one (typed loads, checked against the struct layout)
    /// that runs here, and the raw one (`bpf_probe_read_kernel`) that kernels refusing tp_btf
    /// fall back to. Loading checks every path of the program, not only those traffic takes.
    #[test]
    fn every_tracepoint_program_and_its_raw_twin_pass_the_verifier() {
        let info = crate::kernel::btf::Btf::from_sys_vmlinux().expect("BTF");
        let mut config = Config::zeroed();
        config.offsets = crate::kernel::resolve_offsets(&info).expect("offsets");
        // Every feature on, so no branch is pruned as dead.
        config.flags = vtrace_common::flags::TRACK
            | vtrace_common::flags::DROPS
            | vtrace_common::flags::FILTER_IFACE
            | vtrace_common::flags::FILTER_PROTO
            | vtrace_common::flags::FILTER_HOST
            | vtrace_common::flags::FILTER_PORT
            | vtrace_common::flags::SKIP_LOOPBACK;
        config.sample_every = 16;
        let btf = Btf::from_sys_fs().expect("BTF");
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("CONFIG", &config, true)
            .map_max_entries("EVENTS", 1 << 16)
            .map_max_entries("TRACKED", tracked_entries())
            .load(OBJECT)
            .expect("object loads");
        for hook in Hook::TRACEPOINTS {
            let typed = program_for(hook, Attachment::TpBtf);
            let prog: &mut BtfTracePoint = ebpf
                .program_mut(&typed)
                .expect("in the object")
                .try_into()
                .expect("tp_btf");
            prog.load(hook.name(), &btf)
                .unwrap_or_else(|e| panic!("{typed}: {e:?}"));
            let raw = program_for(hook, Attachment::RawTracepoint);
            let prog: &mut RawTracePoint = ebpf
                .program_mut(&raw)
                .expect("in the object")
                .try_into()
                .expect("raw_tp");
            prog.load().unwrap_or_else(|e| panic!("{raw}: {e:?}"));
        }
    }

    /// The function tier's module path as the Tracer takes it (`attach_module_fentry`, the
    /// Tracer's own maps, `loaded_raw`): a module without a BTF object is one line of reason;
    /// with a BTF object (vmlinux's standing in for a module's, as this machine loads no
    /// modules) the kernel decides: it refuses fentry here (EPERM), leaving nothing recorded
    /// or loaded; where fentry is allowed the hook counts, reports its cost and goes at
    /// `detach`.
    #[test]
    fn module_fentry_in_the_tracer_fails_cleanly_or_attaches() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: loading programs needs root");
            return;
        }
        use crate::kernel::bpf_sys;
        let before = bpf_sys::program_ids();
        let info = crate::kernel::btf::Btf::vmlinux().expect("BTF");
        let mut config = Config::zeroed();
        config.offsets = crate::kernel::resolve_offsets(info).expect("offsets");
        let mut tracer = Tracer::start(TracerOptions {
            config,
            hooks: Vec::new(),
            ring_bytes: 1 << 16,
            functions: false,
            work: crate::work::WorkSet::None,
        })
        .expect("tracer starts");
        let btf = Btf::from_sys_fs().expect("BTF");
        let mut linker = LazyLinker::default();
        let hook = Hook::BrHandleFrame;

        let no_object = "vtrace_no_such_module";
        let e = tracer
            .attach_module_fentry(hook, no_object, info, &btf, &mut linker)
            .unwrap_err();
        assert!(
            e.contains(&format!("module {no_object}")) && !e.contains('\n'),
            "{e}"
        );
        assert!(tracer.loaded_raw.is_empty());

        match tracer.attach_module_fentry(hook, "vmlinux", info, &btf, &mut linker) {
            Ok(()) => {
                eprintln!("fentry allowed on this kernel: the module path attached");
                tracer.attached.push((hook, Attachment::Fentry));
                let costs = tracer.program_costs().expect("costs");
                assert_eq!(costs.len(), 1);
                assert_eq!(costs[0].program, program_for(hook, Attachment::Fentry));
                tracer.detach();
                assert!(tracer.loaded_raw.is_empty() && tracer.attached.is_empty());
            }
            Err(e) => {
                eprintln!("fentry refused through the module path: {e}");
                assert!(e.starts_with("BPF_PROG_LOAD refused ("), "{e}");
                assert!(!e.contains('\n'), "one line: {e}");
                assert!(tracer.loaded_raw.is_empty());
            }
        }
        drop(tracer);
        // Nothing of the function tier stays loaded (the kernel frees asynchronously).
        let left = bpf_sys::programs_left(&before, "vt_fn_");
        assert!(left.is_empty(), "left loaded: {left:?}");
    }
}
