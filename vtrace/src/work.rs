//! The function tier's work functions (`vtrace_common::work`): vhost-net's handlers and its
//! worker's wake-up, tun's socket calls, xen-netback's kthread actions and NAPI polls. They do
//! a stage's work for a batch of packets, so they are timed per call rather than joined to a
//! packet's path: how long a `handle_tx` takes, how many packets a `xenvif_poll` moves, how
//! long a kick waits for the vhost worker.
//!
//! Attaching follows the function hooks' order: fentry + fexit (through vtrace's own loader,
//! `kernel::prog_load`, for vmlinux and module functions alike), else kprobe + kretprobe, else
//! the row is refused with the reason. A row attaches whole or not at all: an entry without
//! its return would count calls it never times.
//!
//! Driver functions no row names (`ixgbe_poll`, `dummy_xmit`, ...) are found from the devices
//! at run time, by the discovery hooks, and timed from then on by one generic fentry/fexit
//! pair keyed by the function's address (`WorkTier::time_drivers`).

use anyhow::{anyhow, Result};
use aya::{
    maps::{MapData, PerCpuArray, PerCpuHashMap},
    programs::KProbe,
    Btf as AyaBtf, Ebpf,
};
use aya_obj::generated::bpf_attach_type;
use serde::Serialize;
use vtrace_common::work::{
    Returns, WorkFn, WorkStats, WAKEUP_QUEUE_FUNCTIONS, WAKEUP_QUEUE_WORK_ARG,
    WAKEUP_RUN_FUNCTIONS, WAKEUP_RUN_WORK_ARG, WORK_BUCKETS, WORK_FN_COUNT,
};

use crate::{
    kernel::{btf::Btf, kallsyms::Kallsyms, prog_load},
    tracer::{Attachment, LazyLinker},
};

/// The programs of a timed row: (fentry, fexit, kprobe, kretprobe), see
/// vtrace-ebpf/src/stages/work.rs.
fn programs(row: WorkFn) -> [String; 4] {
    let base = format!("vt_wk_{}", row.name());
    [
        base.clone(),
        format!("{base}_ret"),
        format!("{base}_kp"),
        format!("{base}_kret"),
    ]
}

/// The wake-up's programs: at the queueing function, at the work handlers (fentry; kprobe).
const WAKE_QUEUE: [&str; 2] = ["vt_wk_vhost_queue", "vt_wk_vhost_queue_kp"];
const WAKE_RUN: [&str; 2] = ["vt_wk_vhost_run", "vt_wk_vhost_run_kp"];

/// The C return types an exit program reads its row's return register as.
fn return_types(r: Returns) -> &'static [&'static str] {
    match r {
        Returns::Nothing => &["void"],
        Returns::Bool => &["bool", "_Bool"],
        Returns::Packets | Returns::Bytes { wide: false } => &["int"],
        Returns::Bytes { wide: true } => &["ssize_t", "long int", "long"],
    }
}

/// Where a function is: in vmlinux (`module` None), in a module with BTF (`btf`), or in a
/// loaded module without BTF (`btf` None, `module` Some): kprobes only, its prototype unchecked.
struct Located {
    btf: Option<Btf>,
    module: Option<&'static str>,
}

impl Located {
    /// The BTF to check the prototype in and to attach fentry by; None without module BTF.
    fn btf<'a>(&'a self, vmlinux: &'a Btf) -> Option<&'a Btf> {
        match (&self.btf, self.module) {
            (Some(m), _) => Some(m),
            (None, None) => Some(vmlinux),
            (None, Some(_)) => None,
        }
    }

    /// Why fentry cannot be tried, when it cannot.
    fn no_btf(&self) -> Option<String> {
        match (&self.btf, self.module) {
            (None, Some(m)) => Some(format!(
                "module {m} has no BTF (/sys/kernel/btf/{m}; prototype unchecked)"
            )),
            _ => None,
        }
    }
}

/// Finds function `name` in vmlinux BTF, else in module `module`'s; in a loaded module
/// without BTF (a kernel without CONFIG_DEBUG_INFO_BTF_MODULES), by its kallsyms symbol.
fn locate(cx: &AttachContext, name: &str, module: &'static str) -> Result<Located, String> {
    if cx.vmlinux.has_func(name) {
        return Ok(Located {
            btf: None,
            module: None,
        });
    }
    if !std::path::Path::new(&format!("/sys/module/{module}")).exists() {
        return Err(format!(
            "not in this kernel (module {module} not loaded, or not built)"
        ));
    }
    if !std::path::Path::new(&format!("/sys/kernel/btf/{module}")).exists() {
        return match cx.kallsyms.map(|k| k.lookup(name).is_empty()) {
            Some(false) => Ok(Located {
                btf: None,
                module: Some(module),
            }),
            _ => Err(format!(
                "module {module} has no BTF and {name} is not in /proc/kallsyms"
            )),
        };
    }
    match Btf::module(module, cx.vmlinux) {
        Ok(m) if m.has_func(name) => Ok(Located {
            btf: Some(m),
            module: Some(module),
        }),
        Ok(_) => Err(format!(
            "{name} is not in module {module}'s BTF (not in this kernel version, renamed, or inlined)"
        )),
        Err(e) => Err(format!("reading /sys/kernel/btf/{module}: {e}")),
    }
}

