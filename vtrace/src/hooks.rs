//! The hook catalog: every hook point vtrace knows, its data-path stage and tier, and its status
//! on the running kernel, found by trying to load (and attach) a program there.

use std::io;

use anyhow::{anyhow, Result};
use aya::{
    programs::{BtfTracePoint, FEntry, KProbe, RawTracePoint, SchedClassifier, Xdp},
    Btf, Ebpf, EbpfLoader,
};
use serde::Serialize;
use vtrace_common::{Config, Hook};

use crate::{kernel::btf::Btf as BtfInfo, tracer};

/// Where on the host data path a hook sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// A NIC or virtual device hands a received packet to the stack.
    NicRx,
    /// Entry into the stack (every device).
    StackRx,
    Bridge,
    /// tun/tap and vhost-net: the hand-off between the host kernel and the VMM.
    TapVhost,
    /// xen-netback: the hand-off between dom0 and a Xen guest.
    Netback,
    Veth,
    VirtioNet,
    Qdisc,
    /// The stack queues a packet to a device and the driver takes it.
    DriverXmit,
    /// A reader (socket, VMM, vhost) copies the packet out.
    Socket,
    /// The end of an skb: normal free or drop.
    Free,
    Drop,
    /// tc/XDP programs on a chosen device.
    Device,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Stable tracepoints (ABI-stable, every kernel).
    Tracepoint,
    /// Kernel functions (fentry, else kprobe): internals of each stage.
    Function,
    /// tc clsact / XDP on a device.
    Device,
}

/// One catalog entry.
#[derive(Clone, Copy, Debug)]
pub struct HookPoint {
    /// `group:tracepoint` for tracepoints, the function name for functions, `tc`/`xdp`.
    pub name: &'static str,
    pub stage: Stage,
    pub tier: Tier,
    /// The kernel module the function lives in when it is built as a module.
    pub module: Option<&'static str>,
    pub what: &'static str,
}

const fn tp(name: &'static str, stage: Stage, what: &'static str) -> HookPoint {
    HookPoint {
        name,
        stage,
        tier: Tier::Tracepoint,
        module: None,
        what,
    }
}

const fn func(
    name: &'static str,
    stage: Stage,
    module: &'static str,
    what: &'static str,
) -> HookPoint {
    HookPoint {
        name,
        stage,
        tier: Tier::Function,
        module: Some(module),
        what,
    }
}

