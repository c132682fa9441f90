//! Work functions (see `vtrace_common::work`): the function tier's functions that are not packet
//! hops. vhost-net's handlers, tun's socket calls, netback's kthread actions and NAPI polls
//! are timed per call; the vhost worker's wake-up is timed from the work's queueing to its
//! handler's start.
//!
//! Each timed row has four programs over two bodies: fentry/fexit (BPF trampoline, 5.5+; the
//! return value through `bpf_get_func_ret`, 5.17+) and the kprobe/kretprobe twins for kernels
//! that refuse fentry. Entry and return pair through a per-CPU slot per row holding the task
//! and the entry time: a return on another task than the slot's is counted as unmatched, not
//! timed. These functions run once per batch (a poll, a kick) or per frame for tun's calls,
//! so a slot write and a per-CPU statistics update is all they cost.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_func_ip, bpf_ktime_get_ns},
    macros::{fentry, fexit, kprobe, kretprobe, map},
    maps::{LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext},
    EbpfContext,
};
use vtrace_common::work::{
    Returns, WorkEntry, WorkFn, WorkStats, WAKEUP_QUEUE_WORK_ARG, WAKEUP_RUN_WORK_ARG,
    WORK_FN_COUNT,
};

/// Per CPU and row: calls, time, returns, log2 histogram. Userspace sums the CPUs.
#[map]
pub static WORK_STATS: PerCpuArray<WorkStats> =
    PerCpuArray::with_max_entries(WORK_FN_COUNT as u32, 0);

/// Per CPU and row: the call in progress (task, entry time).
#[map]
pub static WORK_ENTRY: PerCpuArray<WorkEntry> =
    PerCpuArray::with_max_entries(WORK_FN_COUNT as u32, 0);

/// `struct vhost_work *` -> when it was queued, until its handler runs. Inserted only if absent:
/// queueing work already queued is a no-op in vhost (VHOST_WORK_QUEUED), and the wait starts
/// at the first request. LRU, so work that never runs (a device torn down) cannot fill it.
#[map]
pub static WAKE_QUEUED: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

/// include/uapi/linux/bpf.h
const BPF_NOEXIST: u64 = 1;

#[inline(always)]
fn enter(row: WorkFn) {
    if let Some(slot) = WORK_ENTRY.get_ptr_mut(row as u32) {
        // SAFETY: this CPU's slot; a program runs to completion on its CPU.
        unsafe {
            *slot = WorkEntry {
                task: bpf_get_current_pid_tgid(),
                entered_ns: bpf_ktime_get_ns(),
            }
        };
    }
}

/// One timed interval into a row's statistics.
#[inline(always)]
fn record(stats: &mut WorkStats, ns: u64) {
    stats.calls += 1;
    stats.total_ns += ns;
    if ns > stats.max_ns {
        stats.max_ns = ns;
    }
    if let Some(b) = stats.buckets.get_mut(WorkStats::bucket(ns)) {
        *b += 1;
    }
}

/// The return of a call of `row` on this CPU; `ret` is the raw return register.
#[inline(always)]
fn leave(row: WorkFn, ret: u64) {
    let now = unsafe { bpf_ktime_get_ns() };
    let task = bpf_get_current_pid_tgid();
    let (Some(slot), Some(stats)) = (
        WORK_ENTRY.get_ptr_mut(row as u32),
        WORK_STATS.get_ptr_mut(row as u32),
    ) else {
        return;
    };
    // SAFETY: this CPU's slots of this row; a program runs to completion on its CPU.
    let (entry, stats) = unsafe { (&mut *slot, &mut *stats) };
    if entry.entered_ns == 0 || entry.task != task {
        stats.unmatched += 1;
        return;
    }
    let ns = now.saturating_sub(entry.entered_ns);
    entry.entered_ns = 0;
    record(stats, ns);
    // The register holds the C return type; an `int` fills its low 32 bits only.
    let value = match row.returns() {
        Returns::Nothing => return,
        Returns::Bool => (ret & 0xff != 0) as i64,
        Returns::Packets | Returns::Bytes { wide: false } => ret as u32 as i32 as i64,
        Returns::Bytes { wide: true } => ret as i64,
    };
    if value < 0 {
        stats.errors += 1;
    } else {
        stats.returned += value as u64;
    }
}

/// The return value at fexit, when the row uses it (the helper is 5.17+; void functions do
/// without it).
#[inline(always)]
fn fexit_ret(ctx: &FExitContext, row: WorkFn) -> u64 {
    match row.returns() {
        Returns::Nothing => 0,
        _ => ctx.ret::<u64>().unwrap_or(0),
    }
}