/// Which work functions a command times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkSet {
    None,
    /// Every row, and every driver function found at run time (`latency`, `serve`).
    All,
    /// The rows that run once per batch (polls, netback's actions, vhost's handlers and
    /// wake-up) and the NAPI poll functions found at run time: where backlogs, and then
    /// drops, build up (`drops`, which runs under floods: no per-frame rows).
    Batches,
}

impl WorkSet {
    fn includes(self, row: WorkFn) -> bool {
        match self {
            WorkSet::None => false,
            WorkSet::All => true,
            WorkSet::Batches => !row.per_packet(),
        }
    }

    /// Whether a driver function found in `role` (`ndo_start_xmit`, `napi_poll`) is timed.
    pub fn includes_driver(self, role: &str) -> bool {
        match self {
            WorkSet::None => false,
            WorkSet::All => true,
            WorkSet::Batches => role == "napi_poll",
        }
    }
}

/// What vtrace attached of the work tier, and what it could not.
#[derive(Default)]
pub struct WorkTier {
    /// fentry/fexit programs vtrace loaded itself: dropping one detaches and frees it.
    links: Vec<(WorkFn, prog_load::Attached)>,
    /// kprobe programs loaded through aya, unloaded by `detach`.
    kprobes: Vec<(WorkFn, String)>,
    /// The rows attached, and how (kept after `detach`, for the final report).
    pub attached: Vec<(WorkFn, Attachment)>,
    pub refused: Vec<(WorkFn, String)>,
    /// Driver functions found at run time (see `time_drivers`), by function address.
    pub drivers: Vec<DriverTimed>,
    /// fentry/fexit pairs on driver functions.
    driver_links: Vec<prog_load::Attached>,
    /// Function addresses already looked at (timed, refused, or covered by the catalog).
    examined: std::collections::HashSet<u64>,
}

/// A driver function found serving a device at run time, and whether it is timed.
#[derive(Clone, Debug)]
pub struct DriverTimed {
    /// Its address, as the device's function pointer holds it.
    pub addr: u64,
    pub function: String,
    pub module: Option<String>,
    /// `ndo_start_xmit` or `napi_poll`.
    pub role: &'static str,
    /// `Ok(fentry)` when timed, else why not.
    pub result: Result<Attachment, String>,
}

/// What one attach attempt needs from the tracer.
pub struct AttachContext<'a> {
    pub btf: &'a AyaBtf,
    pub vmlinux: &'a Btf,
    pub kprobes: &'a Result<(), String>,
    pub kallsyms: Option<&'a Kallsyms>,
}

impl WorkTier {
    /// Attaches every row of `set` the kernel allows.
    pub fn attach_all(
        ebpf: &mut Ebpf,
        linker: &mut LazyLinker,
        cx: &AttachContext,
        set: WorkSet,
    ) -> WorkTier {
        let mut tier = WorkTier::default();
        for row in WorkFn::ALL.into_iter().filter(|r| set.includes(*r)) {
            let result = if row.is_interval() {
                tier.attach_wakeup(ebpf, linker, cx)
            } else {
                tier.attach_timed(ebpf, linker, cx, row)
            };
            match result {
                Ok(how) => tier.attached.push((row, how)),
                Err(why) => tier.refused.push((row, why)),
            }
        }
        tier
    }