/// Every hook point vtrace knows.
pub const CATALOG: &[HookPoint] = &[
    tp(
        "net:napi_gro_receive_entry",
        Stage::NicRx,
        "a NAPI driver passes a received packet to GRO",
    ),
    tp(
        "net:netif_rx",
        Stage::NicRx,
        "a device (veth, backlog users) queues a packet to the CPU backlog",
    ),
    tp(
        "net:netif_receive_skb",
        Stage::StackRx,
        "a device hands a packet to the stack (tap: tun_get_user delivers here)",
    ),
    tp(
        "net:net_dev_queue",
        Stage::DriverXmit,
        "the stack queues a packet to a device, before the qdisc",
    ),
    tp(
        "qdisc:qdisc_dequeue",
        Stage::Qdisc,
        "a qdisc releases a packet towards the driver",
    ),
    tp(
        "net:net_dev_start_xmit",
        Stage::DriverXmit,
        "the driver's ndo_start_xmit takes the packet (tap/vif: hand-off to tun/netback)",
    ),
    tp(
        "net:net_dev_xmit",
        Stage::DriverXmit,
        "ndo_start_xmit returned",
    ),
    tp(
        "skb:skb_copy_datagram_iovec",
        Stage::Socket,
        "a reader (VMM, vhost, socket) copies the packet out",
    ),
    tp("skb:consume_skb", Stage::Free, "normal free"),
    tp(
        "skb:kfree_skb",
        Stage::Drop,
        "drop, with reason and location",
    ),
    tp(
        "napi:napi_poll",
        Stage::NicRx,
        "a NAPI poll round of a device (batching, budget)",
    ),
    func(
        "br_handle_frame",
        Stage::Bridge,
        "bridge",
        "bridge port rx handler",
    ),
    func(
        "br_forward",
        Stage::Bridge,
        "bridge",
        "bridge forwards to one port",
    ),
    func(
        "br_pass_frame_up",
        Stage::Bridge,
        "bridge",
        "bridge delivers to the host stack",
    ),
    func(
        "br_dev_xmit",
        Stage::Bridge,
        "bridge",
        "the bridge device transmits",
    ),
    func(
        "tun_get_user",
        Stage::TapVhost,
        "tun",
        "VMM/vhost writes a frame into a tap (a new skb)",
    ),
    func(
        "tun_net_xmit",
        Stage::TapVhost,
        "tun",
        "host queues a frame on the tap's ring (FULL_RING drops)",
    ),
    func(
        "tun_do_read",
        Stage::TapVhost,
        "tun",
        "VMM reads a frame from the tap",
    ),
    func(
        "tun_sendmsg",
        Stage::TapVhost,
        "tun",
        "vhost-net writes a batch into the tap",
    ),
    func(
        "tun_recvmsg",
        Stage::TapVhost,
        "tun",
        "vhost-net reads from the tap",
    ),
    func(
        "handle_tx",
        Stage::TapVhost,
        "vhost_net",
        "vhost-net guest tx work",
    ),
    func(
        "handle_rx",
        Stage::TapVhost,
        "vhost_net",
        "vhost-net guest rx work",
    ),
    func(
        "vhost_worker",
        Stage::TapVhost,
        "vhost",
        "the vhost worker thread wakes up (kernels before 6.4)",
    ),
    func(
        "vhost_run_work_list",
        Stage::TapVhost,
        "vhost",
        "the vhost worker (a vhost_task since 6.4) runs its queued work",
    ),
    func(
        "vhost_worker_queue",
        Stage::TapVhost,
        "vhost",
        "work queued on a vhost worker (6.5+; what the kick path calls): the wake-up starts",
    ),
    func(
        "vhost_vq_work_queue",
        Stage::TapVhost,
        "vhost",
        "work queued for a virtqueue's worker (6.5+): the wake-up starts",
    ),
    func(
        "vhost_work_queue",
        Stage::TapVhost,
        "vhost",
        "work queued for the device's worker (before 6.5): the wake-up starts",
    ),
    func(
        "handle_tx_kick",
        Stage::TapVhost,
        "vhost_net",
        "the worker runs a guest's tx kick: the wake-up ends",
    ),
    func(
        "handle_rx_kick",
        Stage::TapVhost,
        "vhost_net",
        "the worker runs a guest's rx kick (buffers posted): the wake-up ends",
    ),
    func(
        "handle_tx_net",
        Stage::TapVhost,
        "vhost_net",
        "the worker runs tx work after the tap's socket freed space",
    ),
    func(
        "handle_rx_net",
        Stage::TapVhost,
        "vhost_net",
        "the worker runs rx work after the tap queued frames",
    ),
    func(
        "xenvif_start_xmit",
        Stage::Netback,
        "xen_netback",
        "dom0 queues a packet for a guest (vif ndo_start_xmit)",
    ),
    func(
        "xenvif_poll",
        Stage::Netback,
        "xen_netback",
        "netback NAPI poll: guest tx into dom0",
    ),
    func(
        "xenvif_tx_action",
        Stage::Netback,
        "xen_netback",
        "netback grant-copies guest tx packets",
    ),
    func(
        "xenvif_rx_action",
        Stage::Netback,
        "xen_netback",
        "netback guest-rx thread copies packets to the guest",
    ),
    func(
        "xenvif_rx_skb",
        Stage::Netback,
        "xen_netback",
        "netback guest-rx thread builds one packet's grant copies to the guest",
    ),
    func(
        "xenvif_rx_copy_flush",
        Stage::Netback,
        "xen_netback",
        "netback guest-rx thread flushes a batch of grant copies to the guest",
    ),
    func(
        "xenvif_rx_queue_drop_expired",
        Stage::Netback,
        "xen_netback",
        "netback drops packets that waited too long for the guest",
    ),
    func(
        "veth_xmit",
        Stage::Veth,
        "veth",
        "veth transmit (to the peer)",
    ),
    func(
        "veth_poll",
        Stage::Veth,
        "veth",
        "veth NAPI poll (XDP/GRO path)",
    ),
    func(
        "start_xmit",
        Stage::VirtioNet,
        "virtio_net",
        "virtio-net transmit",
    ),
    func(
        "virtnet_poll",
        Stage::VirtioNet,
        "virtio_net",
        "virtio-net NAPI poll",
    ),
    HookPoint {
        name: "tc",
        stage: Stage::Device,
        tier: Tier::Device,
        module: None,
        what: "tc clsact ingress/egress classifier on a device",
    },
    HookPoint {
        name: "xdp",
        stage: Stage::Device,
        tier: Tier::Device,
        module: None,
        what: "XDP program on a device",
    },
];

