//! Loading one program of vtrace's eBPF object with the bpf syscall directly, for what aya 0.14
//! cannot express: a tracing program whose target lives in a kernel module. aya's `FEntry`
//! resolves the target in vmlinux BTF only and never sets `attach_btf_obj_fd`, so the kernel
//! looks for the function in vmlinux. Here the program is loaded with
//!
//! * `prog_type` BPF_PROG_TYPE_TRACING and `expected_attach_type` BPF_TRACE_FENTRY,
//! * `attach_btf_id`: the function's type id in the module's split BTF (`btf::Btf::func_id`),
//! * `attach_btf_obj_fd`: an fd of the module's BTF object (`btf_object::find`), kernel 5.11+,
//!
//! and attached with BPF_RAW_TRACEPOINT_OPEN (no name: the target was fixed at load), which
//! returns a bpf link fd. The process owns both fds: closing them, or the process dying however
//! it dies, detaches and frees the program.
//!
//! The instructions come from the same embedded object aya loaded, parsed again with aya-obj
//! (the parser aya itself uses) and relocated against the maps of the already loaded
//! `aya::Ebpf`: the program shares every map, including the `.rodata` holding the frozen
//! load-time configuration, with the programs aya attached. Subprogram calls are linked the way
//! aya links them. The loader takes the program and attach types as parameters, so a tp_btf
//! program can go through it too (that is how it is tested on kernels that refuse fentry).

use std::{
    collections::HashSet,
    ffi::CStr,
    fmt, io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd},
};

use aya::maps::Map;
use aya_obj::generated::{bpf_attach_type, bpf_insn, bpf_prog_type};

use super::bpf_sys::{self, bpf_cmd, ProgInfo};

/// A refusal, said in one line, with the errno when a syscall failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub errno: Option<i32>,
    pub message: String,
}