    fn attach_timed(
        &mut self,
        ebpf: &mut Ebpf,
        linker: &mut LazyLinker,
        cx: &AttachContext,
        row: WorkFn,
    ) -> Result<Attachment, String> {
        let name = row.name();
        let at = locate(cx, name, row.module())?;
        let btf = at.btf(cx.vmlinux);
        if let Some(btf) = btf {
            let ret = btf.func_return_type(name).map_err(|e| e.to_string())?;
            if !return_types(row.returns()).contains(&ret.as_str()) {
                return Err(format!(
                    "{name} returns {ret} here, vtrace reads {}: not attached",
                    return_types(row.returns())[0]
                ));
            }
        }
        let [entry, exit, kentry, kexit] = programs(row);
        let fentry_said = match crate::tracer::fentry_skipped()
            .or_else(|| at.no_btf())
            .map_or_else(|| linker.get(ebpf, cx.btf), Err)
            .and_then(|l| {
                let btf = btf.unwrap_or(cx.vmlinux);
                let a = prog_load::tracing_at(
                    l,
                    &entry,
                    bpf_attach_type::BPF_TRACE_FENTRY,
                    name,
                    btf,
                    at.module,
                )
                .map_err(|e| e.message)?;
                let b = prog_load::tracing_at(
                    l,
                    &exit,
                    bpf_attach_type::BPF_TRACE_FEXIT,
                    name,
                    btf,
                    at.module,
                )
                .map_err(|e| e.message)?;
                Ok([a, b])
            }) {
            Ok(links) => {
                self.links.extend(links.map(|l| (row, l)));
                return Ok(Attachment::Fentry);
            }
            Err(e) => format!("fentry: {e}"),
        };
        let symbol = self.kprobe_symbol(cx, name, &fentry_said)?;
        self.attach_kprobes(ebpf, row, &[(&kentry, &[&symbol]), (&kexit, &[&symbol])])
            .map(|()| Attachment::Kprobe)
            .map_err(|e| format!("{fentry_said}; kprobe: {e}"))
    }

    /// The wake-up: every work-queueing function this kernel has (which of them its callers
    /// reach, and which are inlined into them, differs between versions and builds) and every
    /// vhost-net work handler, all attached or none. A work queued through two of them (one
    /// calls the other) is stamped once: the map keeps the first.
    fn attach_wakeup(
        &mut self,
        ebpf: &mut Ebpf,
        linker: &mut LazyLinker,
        cx: &AttachContext,
    ) -> Result<Attachment, String> {
        // Both ends: (program index, function, where it is), the `vhost_work *` checked.
        let mut ends: Vec<(usize, &str, Located)> = Vec::new();
        for (functions, module, arg, end) in [
            (
                &WAKEUP_QUEUE_FUNCTIONS[..],
                "vhost",
                WAKEUP_QUEUE_WORK_ARG,
                0,
            ),
            (
                &WAKEUP_RUN_FUNCTIONS[..],
                "vhost_net",
                WAKEUP_RUN_WORK_ARG,
                1,
            ),
        ] {
            let before = ends.len();
            for f in functions {
                if let Ok(at) = locate(cx, f, module) {
                    if let Some(btf) = at.btf(cx.vmlinux) {
                        check_work_arg(btf, f, arg)?;
                    }
                    ends.push((end, f, at));
                }
            }
            if ends.len() == before {
                return Err(locate(cx, functions[0], module)
                    .err()
                    .unwrap_or_else(|| format!("none of {} here", functions.join(", "))));
            }
        }
        let programs = [WAKE_QUEUE, WAKE_RUN];
        let fentry_said = match crate::tracer::fentry_skipped()
            .or_else(|| ends.iter().find_map(|(_, _, at)| at.no_btf()))
            .map_or_else(|| linker.get(ebpf, cx.btf), Err)
            .and_then(|l| {
                ends.iter()
                    .map(|(end, f, at)| {
                        prog_load::tracing_at(
                            l,
                            programs[*end][0],
                            bpf_attach_type::BPF_TRACE_FENTRY,
                            f,
                            at.btf(cx.vmlinux).unwrap_or(cx.vmlinux),
                            at.module,
                        )
                        .map_err(|e| format!("{f}: {}", e.message))
                    })
                    .collect::<Result<Vec<_>, String>>()
            }) {
            Ok(links) => {
                self.links
                    .extend(links.into_iter().map(|l| (WorkFn::VhostWakeup, l)));
                return Ok(Attachment::Fentry);
            }
            Err(e) => format!("fentry: {e}"),
        };
        let mut symbols: [Vec<String>; 2] = Default::default();
        for (end, f, _) in &ends {
            symbols[*end].push(self.kprobe_symbol(cx, f, &fentry_said)?);
        }
        let [queue, run] = symbols;
        let queue: Vec<&str> = queue.iter().map(String::as_str).collect();
        let run: Vec<&str> = run.iter().map(String::as_str).collect();
        self.attach_kprobes(
            ebpf,
            WorkFn::VhostWakeup,
            &[(WAKE_QUEUE[1], &queue), (WAKE_RUN[1], &run)],
        )
        .map(|()| Attachment::Kprobe)
        .map_err(|e| format!("{fentry_said}; kprobe: {e}"))
    }

    /// The kallsyms symbol of `name` (itself, else a compiler variant), when kprobes exist.
    fn kprobe_symbol(
        &self,
        cx: &AttachContext,
        name: &str,
        fentry_said: &str,
    ) -> Result<String, String> {
        if let Err(why) = cx.kprobes {
            return Err(format!("{fentry_said}; kprobe: {why}"));
        }
        cx.kallsyms
            .and_then(|k| k.lookup(name).first().map(|s| s.name.clone()))
            .ok_or_else(|| format!("{fentry_said}; kprobe: {name} not in /proc/kallsyms"))
    }