/// The stage a kernel function belongs to, for naming where a drop happened: a catalogued
/// function's own stage (compiler variants included), else its module's, else a prefix the
/// stage's built-in functions share (bridge, tun and veth are built in on some kernels).
pub fn stage_of_function(name: &str, module: Option<&str>) -> Option<Stage> {
    let base = name.split('.').next().unwrap_or(name);
    if let Some(hp) = CATALOG
        .iter()
        .find(|h| h.tier == Tier::Function && h.name == base)
    {
        return Some(hp.stage);
    }
    const BY_MODULE_OR_PREFIX: [(&str, &str, Stage); 7] = [
        ("bridge", "br_", Stage::Bridge),
        ("tun", "tun_", Stage::TapVhost),
        ("tap", "tap_", Stage::TapVhost),
        ("vhost_net", "vhost_net_", Stage::TapVhost),
        ("xen_netback", "xenvif_", Stage::Netback),
        ("veth", "veth_", Stage::Veth),
        ("virtio_net", "virtnet_", Stage::VirtioNet),
    ];
    BY_MODULE_OR_PREFIX
        .iter()
        .find(|(m, prefix, _)| match module {
            Some(module) => module == *m,
            None => base.starts_with(prefix),
        })
        .map(|(_, _, stage)| *stage)
}

/// [`stage_of_function`] for a location as vtrace writes it: `name+0x1b3 [module]`.
pub fn stage_of_location(location: &str) -> Option<Stage> {
    let (symbol, module) = match location.split_once(" [") {
        Some((s, m)) => (s, Some(m.trim_end_matches(']'))),
        None => (location, None),
    };
    let name = symbol.split('+').next().unwrap_or(symbol);
    if name.starts_with("0x") {
        return None;
    }
    stage_of_function(name, module)
}

/// A hook's status on the running kernel.
#[derive(Clone, Debug, Serialize)]
pub struct HookStatus {
    pub hook: &'static str,
    pub stage: Stage,
    pub tier: Tier,
    /// `available`, `missing` or `refused`.
    pub status: &'static str,
    /// How it attaches when available (`tp_btf`, `raw_tp`, `fentry`, `kprobe`, `tc`, `xdp`).
    pub via: Option<&'static str>,
    /// The kernel's errno name when refused.
    pub errno: Option<String>,
    /// Real symbol names found (for functions: `.constprop.N`/`.isra.N` variants included).
    pub symbols: Vec<String>,
    pub reason: Option<String>,
    pub what: &'static str,
}

/// Tries every catalog entry on this kernel.
pub fn probe_all() -> Result<Vec<HookStatus>> {
    let btf = Btf::from_sys_fs().map_err(|e| anyhow!("reading /sys/kernel/btf/vmlinux: {e}"))?;
    let btf_info =
        BtfInfo::vmlinux().map_err(|e| anyhow!("parsing /sys/kernel/btf/vmlinux: {e}"))?;
    let mut ebpf = load_object()?;
    let kprobes = kprobe_support();
    let mut linker = tracer::LazyLinker::default();
    Ok(CATALOG
        .iter()
        .map(|hp| match hp.tier {
            Tier::Tracepoint => probe_tracepoint(&mut ebpf, &btf, hp),
            Tier::Function => probe_function(&mut ebpf, &btf, btf_info, hp, &kprobes, &mut linker),
            Tier::Device => probe_device(&mut ebpf, hp),
        })
        .collect())
}

fn load_object() -> Result<Ebpf> {
    EbpfLoader::new()
        .override_global("CONFIG", &Config::zeroed(), true)
        .load(tracer::object())
        .map_err(|e| {
            anyhow!(
                "loading vtrace's eBPF object: {e}{}",
                tracer::hint(&e.to_string())
            )
        })
}

fn status(hp: &HookPoint) -> HookStatus {
    HookStatus {
        hook: hp.name,
        stage: hp.stage,
        tier: hp.tier,
        status: "missing",
        via: None,
        errno: None,
        symbols: Vec::new(),
        reason: None,
        what: hp.what,
    }
}