macro_rules! work_fn {
    ($fentry:ident, $fexit:ident, $kprobe:ident, $kretprobe:ident, $row:expr) => {
        #[fentry]
        pub fn $fentry(_ctx: FEntryContext) -> i32 {
            enter($row);
            0
        }

        #[fexit]
        pub fn $fexit(ctx: FExitContext) -> i32 {
            leave($row, fexit_ret(&ctx, $row));
            0
        }

        #[kprobe]
        pub fn $kprobe(_ctx: ProbeContext) -> u32 {
            enter($row);
            0
        }

        #[kretprobe]
        pub fn $kretprobe(ctx: RetProbeContext) -> u32 {
            leave($row, ctx.ret::<u64>());
            0
        }
    };
}

// Program names: vt_wk_<row> (fentry), _ret (fexit), _kp (kprobe), _kret (kretprobe); the
// loader derives them from `WorkFn::name`.
work_fn!(
    vt_wk_handle_tx,
    vt_wk_handle_tx_ret,
    vt_wk_handle_tx_kp,
    vt_wk_handle_tx_kret,
    WorkFn::VhostHandleTx
);
work_fn!(
    vt_wk_handle_rx,
    vt_wk_handle_rx_ret,
    vt_wk_handle_rx_kp,
    vt_wk_handle_rx_kret,
    WorkFn::VhostHandleRx
);
work_fn!(
    vt_wk_vhost_run_work_list,
    vt_wk_vhost_run_work_list_ret,
    vt_wk_vhost_run_work_list_kp,
    vt_wk_vhost_run_work_list_kret,
    WorkFn::VhostRunWorkList
);
work_fn!(
    vt_wk_tun_get_user,
    vt_wk_tun_get_user_ret,
    vt_wk_tun_get_user_kp,
    vt_wk_tun_get_user_kret,
    WorkFn::TunGetUser
);
work_fn!(
    vt_wk_tun_sendmsg,
    vt_wk_tun_sendmsg_ret,
    vt_wk_tun_sendmsg_kp,
    vt_wk_tun_sendmsg_kret,
    WorkFn::TunSendmsg
);
work_fn!(
    vt_wk_tun_recvmsg,
    vt_wk_tun_recvmsg_ret,
    vt_wk_tun_recvmsg_kp,
    vt_wk_tun_recvmsg_kret,
    WorkFn::TunRecvmsg
);
work_fn!(
    vt_wk_xenvif_tx_action,
    vt_wk_xenvif_tx_action_ret,
    vt_wk_xenvif_tx_action_kp,
    vt_wk_xenvif_tx_action_kret,
    WorkFn::XenvifTxAction
);
work_fn!(
    vt_wk_xenvif_rx_action,
    vt_wk_xenvif_rx_action_ret,
    vt_wk_xenvif_rx_action_kp,
    vt_wk_xenvif_rx_action_kret,
    WorkFn::XenvifRxAction
);
work_fn!(
    vt_wk_xenvif_rx_queue_drop_expired,
    vt_wk_xenvif_rx_queue_drop_expired_ret,
    vt_wk_xenvif_rx_queue_drop_expired_kp,
    vt_wk_xenvif_rx_queue_drop_expired_kret,
    WorkFn::XenvifRxQueueDropExpired
);
work_fn!(
    vt_wk_xenvif_poll,
    vt_wk_xenvif_poll_ret,
    vt_wk_xenvif_poll_kp,
    vt_wk_xenvif_poll_kret,
    WorkFn::XenvifPoll
);
work_fn!(
    vt_wk_veth_poll,
    vt_wk_veth_poll_ret,
    vt_wk_veth_poll_kp,
    vt_wk_veth_poll_kret,
    WorkFn::VethPoll
);
work_fn!(
    vt_wk_virtnet_poll,
    vt_wk_virtnet_poll_ret,
    vt_wk_virtnet_poll_kp,
    vt_wk_virtnet_poll_kret,
    WorkFn::VirtnetPoll
);
work_fn!(
    vt_wk_xenvif_rx_skb,
    vt_wk_xenvif_rx_skb_ret,
    vt_wk_xenvif_rx_skb_kp,
    vt_wk_xenvif_rx_skb_kret,
    WorkFn::XenvifRxSkb
);
work_fn!(
    vt_wk_xenvif_rx_copy_flush,
    vt_wk_xenvif_rx_copy_flush_ret,
    vt_wk_xenvif_rx_copy_flush_kp,
    vt_wk_xenvif_rx_copy_flush_kret,
    WorkFn::XenvifRxCopyFlush
);

