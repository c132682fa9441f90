//! Empty programs that `vtrace hooks` loads to find out, by trying, whether this kernel allows
//! the function tier: fentry (needs BTF and the BPF trampoline) and kprobes (needs
//! CONFIG_KPROBES). The target function is chosen at load/attach time.

use aya_ebpf::{
    macros::{fentry, kprobe},
    programs::{FEntryContext, ProbeContext},
};

#[fentry]
pub fn vt_probe_fentry(_ctx: FEntryContext) -> i32 {
    0
}

#[kprobe]
pub fn vt_probe_kprobe(_ctx: ProbeContext) -> u32 {
    0
}

/// Loaded (not attached) by `vtrace hooks` to see whether the device tier (tc) is allowed.
#[aya_ebpf::macros::classifier]
pub fn vt_probe_tc(_ctx: aya_ebpf::programs::TcContext) -> i32 {
    0 // TC_ACT_OK
}

/// Loaded (not attached) by `vtrace hooks` to see whether XDP is allowed.
#[aya_ebpf::macros::xdp]
pub fn vt_probe_xdp(_ctx: aya_ebpf::programs::XdpContext) -> u32 {
    2 // XDP_PASS
}

/// An empty program at a tracepoint chosen at load time: `vtrace baseline` attaches one per hook
/// so that a hook's cost can be reported as the difference from doing nothing at the same hook
/// (bpf_stats adds its own clock reads to every run, a floor both share).
#[aya_ebpf::macros::btf_tracepoint]
pub fn vt_empty(_ctx: aya_ebpf::programs::BtfTracePointContext) -> i32 {
    0
}