/// The tracepoint is tried as tp_btf, then as raw tracepoint, attached and detached at once.
/// Tracepoints vtrace has no program for (`napi:napi_poll`) are looked up in BTF only.
fn probe_tracepoint(ebpf: &mut Ebpf, btf: &Btf, hp: &HookPoint) -> HookStatus {
    let mut st = status(hp);
    let tp_name = hp.name.split(':').nth(1).unwrap_or(hp.name);
    let Some(hook) = Hook::TRACEPOINTS
        .iter()
        .copied()
        .find(|h| h.name() == tp_name)
    else {
        let present = std::path::Path::new("/sys/kernel/btf/vmlinux").exists()
            && crate::kernel::btf::Btf::vmlinux()
                .map(|b| b.has_typedef(&format!("btf_trace_{tp_name}")))
                .unwrap_or(false);
        if present {
            st.status = "available";
            st.reason = Some("in this kernel's BTF; vtrace has no program on it yet".into());
        } else {
            st.reason = Some("not in this kernel's BTF".into());
        }
        return st;
    };
    let name = tracer::program_name(hook);
    let first = match try_program::<BtfTracePoint>(ebpf, name, |p| {
        p.load(tp_name, btf)?;
        let link = p.attach()?;
        p.detach(link)?;
        p.unload()
    }) {
        Ok(()) => {
            st.status = "available";
            st.via = Some("tp_btf");
            return st;
        }
        Err(e) => e,
    };
    match try_program::<RawTracePoint>(ebpf, &format!("{name}_raw"), |p| {
        p.load()?;
        let link = p.attach(tp_name)?;
        p.detach(link)?;
        p.unload()
    }) {
        Ok(()) => {
            st.status = "available";
            st.via = Some("raw_tp");
            st.reason = Some(format!("tp_btf refused: {}", first.message));
        }
        Err(e) => set_failure(&mut st, e),
    }
    st
}

/// For a function vtrace has no program on: what an operator gets instead, said beside an
/// `available` status (which only means the kernel would let a program attach there).
fn without_program(name: &str) -> Option<&'static str> {
    use vtrace_common::work::{WorkFn, WAKEUP_QUEUE_FUNCTIONS, WAKEUP_RUN_FUNCTIONS};
    if Hook::FUNCTIONS.iter().any(|h| h.name() == name)
        || WorkFn::ALL.iter().any(|w| w.name() == name)
    {
        None
    } else if WAKEUP_QUEUE_FUNCTIONS.contains(&name) || WAKEUP_RUN_FUNCTIONS.contains(&name) {
        Some("attachable; an end of the vhost_wakeup interval (work queued -> its handler runs)")
    } else if name == "vhost_worker" {
        Some("attachable; the pre-6.4 worker loop never returns: vtrace times vhost_wakeup instead")
    } else if name.ends_with("_poll") {
        Some("attachable; vtrace has no program here: napi:napi_poll counts this poll's rounds per device")
    } else {
        Some("attachable; vtrace has no program here yet (it does not take the packet at entry)")
    }
}