    /// Loads each program and attaches it at each of its symbols; on any failure every one
    /// of them is unloaded again (detaching what was attached).
    fn attach_kprobes(
        &mut self,
        ebpf: &mut Ebpf,
        row: WorkFn,
        what: &[(&str, &[&str])],
    ) -> Result<(), String> {
        let mut done: Vec<String> = Vec::new();
        let result = (|| {
            for (prog, symbols) in what {
                let p: &mut KProbe = ebpf
                    .program_mut(prog)
                    .ok_or_else(|| format!("program {prog} not in the object"))?
                    .try_into()
                    .map_err(|e: aya::programs::ProgramError| e.to_string())?;
                done.push(prog.to_string());
                p.load().map_err(|e| format!("{prog}: {e}"))?;
                for s in *symbols {
                    p.attach(*s, 0).map_err(|e| format!("{s}: {e}"))?;
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => self.kprobes.extend(done.into_iter().map(|p| (row, p))),
            Err(_) => {
                for prog in &done {
                    crate::hooks::unload_program(ebpf, prog);
                }
            }
        }
        result
    }

    /// Detaches everything (the rows stay listed in `attached`).
    pub fn detach(&mut self, ebpf: &mut Ebpf) {
        self.links.clear();
        self.driver_links.clear();
        for (_, prog) in std::mem::take(&mut self.kprobes) {
            crate::hooks::unload_program(ebpf, &prog);
        }
    }

    /// Run count and run time of every work program attached (non-zero only while BPF
    /// statistics are on), labelled `work:<row>`.
    pub fn costs(&self, ebpf: &Ebpf) -> Result<Vec<crate::cost::ProgramCost>> {
        let mut out = Vec::new();
        for (row, link) in &self.links {
            let info = link
                .info()
                .map_err(|e| anyhow!("reading a {} program: {e}", row.name()))?;
            out.push(crate::cost::ProgramCost::labeled(
                &format!("work:{}", row.name()),
                &info.name,
                info.run_cnt,
                info.run_time_ns,
            ));
        }
        for (row, name) in &self.kprobes {
            let info = ebpf
                .program(name)
                .ok_or_else(|| anyhow!("program {name} missing"))?
                .info()?;
            out.push(crate::cost::ProgramCost::labeled(
                &format!("work:{}", row.name()),
                name,
                info.run_count(),
                info.run_time().as_nanos() as u64,
            ));
        }
        Ok(out)
    }

    /// Whether the function at `addr` has been looked at already.
    pub fn examined(&self, addr: u64) -> bool {
        self.examined.contains(&addr)
    }

    /// Times the driver functions the discovery hooks found on the devices so far (a device's
    /// `ndo_start_xmit` and NAPI poll, read at run time: `ixgbe_xmit_frame`, `dummy_xmit`,
    /// `e1000e_poll`, ...) that no catalog hook or work row covers: the generic fentry/fexit
    /// pair `vt_wk_driver`, loaded once per function, keyed in the kernel by the function's
    /// address. Each function is tried once; returns one line per function tried now.
    pub fn time_drivers(
        &mut self,
        linker: &prog_load::Linker,
        vmlinux: &Btf,
        kallsyms: &Kallsyms,
        found: &[(u64, &'static str, String)],
    ) -> Vec<String> {
        let mut said = Vec::new();
        for (addr, role, iface) in found {
            if !self.examined.insert(*addr) {
                continue;
            }
            let Some(sym) = kallsyms.symbolize(*addr).filter(|s| s.offset == 0) else {
                // Not the start of a function /proc/kallsyms listed when vtrace read it (a
                // module loaded since): said, not skipped silently.
                let function = format!("{addr:#x}");
                let why = "no function starts there in /proc/kallsyms as read at start";
                said.push(format!(
                    "driver function {function} ({role} of {iface}): not timed: {why}"
                ));
                self.drivers.push(DriverTimed {
                    addr: *addr,
                    function,
                    module: None,
                    role,
                    result: Err(why.to_string()),
                });
                continue;
            };
            let (function, module) = (sym.name.to_string(), sym.module.map(str::to_string));
            if crate::discovery::covering_hook(&function).is_some()
                || crate::discovery::covering_work(&function).is_some()
            {
                continue;
            }
            let result = crate::tracer::fentry_skipped()
                .map(|s| format!("fentry: {s}; kprobes are not used for driver functions"))
                .map_or(Ok(()), Err)
                .and_then(|()| self.time_driver(linker, vmlinux, &function, module.as_deref()));
            said.push(match &result {
                Ok(()) => format!(
                    "driver function {function} ({role} of {iface}): timed per call (fentry)"
                ),
                Err(why) => {
                    format!("driver function {function} ({role} of {iface}): not timed: {why}")
                }
            });
            self.drivers.push(DriverTimed {
                addr: *addr,
                function,
                module,
                role,
                result: result.map(|()| Attachment::Fentry),
            });
        }
        said
    }

    fn time_driver(
        &mut self,
        linker: &prog_load::Linker,
        vmlinux: &Btf,
        function: &str,
        module: Option<&str>,
    ) -> Result<(), String> {
        let module_btf;
        let (btf, module) = if vmlinux.has_func(function) {
            (vmlinux, None)
        } else {
            let m = module.ok_or_else(|| format!("{function} is not in the kernel's BTF"))?;
            module_btf = Btf::module(m, vmlinux)
                .map_err(|e| format!("module {m} has no readable BTF: {e}"))?;
            (&module_btf, Some(m))
        };
        let pair = [
            ("vt_wk_driver", bpf_attach_type::BPF_TRACE_FENTRY),
            ("vt_wk_driver_ret", bpf_attach_type::BPF_TRACE_FEXIT),
        ]
        .map(|(prog, how)| prog_load::tracing_at(linker, prog, how, function, btf, module));
        match pair {
            [Ok(a), Ok(b)] => {
                self.driver_links.extend([a, b]);
                Ok(())
            }
            [Err(e), _] | [_, Err(e)] => Err(format!("fentry: {}", e.message)),
        }
    }

    /// The timed driver functions' report rows, from `DRIVER_STATS` (keyed by the address
    /// the kernel's `bpf_get_func_ip` gives, named back through kallsyms).
    pub fn driver_rows(&self, ebpf: &Ebpf, kallsyms: &Kallsyms) -> Result<Vec<WorkRow>> {
        let timed: Vec<&DriverTimed> = self.drivers.iter().filter(|d| d.result.is_ok()).collect();
        if timed.is_empty() {
            return Ok(Vec::new());
        }
        let map = ebpf
            .map("DRIVER_STATS")
            .ok_or_else(|| anyhow!("DRIVER_STATS map missing from the object"))?;
        let stats: PerCpuHashMap<&MapData, u64, WorkStats> = PerCpuHashMap::try_from(map)?;
        let mut by_function: Vec<(&DriverTimed, WorkStats)> =
            timed.iter().map(|d| (*d, WorkStats::zeroed())).collect();
        for item in stats.iter() {
            let (ip, per_cpu) = item?;
            let Some(name) = kallsyms.symbolize(ip).map(|s| s.name) else {
                continue;
            };
            if let Some((_, s)) = by_function.iter_mut().find(|(d, _)| d.function == name) {
                *s = sum([*s].iter().chain(per_cpu.iter()));
            }
        }
        Ok(by_function
            .into_iter()
            .map(|(d, s)| {
                let stage = if d.role == "napi_poll" {
                    crate::hooks::Stage::NicRx
                } else {
                    crate::hooks::Stage::DriverXmit
                };
                row_of(
                    &d.function,
                    d.module.as_deref().unwrap_or("vmlinux"),
                    stage,
                    Attachment::Fentry,
                    &s,
                    None,
                )
            })
            .collect())
    }

    /// One stderr line: which rows attached and how, and why the others did not (grouped).
    pub fn summary(&self) -> String {
        let mut line = format!(
            "work functions: {} of {} timed",
            self.attached.len(),
            self.attached.len() + self.refused.len()
        );
        if !self.attached.is_empty() {
            let names: Vec<String> = self
                .attached
                .iter()
                .map(|(r, a)| format!("{}({})", r.name(), a.name()))
                .collect();
            line.push_str(&format!(" ({})", names.join(" ")));
        }
        let mut by_reason: Vec<(&str, Vec<&str>)> = Vec::new();
        for (row, why) in &self.refused {
            match by_reason.iter_mut().find(|(r, _)| *r == why.as_str()) {
                Some((_, rows)) => rows.push(row.name()),
                None => by_reason.push((why.as_str(), vec![row.name()])),
            }
        }
        for (why, rows) in by_reason {
            line.push_str(&format!("; {}: {why}", rows.join(", ")));
        }
        line
    }
}

/// The wake-up's ends read a `struct vhost_work *` at `arg`: checked against the kernel's BTF.
fn check_work_arg(btf: &Btf, name: &str, arg: usize) -> Result<(), String> {
    let params = btf.func_param_types(name).map_err(|e| e.to_string())?;
    if params.get(arg).is_some_and(|t| t == "vhost_work*") {
        Ok(())
    } else {
        Err(format!(
            "{name}({}) has no struct vhost_work * at argument {arg}: not attached",
            params.join(", ")
        ))
    }
}

/// `WORK_STATS`, summed over the CPUs, one per row.
pub fn read(ebpf: &Ebpf) -> Result<Vec<WorkStats>> {
    let map = ebpf
        .map("WORK_STATS")
        .ok_or_else(|| anyhow!("WORK_STATS map missing from the object"))?;
    let arr: PerCpuArray<&MapData, WorkStats> = PerCpuArray::try_from(map)?;
    (0..WORK_FN_COUNT as u32)
        .map(|i| Ok(sum(arr.get(&i, 0)?.iter())))
        .collect()
}

/// Per-CPU statistics of one row, added up.
pub fn sum<'a>(per_cpu: impl Iterator<Item = &'a WorkStats>) -> WorkStats {
    let mut t = WorkStats::zeroed();
    for s in per_cpu {
        t.calls += s.calls;
        t.total_ns += s.total_ns;
        t.max_ns = t.max_ns.max(s.max_ns);
        t.returned += s.returned;
        t.errors += s.errors;
        t.unmatched += s.unmatched;
        for (a, b) in t.buckets.iter_mut().zip(s.buckets.iter()) {
            *a += b;
        }
    }
    t
}

/// One row of the report: a work function (or the wake-up interval) the run attached.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct WorkRow {
    pub function: String,
    pub module: String,
    pub stage: crate::hooks::Stage,
    pub via: String,
    pub calls: u64,
    pub total_ns: u64,
    pub mean_ns: f64,
    /// Upper bounds of the log2 buckets holding the median and the 99th percentile call.
    pub p50_le_ns: u64,
    pub p99_le_ns: u64,
    pub max_ns: u64,
    /// What the calls returned, added up, in `returned_unit` (none for void functions).
    pub returned: u64,
    pub returned_unit: Option<String>,
    pub errors: u64,
    pub unmatched: u64,
    /// The log2 buckets (see `WorkStats::buckets`), for the exporter's histogram.
    #[serde(skip)]
    pub buckets: [u64; WORK_BUCKETS],
}

/// The upper bound (ns) of the bucket holding quantile `q` of the calls.
pub fn quantile_le(buckets: &[u64; WORK_BUCKETS], q: f64) -> u64 {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return 0;
    }
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return 1u64 << (i + 1).min(63);
        }
    }
    1u64 << WORK_BUCKETS
}