impl Error {
    fn msg(message: impl Into<String>) -> Error {
        Error {
            errno: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// What a program is loaded against.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub prog_type: bpf_prog_type,
    pub attach_type: bpf_attach_type,
    /// A type id in the BTF of `attach_btf_obj` (vmlinux's when `None`): a FUNC for fentry, the
    /// `btf_trace_<event>` typedef for tp_btf.
    pub attach_btf_id: u32,
    /// The kernel BTF object the id is in: a module's (from `btf_object::find`), or vmlinux's.
    pub attach_btf_obj: Option<BorrowedFd<'a>>,
}

/// vtrace's object, its map references pointing at the maps of one loaded `aya::Ebpf` and its
/// calls linked: ready to load any of its programs with [`Linker::load`].
pub struct Linker {
    obj: aya_obj::Object,
}

/// The fd of a map aya created. Every variant holds the map's `MapData`.
fn map_fd(map: &Map) -> RawFd {
    let data = match map {
        Map::Array(d)
        | Map::ArrayOfMaps(d)
        | Map::BloomFilter(d)
        | Map::CgroupArray(d)
        | Map::CgroupStorage(d)
        | Map::CgrpStorage(d)
        | Map::CpuMap(d)
        | Map::DevMap(d)
        | Map::DevMapHash(d)
        | Map::HashMap(d)
        | Map::HashOfMaps(d)
        | Map::InodeStorage(d)
        | Map::LpmTrie(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuCgroupStorage(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::PerfEventArray(d)
        | Map::ProgramArray(d)
        | Map::Queue(d)
        | Map::ReusePortSockArray(d)
        | Map::RingBuf(d)
        | Map::SockHash(d)
        | Map::SockMap(d)
        | Map::SkStorage(d)
        | Map::Stack(d)
        | Map::StackTraceMap(d)
        | Map::Unsupported(d)
        | Map::XskMap(d) => d,
    };
    data.fd().as_fd().as_raw_fd()
}

impl Linker {
    /// Parses `object` (the bytes `ebpf` was loaded from) and relocates it against `ebpf`'s
    /// maps. `btf` is the kernel's, for CO-RE relocations if the object has any (as aya does).
    /// Call it before any map is taken out of `ebpf` (`Tracer::take_events`).
    pub fn new(object: &[u8], ebpf: &aya::Ebpf, btf: &aya::Btf) -> Result<Linker, Error> {
        let mut obj = aya_obj::Object::parse(object)
            .map_err(|e| Error::msg(format!("parsing vtrace's eBPF object: {e}")))?;
        if obj.has_btf_relocations() {
            obj.relocate_btf(btf)
                .map_err(|e| Error::msg(format!("relocating vtrace's eBPF object: {e}")))?;
        }
        // Calls and references to code sections are not map references (aya passes the same).
        let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
        // Every map of the object, paired with the fd aya created it under: the references to
        // a map (and to the `.rodata`/`.bss`/`.data` globals, by section) become that fd, so
        // the kernel sees the same map the aya-loaded programs use.
        let maps = std::mem::take(&mut obj.maps);
        let mut with_fds = Vec::with_capacity(maps.len());
        for (name, map) in &maps {
            let fd = ebpf.map(name).map(map_fd).ok_or_else(|| {
                Error::msg(format!(
                    "map {name} is not in the loaded object (taken before linking)"
                ))
            })?;
            with_fds.push((name.as_str(), fd, map));
        }
        obj.relocate_maps(with_fds.into_iter(), &text_sections)
            .map_err(|e| Error::msg(format!("relocating map references: {e}")))?;
        obj.relocate_calls(&text_sections)
            .map_err(|e| Error::msg(format!("linking subprogram calls: {e}")))?;
        Ok(Linker { obj })
    }

    /// Loads program `name` against `target` (BPF_PROG_LOAD). On refusal the load is tried
    /// again with the verifier log on, and the error says the log's last line.
    pub fn load(&self, name: &str, target: &Target<'_>) -> Result<OwnedFd, Error> {
        let prog = self
            .obj
            .programs
            .get(name)
            .ok_or_else(|| Error::msg(format!("program {name} not in the object")))?;
        let func = self
            .obj
            .functions
            .get(&prog.function_key())
            .ok_or_else(|| Error::msg(format!("program {name} has no code in the object")))?;
        let insns = &func.instructions;
        let license = prog.license.as_c_str();
        match prog_load(name, insns, license, target, None) {
            Ok(fd) => Ok(fd),
            Err(first) => {
                // Verification again with a log: its last line says why. The buffer is large
                // for a log's end; since 6.4 the kernel keeps the end when the log overflows.
                let mut log = vec![0u8; 1 << 20];
                let second = prog_load(name, insns, license, target, Some(&mut log));
                let e = match second {
                    // Loaded this time (a transient failure): use it.
                    Ok(fd) => return Ok(fd),
                    Err(e) => e,
                };
                let errno = e.raw_os_error().or(first.raw_os_error());
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                let text = String::from_utf8_lossy(&log[..end]);
                let last = verifier_reason(&text);
                Err(Error {
                    errno,
                    message: format!(
                        "BPF_PROG_LOAD refused ({}), {}",
                        bpf_sys::errno_name(&e),
                        if last.is_empty() {
                            "empty verifier log".to_string()
                        } else {
                            format!("verifier: {last}")
                        }
                    ),
                })
            }
        }
    }
}

/// The line of a verifier log that says why: the last one that is not the statistics the
/// verifier appends after a refusal too (`processed N insns ...`, `verification time`,
/// `stack depth`). Empty for an empty log (EPERM before verification, for one).
pub fn verifier_reason(log: &str) -> &str {
    const STATS: [&str; 3] = ["processed ", "verification time ", "stack depth "];
    log.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty() && !STATS.iter().any(|s| l.starts_with(s)))
        .unwrap_or("")
}

/// BPF_PROG_LOAD with the target in `attach_btf_id`/`attach_btf_obj_fd`.
fn prog_load(
    name: &str,
    insns: &[bpf_insn],
    license: &CStr,
    target: &Target<'_>,
    log: Option<&mut [u8]>,
) -> io::Result<OwnedFd> {
    let mut attr = bpf_sys::zeroed_attr();
    // SAFETY: a reference to the BPF_PROG_LOAD member of the zeroed union; only written.
    let load = unsafe { &mut attr.__bindgen_anon_3 };
    load.prog_type = target.prog_type as u32;
    load.expected_attach_type = target.attach_type as u32;
    load.insns = insns.as_ptr() as u64;
    load.insn_cnt = insns.len() as u32;
    load.license = license.as_ptr() as u64;
    // The kernel keeps 15 bytes of the name (BPF_OBJ_NAME_LEN, NUL included): what bpftool
    // shows, as for the programs aya loads.
    for (dst, src) in load.prog_name.iter_mut().zip(name.bytes().take(15)) {
        *dst = src as libc::c_char;
    }
    load.attach_btf_id = target.attach_btf_id;
    if let Some(obj) = target.attach_btf_obj {
        // A union with `attach_prog_fd` (which names a BPF program as the target instead).
        load.__bindgen_anon_1.attach_btf_obj_fd = obj.as_raw_fd() as u32;
    }
    if let Some(log) = log {
        load.log_level = 1;
        load.log_buf = log.as_mut_ptr() as u64;
        load.log_size = log.len() as u32;
    }
    bpf_sys::bpf_fd(bpf_cmd::BPF_PROG_LOAD, &mut attr)
}

/// A program loaded and attached by this process: dropping it detaches (the link fd closes)
/// and frees the program (its last fd closes).
#[derive(Debug)]
pub struct Attached {
    // Field order is drop order: the link goes before the program. Held, not read: closing
    // it detaches.
    #[allow(dead_code)]
    link: OwnedFd,
    prog: OwnedFd,
}

impl Attached {
    /// The kernel's id, name, run count and run time of the program.
    pub fn info(&self) -> io::Result<ProgInfo> {
        bpf_sys::prog_info(self.prog.as_fd())
    }

    /// The link's fd (tests check it is a bpf link).
    #[cfg(test)]
    pub fn link_fd(&self) -> BorrowedFd<'_> {
        self.link.as_fd()
    }
}

/// Attaches a loaded tracing program (fentry, tp_btf) at the target it was loaded against:
/// BPF_RAW_TRACEPOINT_OPEN without a name (kernel 5.5+) returns a bpf link. On failure the
/// program fd is closed here, so nothing stays loaded.
pub fn attach(prog: OwnedFd) -> Result<Attached, Error> {
    let mut attr = bpf_sys::zeroed_attr();
    // No tracepoint name: for BPF_PROG_TYPE_TRACING the target is the one fixed at load.
    attr.raw_tracepoint.name = 0;
    attr.raw_tracepoint.prog_fd = prog.as_raw_fd() as u32;
    match bpf_sys::bpf_fd(bpf_cmd::BPF_RAW_TRACEPOINT_OPEN, &mut attr) {
        Ok(link) => Ok(Attached { link, prog }),
        Err(e) => Err(Error {
            errno: e.raw_os_error(),
            message: format!(
                "BPF_RAW_TRACEPOINT_OPEN refused ({})",
                bpf_sys::errno_name(&e)
            ),
        }),
    }
}

/// fentry on function `func` of kernel module `module`: its id in the module's split BTF
/// (`module_btf`, from /sys/kernel/btf/<module>), the module's BTF object, then load and
/// attach. Every error is one line; on any error nothing stays loaded.
pub fn fentry_in_module(
    linker: &Linker,
    program: &str,
    module: &str,
    module_btf: &super::btf::Btf,
    func: &str,
) -> Result<Attached, Error> {
    tracing_at(
        linker,
        program,
        bpf_attach_type::BPF_TRACE_FENTRY,
        func,
        module_btf,
        Some(module),
    )
}

/// A tracing program (`attach_type` BPF_TRACE_FENTRY or BPF_TRACE_FEXIT) on function `func`,
/// whose BTF is `btf`: a module's split BTF with `module` its name, or vmlinux's with `None`.
/// Loaded and attached; every error is one line; on any error nothing stays loaded.
pub fn tracing_at(
    linker: &Linker,
    program: &str,
    attach_type: bpf_attach_type,
    func: &str,
    btf: &super::btf::Btf,
    module: Option<&str>,
) -> Result<Attached, Error> {
    let id = btf.func_id(func).ok_or_else(|| {
        Error::msg(match module {
            Some(m) => format!("{func} is not in module {m}'s BTF"),
            None => format!("{func} is not in the kernel's BTF"),
        })
    })?;
    let obj = match module {
        Some(m) => Some(super::btf_object::find(m).map_err(Error::msg)?),
        None => None,
    };
    let prog = linker.load(
        program,
        &Target {
            prog_type: bpf_prog_type::BPF_PROG_TYPE_TRACING,
            attach_type,
            attach_btf_id: id,
            attach_btf_obj: obj.as_ref().map(|o| o.as_fd()),
        },
    )?;
    // The program holds its own reference to the module's BTF (and so to the module) from
    // here on; `obj`'s fd can close.
    attach(prog)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use aya::maps::{MapData, PerCpuArray, RingBuf};
    use aya_obj::generated::{bpf_link_info, bpf_link_type};
    use vtrace_common::{counter_slot, flags, Config, Counter, Hook};
    use vtrace_lab::{Lab, LabOptions};

    use super::*;
    use crate::kernel::{btf::Btf, btf_object};

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// The reason line of verifier logs seen on real kernels: fentry on bridge's
    /// `br_handle_frame` (its argument 0 is a `struct sk_buff **`) on Debian's 6.12, where the
    /// last line alone was the statistics; a tp_btf program reading an argument 6.1's
    /// `consume_skb` does not have (aya's log of it, log level with statistics).
    #[test]
    fn verifier_reason_skips_the_statistics() {
        let fentry = "invalid bpf_context access off=0 size=8\n\
            processed 1 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0\n";
        assert_eq!(
            verifier_reason(fentry),
            "invalid bpf_context access off=0 size=8"
        );
        let tp = "0: R1=ctx(off=0,imm=0) R10=fp0\n0: (79) r7 = *(u64 *)(r1 +8)\n\
            func 'consume_skb' doesn't have 2-th argument\ninvalid bpf_context access off=8 size=8\n\
            verification time 272 usec\nstack depth 0+0\n\
            processed 1 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0\n\n";
        assert_eq!(
            verifier_reason(tp),
            "invalid bpf_context access off=8 size=8"
        );
        assert_eq!(verifier_reason(""), "");
        assert_eq!(verifier_reason("\n  \n"), "");
    }

    /// vtrace's object loaded by aya as `Tracer::start` loads it, and the kernel's BTF (aya's).
    fn load_object(config: &Config) -> (aya::Ebpf, aya::Btf) {
        let btf = aya::Btf::from_sys_fs().expect("the kernel's BTF");
        #[allow(deprecated)]
        let ebpf = aya::EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("CONFIG", config, true)
            .map_max_entries("EVENTS", 1 << 20)
            .map_max_entries("TRACKED", crate::tracer::tracked_entries())
            .load(crate::tracer::object())
            .expect("vtrace's object loads");
        (ebpf, btf)
    }

    fn config() -> Config {
        let mut c = Config::zeroed();
        c.offsets = crate::kernel::resolve_offsets(Btf::vmlinux().expect("BTF")).expect("offsets");
        c
    }

    /// Waits up to 5 s for the kernel to free program `id` (it frees asynchronously, after
    /// an RCU grace period).
    fn freed(id: u32) -> bool {
        (0..50).any(|_| {
            let gone =
                bpf_sys::prog_fd_by_id(id).is_err_and(|e| e.raw_os_error() == Some(libc::ENOENT));
            if !gone {
                std::thread::sleep(Duration::from_millis(100));
            }
            gone
        })
    }

    /// The raw loader end to end, on what this kernel allows (fentry is refused here): the
    /// tp_btf program of `net:netif_receive_skb` loaded through `Linker::load` as
    /// BPF_PROG_TYPE_TRACING / BPF_TRACE_RAW_TP, with attach_btf_id the id of the
    /// `btf_trace_netif_receive_skb` typedef and attach_btf_obj_fd the `vmlinux` BTF object
    /// found by name: the same fields an fentry program on a module function is loaded with.
    /// Attached with BPF_RAW_TRACEPOINT_OPEN, it runs on pings across a veth/bridge path in
    /// the lab's namespaces: the kernel's run count moves, the program's counter (a map aya
    /// created) moves, and it emits hop events filtered by the host in the frozen `.rodata`
    /// configuration, with device names read at the offsets from that configuration. Dropped,
    /// the program is freed.
    #[test]
    fn raw_loader_runs_a_tp_btf_program_on_real_traffic() {
        if !is_root() {
            eprintln!("skipped: loading programs and building namespaces needs root");
            return;
        }
        let lab = Lab::up(LabOptions {
            virtual_path: false,
            ..LabOptions::new()
        })
        .expect("lab up");
        let n = lab.native().clone();
        let mut config = config();
        config.flags = flags::TRACK | flags::FILTER_HOST;
        config.sample_every = 1;
        config.host = n.receiver_ip.to_ipv6_mapped().octets();
        let (mut ebpf, btf) = load_object(&config);
        let linker = Linker::new(crate::tracer::object(), &ebpf, &btf).expect("object links");
        let vmlinux = btf_object::find("vmlinux").expect("vmlinux BTF object");
        let id = Btf::vmlinux()
            .unwrap()
            .typedef_id("btf_trace_netif_receive_skb")
            .expect("tracepoint typedef in BTF");
        let program = crate::tracer::program_name(Hook::NetifReceiveSkb);
        let prog = linker
            .load(
                program,
                &Target {
                    prog_type: bpf_prog_type::BPF_PROG_TYPE_TRACING,
                    attach_type: bpf_attach_type::BPF_TRACE_RAW_TP,
                    attach_btf_id: id,
                    attach_btf_obj: Some(vmlinux.as_fd()),
                },
            )
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        let _stats = crate::cost::enable_stats().expect("BPF statistics");
        let attached = attach(prog).expect("attached");
        let info = attached.info().unwrap();
        assert_eq!(info.name, &program[..15], "the kernel's name for it");

        // The link is a bpf link of this program.
        // SAFETY: bpf_link_info is plain integers; all-zero is valid.
        let mut link: bpf_link_info = unsafe { std::mem::zeroed() };
        bpf_sys::obj_info(attached.link_fd(), &mut link).expect("link info");
        assert_eq!(link.prog_id, info.id);
        assert_eq!(
            link.type_,
            bpf_link_type::BPF_LINK_TYPE_RAW_TRACEPOINT as u32
        );

        let pings = 20;
        let stats = vtrace_lab::ping(
            &n.sender_ns,
            n.receiver_ip,
            pings,
            Duration::from_millis(20),
        )
        .expect("ping runs");
        assert_eq!(stats.received, pings, "{stats:?}");

        let runs = attached.info().unwrap().run_cnt;
        let counters: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(ebpf.map("COUNTERS").unwrap()).unwrap();
        let slot = counter_slot(Hook::NetifReceiveSkb as u32, Counter::Packets);
        let counted: u64 = counters.get(&slot, 0).unwrap().iter().sum();
        let mut ring = RingBuf::try_from(ebpf.take_map("EVENTS").unwrap()).unwrap();
        let mut at: Vec<String> = Vec::new();
        while let Some(item) = ring.next() {
            let ev = crate::tracer::decode(&item).expect("a hop event");
            assert_eq!(ev.hook, Hook::NetifReceiveSkb as u32);
            at.push(crate::ifname(&ev.ifname));
        }
        let on = |dev: &str| at.iter().filter(|d| *d == dev).count() as u32;
        eprintln!(
            "runs {runs}, counted {counted}, hop events {} ({} on {}, {} on {}, {} on eth0)",
            at.len(),
            on(&n.sender_veth),
            n.sender_veth,
            on(&n.receiver_veth),
            n.receiver_veth,
            on("eth0")
        );
        // Each echo request arrives at the bridge port of the sender's veth, then at the
        // receiver's eth0; each reply at the receiver's veth port, then at the sender's eth0.
        assert!(
            on(&n.sender_veth) >= pings,
            "requests at the bridge: {at:?}"
        );
        assert!(
            on(&n.receiver_veth) >= pings,
            "replies at the bridge: {at:?}"
        );
        assert!(on("eth0") >= 2 * pings, "both ends: {at:?}");
        // Every run counts, whatever the host filter: other traffic on the host counts too.
        assert!(counted >= at.len() as u64, "counter {counted}");
        assert!(
            runs >= counted,
            "run count {runs} against counter {counted}"
        );

        let id = info.id;
        drop(attached);
        assert!(freed(id), "program {id} still loaded after its fds closed");
    }

    /// fentry through the same loader, with a module's BTF object: on this machine the module
    /// path stops with one line (no module BTF here), and the kernel refuses fentry itself
    /// (EPERM) when the target is given through a BTF object fd too; nothing stays loaded
    /// either way. Where fentry is allowed the program attaches and is freed when dropped.
    #[test]
    fn fentry_through_a_btf_object_fails_cleanly_or_attaches() {
        if !is_root() {
            eprintln!("skipped: loading programs needs root");
            return;
        }
        let before = bpf_sys::program_ids();
        let (ebpf, btf) = load_object(&config());
        let linker = Linker::new(crate::tracer::object(), &ebpf, &btf).expect("object links");
        let info = Btf::vmlinux().unwrap();
        let program = crate::tracer::program_name(Hook::BrHandleFrame);

        // The module path: bridge is built in here, so it has no BTF object of its own.
        if std::path::Path::new("/sys/kernel/btf/bridge").exists() {
            eprintln!("bridge is a module with BTF here: its module path is tried below");
        }
        match fentry_in_module(&linker, program, "bridge", info, "br_handle_frame") {
            Ok(a) => eprintln!(
                "fentry on bridge's br_handle_frame attached: {:?}",
                a.info()
            ),
            Err(e) => {
                eprintln!("module path: {e}");
                assert!(!e.message.contains('\n'), "one line: {e}");
                assert!(
                    e.message.contains("module bridge")
                        || e.message.starts_with("BPF_PROG_LOAD refused"),
                    "{e}"
                );
            }
        }
        let missing = fentry_in_module(
            &linker,
            program,
            "vtrace_no_such_module",
            info,
            "br_handle_frame",
        )
        .unwrap_err();
        assert!(
            missing.message.contains("CONFIG_DEBUG_INFO_BTF_MODULES")
                && !missing.message.contains('\n'),
            "{missing}"
        );
        let absent = fentry_in_module(&linker, program, "bridge", info, "vtrace_no_such_function")
            .unwrap_err();
        assert_eq!(
            absent.message,
            "vtrace_no_such_function is not in module bridge's BTF"
        );

        // The load itself, against the vmlinux BTF object (a module's would be used the same
        // way): EPERM here, with an empty verifier log, as aya's fentry gets.
        let vmlinux = btf_object::find("vmlinux").unwrap();
        let target = Target {
            prog_type: bpf_prog_type::BPF_PROG_TYPE_TRACING,
            attach_type: bpf_attach_type::BPF_TRACE_FENTRY,
            attach_btf_id: info.func_id("br_handle_frame").expect("in vmlinux here"),
            attach_btf_obj: Some(vmlinux.as_fd()),
        };
        match linker.load(program, &target).and_then(attach) {
            Ok(a) => {
                let id = a.info().unwrap().id;
                eprintln!("fentry allowed on this kernel: program {id} attached");
                drop(a);
                assert!(freed(id));
            }
            Err(e) => {
                eprintln!("fentry refused: {e}");
                assert!(!e.message.contains('\n'), "one line: {e}");
                assert!(e.message.starts_with("BPF_PROG_LOAD refused ("), "{e}");
                assert!(e.errno.is_some(), "{e:?}");
            }
        }
        // No function-tier program of this test (or any fentry program: this kernel refuses
        // them) appeared.
        let new: Vec<u32> = bpf_sys::ids(bpf_cmd::BPF_PROG_GET_NEXT_ID)
            .unwrap()
            .into_iter()
            .filter(|id| !before.contains(id))
            .collect();
        let left: Vec<(u32, String)> = bpf_sys::prog_names(&new)
            .into_iter()
            .filter(|(_, n)| n.starts_with("vt_fn_"))
            .collect();
        assert!(left.is_empty(), "left loaded: {left:?}");
    }
}