/// A function is first looked up in BTF (vmlinux, then the module's BTF), with its compiler
/// variants; then fentry is tried (against the module's BTF object for a module function),
/// then a kprobe.
fn probe_function(
    ebpf: &mut Ebpf,
    btf: &Btf,
    info: &BtfInfo,
    hp: &HookPoint,
    kprobes: &Result<(), String>,
    linker: &mut tracer::LazyLinker,
) -> HookStatus {
    let mut st = status(hp);
    let mut symbols = info.func_names_matching(hp.name);
    let mut module_btf = None;
    if symbols.is_empty() {
        if let Some(module) = hp.module {
            if let Ok(m) = BtfInfo::module(module, info) {
                symbols = m.func_names_matching(hp.name);
                if !symbols.is_empty() {
                    module_btf = Some((module, m));
                }
            }
        }
    }
    st.symbols = symbols.clone();
    let Some(symbol) = symbols.first().cloned() else {
        st.reason = Some(match hp.module {
            Some(m) if !std::path::Path::new(&format!("/sys/module/{m}")).exists() => {
                format!("not in this kernel: module {m} is not loaded (or not built)")
            }
            _ => "not in this kernel's BTF (not built, renamed, or fully inlined)".into(),
        });
        return st;
    };
    if let Some((module, m)) = &module_btf {
        // aya 0.14 resolves fentry targets in vmlinux BTF only: vtrace loads this one itself,
        // against the module's BTF object (kernel::prog_load), and detaches it at once.
        let tried = linker.get(ebpf, btf).map_err(Failure::plain).and_then(|l| {
            crate::kernel::prog_load::fentry_in_module(l, "vt_probe_fentry", module, m, &symbol)
                .map_err(|e| Failure {
                    errno: e.errno,
                    message: e.message,
                })
        });
        match tried {
            Ok(attached) => {
                drop(attached);
                st.status = "available";
                st.via = Some("fentry");
                st.reason = Some(match without_program(hp.name) {
                    Some(w) => format!("in module {module}; {w}"),
                    None => format!("in module {module}"),
                });
                return st;
            }
            Err(e) => {
                set_failure(&mut st, e);
                st.reason = st
                    .reason
                    .take()
                    .map(|r| format!("fentry (module {module}): {r}"));
            }
        }
    } else {
        match try_program::<FEntry>(ebpf, "vt_probe_fentry", |p| {
            p.load(&symbol, btf)?;
            let link = p.attach()?;
            p.detach(link)?;
            p.unload()
        }) {
            Ok(()) => {
                st.status = "available";
                st.via = Some("fentry");
                st.reason = without_program(hp.name).map(String::from);
                return st;
            }
            Err(e) => {
                set_failure(&mut st, e);
                st.reason = st.reason.take().map(|r| format!("fentry: {r}"));
            }
        }
    }
    let fentry_said = st.reason.clone();
    match kprobes {
        Err(why) => {
            st.status = "refused";
            st.reason = Some(format!(
                "{}; kprobe: {why}",
                fentry_said.unwrap_or_default()
            ));
        }
        // aya attaches kprobes through the perf "kprobe" PMU, and falls back to tracefs's
        // kprobe_events on kernels without it: make sure tracefs is there for that path.
        Ok(()) if crate::kernel::privileges::ensure_tracefs().is_err() => {
            st.status = "refused";
            st.reason = Some("kprobe: tracefs is not mounted and could not be mounted".into());
        }
        Ok(()) => match try_program::<KProbe>(ebpf, "vt_probe_kprobe", |p| {
            p.load()?;
            let link = p.attach(&symbol, 0)?;
            p.detach(link)?;
            p.unload()
        }) {
            Ok(()) => {
                st.status = "available";
                st.via = Some("kprobe");
                st.errno = None;
                st.reason = without_program(hp.name).map(String::from);
            }
            Err(e) => set_failure(&mut st, e),
        },
    }
    st
}

/// tc and XDP programs are loaded (not attached): attaching needs a device, which `latency`
/// and `drops` choose.
fn probe_device(ebpf: &mut Ebpf, hp: &HookPoint) -> HookStatus {
    let mut st = status(hp);
    let r = if hp.name == "tc" {
        try_program::<SchedClassifier>(ebpf, "vt_probe_tc", |p| {
            p.load()?;
            p.unload()
        })
    } else {
        try_program::<Xdp>(ebpf, "vt_probe_xdp", |p| {
            p.load()?;
            p.unload()
        })
    };
    match r {
        Ok(()) => {
            st.status = "available";
            st.via = Some(hp.name);
        }
        Err(e) => set_failure(&mut st, e),
    }
    st
}

/// Kprobes need CONFIG_KPROBES; the perf "kprobe" PMU is how they attach.
pub fn kprobe_support() -> Result<(), String> {
    if std::path::Path::new("/sys/bus/event_source/devices/kprobe/type").exists() {
        Ok(())
    } else {
        Err("absent (kernel built without CONFIG_KPROBES)".into())
    }
}

pub struct Failure {
    pub errno: Option<i32>,
    pub message: String,
}

impl Failure {
    fn plain(message: String) -> Failure {
        Failure {
            errno: None,
            message,
        }
    }
}

fn set_failure(st: &mut HookStatus, e: Failure) {
    st.status = match e.errno {
        Some(libc::ENOENT) | Some(libc::ESRCH) => "missing",
        _ => "refused",
    };
    st.errno = e.errno.map(errno_name);
    st.reason = Some(e.message);
}