fn unit(r: Returns) -> Option<&'static str> {
    match r {
        Returns::Nothing => None,
        Returns::Packets => Some("packets"),
        Returns::Bytes { .. } => Some("bytes"),
        Returns::Bool => Some("wake-ups with work"),
    }
}

/// The report rows of the attached rows, from their summed statistics.
pub fn rows(attached: &[(WorkFn, Attachment)], stats: &[WorkStats]) -> Vec<WorkRow> {
    attached
        .iter()
        .filter_map(|(row, how)| {
            let s = stats.get(*row as usize)?;
            let stage = crate::hooks::CATALOG
                .iter()
                .find(|h| h.name == row.name())
                .map(|h| h.stage)
                .unwrap_or(crate::hooks::Stage::TapVhost);
            Some(row_of(
                row.name(),
                row.module(),
                stage,
                *how,
                s,
                unit(row.returns()),
            ))
        })
        .collect()
}

/// A report row from summed statistics.
fn row_of(
    function: &str,
    module: &str,
    stage: crate::hooks::Stage,
    how: Attachment,
    s: &WorkStats,
    returned_unit: Option<&str>,
) -> WorkRow {
    WorkRow {
        function: function.to_string(),
        module: module.to_string(),
        stage,
        via: how.name().to_string(),
        calls: s.calls,
        total_ns: s.total_ns,
        mean_ns: if s.calls > 0 {
            s.total_ns as f64 / s.calls as f64
        } else {
            0.0
        },
        p50_le_ns: quantile_le(&s.buckets, 0.50),
        p99_le_ns: quantile_le(&s.buckets, 0.99),
        max_ns: s.max_ns,
        returned: s.returned,
        returned_unit: returned_unit.map(String::from),
        errors: s.errors,
        unmatched: s.unmatched,
        buckets: s.buckets,
    }
}