// The vhost wake-up: one program at the queueing function, one at each of vhost-net's work
// handlers (the same program attached to each).

#[inline(always)]
fn wake_queued(work: u64) {
    if work != 0 {
        let now = unsafe { bpf_ktime_get_ns() };
        let _ = WAKE_QUEUED.insert(&work, &now, BPF_NOEXIST);
    }
}

#[inline(always)]
fn wake_runs(work: u64) {
    if work == 0 {
        return;
    }
    // SAFETY: a plain u64 value; read before the entry is removed.
    let Some(queued) = (unsafe { WAKE_QUEUED.get(&work) }).copied() else {
        return;
    };
    let _ = WAKE_QUEUED.remove(&work);
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(stats) = WORK_STATS.get_ptr_mut(WorkFn::VhostWakeup as u32) {
        // SAFETY: this CPU's statistics of the wake-up row.
        record(unsafe { &mut *stats }, now.saturating_sub(queued));
    }
}

#[fentry]
pub fn vt_wk_vhost_queue(ctx: FEntryContext) -> i32 {
    wake_queued(ctx.arg(WAKEUP_QUEUE_WORK_ARG));
    0
}

#[fentry]
pub fn vt_wk_vhost_run(ctx: FEntryContext) -> i32 {
    wake_runs(ctx.arg(WAKEUP_RUN_WORK_ARG));
    0
}

#[kprobe]
pub fn vt_wk_vhost_queue_kp(ctx: ProbeContext) -> u32 {
    wake_queued(ctx.arg(WAKEUP_QUEUE_WORK_ARG).unwrap_or(0));
    0
}

#[kprobe]
pub fn vt_wk_vhost_run_kp(ctx: ProbeContext) -> u32 {
    wake_runs(ctx.arg(WAKEUP_RUN_WORK_ARG).unwrap_or(0));
    0
}

// Driver functions found at run time (the `ndo_start_xmit` and NAPI poll functions the
// discovery hooks read from the devices, see drivers.rs): one generic pair of programs, loaded
// once per function by the loader, keyed by the traced function's address
// (`bpf_get_func_ip`, 5.15+), which userspace names from /proc/kallsyms.

/// Per CPU and function address: the call in progress.
#[map]
pub static DRIVER_ENTRY: PerCpuHashMap<u64, WorkEntry> = PerCpuHashMap::with_max_entries(256, 0);

/// Per CPU and function address: calls and time.
#[map]
pub static DRIVER_STATS: PerCpuHashMap<u64, WorkStats> = PerCpuHashMap::with_max_entries(256, 0);

#[fentry]
pub fn vt_wk_driver(ctx: FEntryContext) -> i32 {
    // SAFETY: the helper reads the trampoline's saved address of the traced function.
    let ip = unsafe { bpf_get_func_ip(ctx.as_ptr()) };
    let entry = WorkEntry {
        task: bpf_get_current_pid_tgid(),
        entered_ns: unsafe { bpf_ktime_get_ns() },
    };
    let _ = DRIVER_ENTRY.insert(&ip, &entry, 0);
    0
}

#[fexit]
pub fn vt_wk_driver_ret(ctx: FExitContext) -> i32 {
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: as at entry.
    let ip = unsafe { bpf_get_func_ip(ctx.as_ptr()) };
    let task = bpf_get_current_pid_tgid();
    let stats = match DRIVER_STATS.get_ptr_mut(&ip) {
        Some(s) => s,
        None => {
            let _ = DRIVER_STATS.insert(&ip, &WorkStats::zeroed(), BPF_NOEXIST);
            match DRIVER_STATS.get_ptr_mut(&ip) {
                Some(s) => s,
                None => return 0,
            }
        }
    };
    // SAFETY: this CPU's value of a per-CPU map; a program runs to completion on its CPU.
    let stats = unsafe { &mut *stats };
    match DRIVER_ENTRY.get_ptr_mut(&ip) {
        // SAFETY: as above.
        Some(e) if unsafe { (*e).entered_ns != 0 && (*e).task == task } => {
            let entry = unsafe { &mut *e };
            let ns = now.saturating_sub(entry.entered_ns);
            entry.entered_ns = 0;
            record(stats, ns);
        }
        _ => stats.unmatched += 1,
    }
    0
}
