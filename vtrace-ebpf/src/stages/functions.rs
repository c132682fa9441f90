//! The function tier: kernel functions inside the stages (bridge, tun/tap, xen-netback, veth,
//! virtio-net) that take the packet at entry. Each has an fentry program (BTF trampoline, the
//! cheapest) and a kprobe twin for kernels that refuse fentry; the loader picks, and attaches
//! the target function by name at load time. Argument positions come from
//! `Hook::function_args`, which vtrace checks against the running kernel's BTF before attaching.
//!
//! Inside a stage the skb is the one an entry tracepoint already saw, so these are transit
//! hops: one lookup of the skb address, and only tracked packets are recorded.

use aya_ebpf::{
    helpers::{bpf_get_func_arg, bpf_probe_read_kernel},
    macros::{fentry, kprobe},
    programs::{FEntryContext, ProbeContext},
    EbpfContext,
};
use vtrace_common::{FunctionArgs, Hook};

use crate::{
    hop::{device_hop, Role},
    kernel::Untyped,
};

/// The argument positions of `hook`, at compile time.
const fn args_of(hook: Hook) -> FunctionArgs {
    match hook.function_args() {
        Some(a) => a,
        None => panic!("not a function hook"),
    }
}

#[inline(always)]
fn hop(hook: Hook, skb: u64, dev: u64) {
    let skb = if args_of(hook).skb_indirect {
        // SAFETY: bpf_probe_read_kernel copes with any address.
        unsafe { bpf_probe_read_kernel(skb as *const u64) }.unwrap_or(0)
    } else {
        skb
    };
    if skb != 0 {
        // Untyped for fentry too: some hooks take `struct sk_buff **`, whose pointee is read as
        // a plain integer; one body serves both attach types.
        device_hop::<Untyped>(hook, Role::Transit, skb, dev);
    }
}

macro_rules! function_hook {
    ($fentry:ident, $kprobe:ident, $hook:expr) => {
        #[fentry]
        pub fn $fentry(ctx: FEntryContext) -> i32 {
            const A: FunctionArgs = args_of($hook);
            let dev: u64 = match A.dev {
                Some(i) => ctx.arg(i),
                None => 0,
            };
            let skb: u64 = if A.skb_indirect {
                // The verifier refuses a context read of a `struct sk_buff **` argument
                // (btf_ctx_access: a pointer to a pointer is "not a struct"); the helper
                // (5.17+) hands over the raw argument instead.
                let mut v = 0u64;
                // SAFETY: the helper writes one u64 to `v`, a stack slot.
                unsafe { bpf_get_func_arg(ctx.as_ptr(), A.skb as u32, &mut v) };
                v
            } else {
                ctx.arg(A.skb)
            };
            hop($hook, skb, dev);
            0
        }

        #[kprobe]
        pub fn $kprobe(ctx: ProbeContext) -> u32 {
            const A: FunctionArgs = args_of($hook);
            let dev: u64 = match A.dev {
                Some(i) => ctx.arg(i).unwrap_or(0),
                None => 0,
            };
            hop($hook, ctx.arg(A.skb).unwrap_or(0), dev);
            0
        }
    };
}

function_hook!(
    vt_fn_br_handle_frame,
    vt_fn_br_handle_frame_kp,
    Hook::BrHandleFrame
);
function_hook!(vt_fn_br_forward, vt_fn_br_forward_kp, Hook::BrForward);
function_hook!(
    vt_fn_br_pass_frame_up,
    vt_fn_br_pass_frame_up_kp,
    Hook::BrPassFrameUp
);
function_hook!(vt_fn_br_dev_xmit, vt_fn_br_dev_xmit_kp, Hook::BrDevXmit);
function_hook!(vt_fn_tun_net_xmit, vt_fn_tun_net_xmit_kp, Hook::TunNetXmit);
function_hook!(vt_fn_tun_do_read, vt_fn_tun_do_read_kp, Hook::TunDoRead);
function_hook!(
    vt_fn_xenvif_start_xmit,
    vt_fn_xenvif_start_xmit_kp,
    Hook::XenvifStartXmit
);
function_hook!(vt_fn_veth_xmit, vt_fn_veth_xmit_kp, Hook::VethXmit);
function_hook!(
    vt_fn_virtio_start_xmit,
    vt_fn_virtio_start_xmit_kp,
    Hook::VirtioStartXmit
);