pub fn try_program<P>(
    ebpf: &mut Ebpf,
    name: &str,
    f: impl FnOnce(&mut P) -> Result<(), aya::programs::ProgramError>,
) -> Result<(), Failure>
where
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or_else(|| Failure {
        errno: None,
        message: format!("program {name} not in the object"),
    })?;
    let p: &mut P = prog
        .try_into()
        .map_err(|e: aya::programs::ProgramError| Failure {
            errno: None,
            message: e.to_string(),
        })?;
    let result = f(p);
    if result.is_err() {
        // Loaded but not attached (or not detached): unload, so that nothing stays behind and
        // the next try of the same program is not refused as already loaded.
        unload_program(ebpf, name);
    }
    result.map_err(|e| {
        let errno = errno_of(&e);
        let message = match &e {
            aya::programs::ProgramError::LoadError { verifier_log, .. } => {
                let log = verifier_log.to_string();
                let first = crate::kernel::prog_load::verifier_reason(&log).to_string();
                format!(
                    "BPF_PROG_LOAD refused ({}), {}",
                    errno.map(errno_name).unwrap_or_else(|| "?".into()),
                    if first.is_empty() {
                        "empty verifier log".to_string()
                    } else {
                        format!("verifier: {first}")
                    }
                )
            }
            other => match errno {
                Some(n) => format!("{other}: {}", io::Error::from_raw_os_error(n)),
                None => other.to_string(),
            },
        };
        Failure { errno, message }
    })
}

/// Unloads program `name` of `ebpf` if it is loaded (detaching its links); errors ignored.
pub fn unload_program(ebpf: &mut Ebpf, name: &str) {
    use aya::programs::Program;
    let Some(prog) = ebpf.program_mut(name) else {
        return;
    };
    let _ = match prog {
        Program::BtfTracePoint(p) => p.unload(),
        Program::RawTracePoint(p) => p.unload(),
        Program::FEntry(p) => p.unload(),
        Program::KProbe(p) => p.unload(),
        Program::SchedClassifier(p) => p.unload(),
        Program::Xdp(p) => p.unload(),
        _ => Ok(()),
    };
}

/// The errno behind an aya error, if a syscall failed.
pub fn errno_of(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return io.raw_os_error();
        }
        cur = err.source();
    }
    None
}

pub fn errno_name(n: i32) -> String {
    match n {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINVAL => "EINVAL",
        libc::EACCES => "EACCES",
        libc::ENOTSUP => "EOPNOTSUPP",
        libc::E2BIG => "E2BIG",
        libc::EBUSY => "EBUSY",
        libc::ENODEV => "ENODEV",
        _ => return format!("errno {n}"),
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_locations_name_their_stage() {
        assert_eq!(
            stage_of_location("tun_net_xmit+0x1b3"),
            Some(Stage::TapVhost)
        );
        assert_eq!(
            stage_of_location("xenvif_kthread_guest_rx+0x2c1 [xen_netback]"),
            Some(Stage::Netback)
        );
        assert_eq!(
            stage_of_location("br_handle_frame_finish+0x40 [bridge]"),
            Some(Stage::Bridge)
        );
        // Built in: the stage's prefix.
        assert_eq!(stage_of_location("br_flood+0x12"), Some(Stage::Bridge));
        assert_eq!(
            stage_of_location("veth_xdp_rcv.isra.0+0x9"),
            Some(Stage::Veth)
        );
        assert_eq!(stage_of_location("udp_queue_rcv_one_skb+0x12"), None);
        assert_eq!(stage_of_location("0xffffffffc0a01234"), None);
        // A module function outside the known stages is not guessed from its name.
        assert_eq!(stage_of_location("br_thing+0x1 [other]"), None);
    }

    #[test]
    fn functions_without_a_program_say_what_covers_them() {
        assert_eq!(without_program("veth_xmit"), None, "a hop program");
        assert_eq!(without_program("virtnet_poll"), None, "a work function");
        assert_eq!(without_program("handle_tx"), None, "a work function");
        assert!(without_program("handle_tx_kick")
            .unwrap()
            .contains("vhost_wakeup"));
        assert!(without_program("vhost_worker")
            .unwrap()
            .contains("never returns"));
        assert!(without_program("tun_get_user").is_none());
    }
}