/// The human table (empty when nothing was attached).
pub fn render(rows: &[WorkRow]) -> String {
    use crate::latency::report::fmt_ns;
    use std::fmt::Write;
    if rows.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "\nwork inside the stages (function tier, time per call; p50/p99 are log2-bucket bounds):\n",
    );
    let _ = writeln!(
        s,
        "  {:<29} {:<11} {:<6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  returned",
        "function", "module", "via", "calls", "mean", "p50<=", "p99<=", "max", "total"
    );
    for r in rows {
        let returned = match &r.returned_unit {
            Some(u) => {
                let mut t = format!("{} {u}", r.returned);
                if r.errors > 0 {
                    t.push_str(&format!(", {} errors", r.errors));
                }
                t
            }
            None if r.function == WorkFn::VhostWakeup.name() => "(kick/ready -> handler)".into(),
            None => "-".into(),
        };
        let _ = writeln!(
            s,
            "  {:<29} {:<11} {:<6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {returned}",
            r.function,
            r.module,
            r.via,
            r.calls,
            fmt_ns(r.mean_ns),
            fmt_ns(r.p50_le_ns as f64),
            fmt_ns(r.p99_le_ns as f64),
            fmt_ns(r.max_ns as f64),
            fmt_ns(r.total_ns as f64),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(durations: &[u64], returned: u64) -> WorkStats {
        let mut s = WorkStats::zeroed();
        for &d in durations {
            s.calls += 1;
            s.total_ns += d;
            s.max_ns = s.max_ns.max(d);
            s.buckets[WorkStats::bucket(d)] += 1;
        }
        s.returned = returned;
        s
    }

    #[test]
    fn buckets_are_log2_and_capped() {
        assert_eq!(WorkStats::bucket(0), 0);
        assert_eq!(WorkStats::bucket(1), 0);
        assert_eq!(WorkStats::bucket(2), 1);
        assert_eq!(WorkStats::bucket(1023), 9);
        assert_eq!(WorkStats::bucket(1024), 10);
        assert_eq!(WorkStats::bucket(u64::MAX), WORK_BUCKETS - 1);
    }

    #[test]
    fn per_cpu_statistics_add_up_and_quantiles_bound_the_calls() {
        // Two CPUs of netback's NAPI poll: 99 polls of ~3 us and one of 100 us.
        let a = stats(&[3000; 60], 600);
        let mut b_calls = vec![3000u64; 39];
        b_calls.push(100_000);
        let b = stats(&b_calls, 400);
        let t = sum([a, b].iter());
        assert_eq!(t.calls, 100);
        assert_eq!(t.returned, 1000);
        assert_eq!(t.max_ns, 100_000);
        assert_eq!(t.total_ns, 99 * 3000 + 100_000);
        // 3000 ns is in [2048, 4096): the median's bound is 4096; the 99th call still is.
        assert_eq!(quantile_le(&t.buckets, 0.5), 4096);
        assert_eq!(quantile_le(&t.buckets, 0.99), 4096);
        assert_eq!(quantile_le(&t.buckets, 1.0), 131_072);
        assert_eq!(quantile_le(&WorkStats::zeroed().buckets, 0.5), 0);
    }

    /// The Xen rows cannot run here (no Xen): their report rows are made from generated
    /// statistics, as a dom0's would read them.
    #[test]
    fn netback_rows_report_their_stage_module_and_units() {
        let mut all = vec![WorkStats::zeroed(); WORK_FN_COUNT];
        all[WorkFn::XenvifPoll as usize] = stats(&[2000, 4000, 6000], 64);
        all[WorkFn::XenvifRxQueueDropExpired as usize] = stats(&[500], 0);
        all[WorkFn::TunSendmsg as usize] = stats(&[1000], 60);
        all[WorkFn::TunSendmsg as usize].errors = 2;
        let attached = [
            (WorkFn::XenvifPoll, Attachment::Fentry),
            (WorkFn::XenvifRxQueueDropExpired, Attachment::Kprobe),
            (WorkFn::TunSendmsg, Attachment::Fentry),
        ];
        let rows = rows(&attached, &all);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].function, "xenvif_poll");
        assert_eq!(rows[0].module, "xen_netback");
        assert_eq!(rows[0].stage, crate::hooks::Stage::Netback);
        assert_eq!(rows[0].calls, 3);
        assert_eq!(rows[0].mean_ns, 4000.0);
        assert_eq!(rows[0].returned_unit.as_deref(), Some("packets"));
        assert_eq!(rows[1].via, "kprobe");
        assert_eq!(rows[1].returned_unit, None);
        let text = render(&rows);
        assert!(text.contains("64 packets"), "{text}");
        assert!(text.contains("60 bytes, 2 errors"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.contains("xenvif_rx_queue_drop_expired")
                    && l.contains("kprobe")
                    && l.trim_end().ends_with('-')),
            "{text}"
        );
        assert_eq!(render(&[]), "");
    }

    /// `drops` times only what runs once per batch: no per-frame rows, no driver transmit.
    #[test]
    fn the_batches_set_leaves_per_frame_work_out() {
        let batches: Vec<&str> = WorkFn::ALL
            .into_iter()
            .filter(|r| WorkSet::Batches.includes(*r))
            .map(|r| r.name())
            .collect();
        for f in [
            "handle_tx",
            "handle_rx",
            "vhost_wakeup",
            "xenvif_poll",
            "veth_poll",
        ] {
            assert!(batches.contains(&f), "{f}");
        }
        for f in [
            "tun_get_user",
            "tun_sendmsg",
            "tun_recvmsg",
            "xenvif_rx_skb",
        ] {
            assert!(!batches.contains(&f), "{f}");
        }
        assert!(WorkFn::ALL.into_iter().all(|r| WorkSet::All.includes(r)));
        assert!(!WorkFn::ALL.into_iter().any(|r| WorkSet::None.includes(r)));
        assert!(WorkSet::Batches.includes_driver("napi_poll"));
        assert!(!WorkSet::Batches.includes_driver("ndo_start_xmit"));
        assert!(WorkSet::All.includes_driver("ndo_start_xmit"));
    }

    /// Every row's function (and the wake-up's ends) is in the hook catalog with its module,
    /// so `vtrace hooks` lists what the work tier attaches.
    #[test]
    fn every_work_function_is_in_the_catalog() {
        for row in WorkFn::ALL {
            let names: Vec<&str> = if row.is_interval() {
                WAKEUP_QUEUE_FUNCTIONS
                    .iter()
                    .chain(WAKEUP_RUN_FUNCTIONS.iter())
                    .copied()
                    .collect()
            } else {
                vec![row.name()]
            };
            for n in names {
                let hp = crate::hooks::CATALOG
                    .iter()
                    .find(|h| h.name == n)
                    .unwrap_or_else(|| panic!("{n} not in the catalog"));
                assert_eq!(hp.tier, crate::hooks::Tier::Function, "{n}");
                assert!(hp.module.is_some(), "{n}");
            }
        }
    }

    /// The kprobe/kretprobe twins of every row, and the wake-up's, pass this kernel's verifier
    /// (the kernel loads kprobe programs even without CONFIG_KPROBES; attaching needs it). The
    /// fentry/fexit programs run the same bodies; fentry is refused here, so they are verified
    /// and run on Debian's kernel by tests/distro_kernel.rs.
    #[test]
    fn kprobe_twins_pass_this_kernels_verifier() {
        let btf = aya::Btf::from_sys_fs().expect("BTF");
        let mut ebpf = aya::EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("CONFIG", &vtrace_common::Config::zeroed(), true)
            .load(crate::tracer::object())
            .expect("object loads");
        let mut names: Vec<String> = WorkFn::ALL
            .iter()
            .filter(|r| !r.is_interval())
            .flat_map(|r| {
                let [_, _, kentry, kexit] = programs(*r);
                [kentry, kexit]
            })
            .collect();
        names.extend([WAKE_QUEUE[1], WAKE_RUN[1]].map(String::from));
        assert_eq!(names.len(), 2 * (WORK_FN_COUNT - 1) + 2);
        for n in names {
            let p: &mut KProbe = ebpf
                .program_mut(&n)
                .unwrap_or_else(|| panic!("{n} not in the object"))
                .try_into()
                .expect("a kprobe program");
            p.load().unwrap_or_else(|e| panic!("{n}: {e:?}"));
        }
    }

    /// The tracer's function tier on this kernel: every row is attached or refused with a
    /// one-line reason, and nothing of a refused row stays loaded; after the tracer is gone no
    /// work program is left. (Here fentry is refused and kprobes are absent, so every row is
    /// refused; tests/distro_kernel.rs runs the attached case.)
    #[test]
    fn every_row_attaches_whole_or_leaves_nothing_loaded() {
        use crate::kernel::bpf_sys;
        use crate::tracer::{Tracer, TracerOptions};
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!("this test loads eBPF programs: run it as root (cargo xtask test)");
        }
        let before = bpf_sys::program_ids();
        // Work programs loaded since `before`, once the kernel has freed what is going.
        let work_programs = || bpf_sys::programs_left(&before, "vt_wk_");
        let info = Btf::vmlinux().expect("BTF");
        let mut config = vtrace_common::Config::zeroed();
        config.offsets = crate::kernel::resolve_offsets(info).expect("offsets");
        let tracer = Tracer::start(TracerOptions {
            config,
            hooks: Vec::new(),
            ring_bytes: 1 << 16,
            functions: true,
            work: WorkSet::All,
        })
        .expect("tracer starts");
        let tier = &tracer.work;
        assert_eq!(tier.attached.len() + tier.refused.len(), WORK_FN_COUNT);
        for (row, why) in &tier.refused {
            assert!(
                !why.is_empty() && !why.contains('\n'),
                "{}: {why:?}",
                row.name()
            );
        }
        let line = tier.summary();
        println!("{line}");
        assert!(!line.contains('\n'));
        if tier.attached.is_empty() {
            let left = work_programs();
            assert!(
                left.is_empty(),
                "refused rows left programs loaded: {left:?}"
            );
        } else {
            assert!(!work_programs().is_empty());
        }
        assert_eq!(tracer.work_rows().expect("rows").len(), tier.attached.len());
        drop(tracer);
        let left = work_programs();
        assert!(left.is_empty(), "left loaded: {left:?}");
    }
}
