//! Work functions: kernel functions of the function tier that do a stage's work for a batch of
//! packets, or for one packet without taking its skb at entry: vhost-net's tx/rx handlers,
//! tun's socket calls, xen-netback's kthread actions, NAPI polls. They are not packet hops.
//! vtrace times each call (fentry at entry, fexit at return; kprobe/kretprobe where fentry is
//! refused) and counts what the call returns (packets of a NAPI poll, bytes of a sendmsg).
//!
//! One row is not a function but an interval between two: the vhost worker's wake-up, from the
//! moment work is queued for the worker (a guest kick, a tap with data) to the moment the
//! worker runs that work's handler. The `vhost_work` pointer pairs the two ends.

/// A work function (a row of `WORK_STATS`). Keep in step with vtrace/src/hooks.rs (catalog).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkFn {
    /// `handle_tx`: vhost-net moves a guest's tx ring into the tap (`tun_sendmsg` per frame).
    VhostHandleTx = 0,
    /// `handle_rx`: vhost-net moves the tap's queued frames into the guest's rx ring.
    VhostHandleRx = 1,
    /// `vhost_run_work_list`: one wake-up of a vhost worker, running its queued work (6.4+;
    /// before 6.4 the worker is `vhost_worker`, a loop that never returns, so not timed).
    VhostRunWorkList = 2,
    /// The vhost worker's wake-up: work queued (`vhost_worker_queue`/`vhost_vq_work_queue`,
    /// before 6.5 `vhost_work_queue`) until its handler (`handle_{tx,rx}_{kick,net}`) starts.
    VhostWakeup = 3,
    /// `tun_get_user`: a VMM's write (or vhost's sendmsg) builds an skb from a guest frame.
    TunGetUser = 4,
    /// `tun_sendmsg`: vhost-net hands one guest frame (or a batch of XDP buffers) to the tap.
    TunSendmsg = 5,
    /// `tun_recvmsg`: vhost-net takes one frame from the tap's ring.
    TunRecvmsg = 6,
    /// `xenvif_tx_action`: netback grant-copies a batch of a guest's tx packets into dom0.
    XenvifTxAction = 7,
    /// `xenvif_rx_action`: netback's guest-rx kthread copies queued packets to the guest.
    XenvifRxAction = 8,
    /// `xenvif_rx_queue_drop_expired`: netback drops packets that waited too long for the guest.
    XenvifRxQueueDropExpired = 9,
    /// `xenvif_poll`: netback's NAPI poll (guest tx into dom0).
    XenvifPoll = 10,
    /// `veth_poll`: veth's NAPI poll (XDP or GRO on the peer).
    VethPoll = 11,
    /// `virtnet_poll`: virtio-net's NAPI poll (a guest's rx, or a host's virtio NIC).
    VirtnetPoll = 12,
    /// `xenvif_rx_skb`: the guest-rx thread builds the grant copies of one packet for the guest.
    /// Where `xenvif_rx_action` is inlined into the thread (Debian 12's 6.1), this and
    /// `xenvif_rx_copy_flush` are what can be timed of it.
    XenvifRxSkb = 13,
    /// `xenvif_rx_copy_flush`: the guest-rx thread's batch of grant copies to the guest (one
    /// hypercall), and the responses it pushes.
    XenvifRxCopyFlush = 14,
}

/// Number of `WorkFn` rows.
pub const WORK_FN_COUNT: usize = 15;

/// What a work function's return value means, and its C type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Returns {
    /// `void`.
    Nothing,
    /// `int`: packets handled (a NAPI poll's work done), negative never.
    Packets,
    /// `int` or `ssize_t` (`wide`): bytes moved, or a negative errno.
    Bytes { wide: bool },
    /// `bool`: whether there was work.
    Bool,
}

/// Where the vhost wake-up's ends find the `struct vhost_work *` among their arguments.
pub const WAKEUP_QUEUE_WORK_ARG: usize = 1;
pub const WAKEUP_RUN_WORK_ARG: usize = 0;

impl WorkFn {
    pub const ALL: [WorkFn; WORK_FN_COUNT] = [
        WorkFn::VhostHandleTx,
        WorkFn::VhostHandleRx,
        WorkFn::VhostRunWorkList,
        WorkFn::VhostWakeup,
        WorkFn::TunGetUser,
        WorkFn::TunSendmsg,
        WorkFn::TunRecvmsg,
        WorkFn::XenvifTxAction,
        WorkFn::XenvifRxAction,
        WorkFn::XenvifRxQueueDropExpired,
        WorkFn::XenvifPoll,
        WorkFn::VethPoll,
        WorkFn::VirtnetPoll,
        WorkFn::XenvifRxSkb,
        WorkFn::XenvifRxCopyFlush,
    ];

    pub fn from_u32(v: u32) -> Option<WorkFn> {
        WorkFn::ALL.get(v as usize).copied()
    }

    /// The row's name: the function timed, or `vhost_wakeup` for the wake-up interval.
    pub const fn name(self) -> &'static str {
        match self {
            WorkFn::VhostHandleTx => "handle_tx",
            WorkFn::VhostHandleRx => "handle_rx",
            WorkFn::VhostRunWorkList => "vhost_run_work_list",
            WorkFn::VhostWakeup => "vhost_wakeup",
            WorkFn::TunGetUser => "tun_get_user",
            WorkFn::TunSendmsg => "tun_sendmsg",
            WorkFn::TunRecvmsg => "tun_recvmsg",
            WorkFn::XenvifTxAction => "xenvif_tx_action",
            WorkFn::XenvifRxAction => "xenvif_rx_action",
            WorkFn::XenvifRxQueueDropExpired => "xenvif_rx_queue_drop_expired",
            WorkFn::XenvifPoll => "xenvif_poll",
            WorkFn::VethPoll => "veth_poll",
            WorkFn::VirtnetPoll => "virtnet_poll",
            WorkFn::XenvifRxSkb => "xenvif_rx_skb",
            WorkFn::XenvifRxCopyFlush => "xenvif_rx_copy_flush",
        }
    }

    /// The kernel module the function is in, where a distribution builds it as one.
    pub const fn module(self) -> &'static str {
        match self {
            WorkFn::VhostHandleTx | WorkFn::VhostHandleRx => "vhost_net",
            WorkFn::VhostRunWorkList | WorkFn::VhostWakeup => "vhost",
            WorkFn::TunGetUser | WorkFn::TunSendmsg | WorkFn::TunRecvmsg => "tun",
            WorkFn::XenvifTxAction
            | WorkFn::XenvifRxAction
            | WorkFn::XenvifRxQueueDropExpired
            | WorkFn::XenvifPoll
            | WorkFn::XenvifRxSkb
            | WorkFn::XenvifRxCopyFlush => "xen_netback",
            WorkFn::VethPoll => "veth",
            WorkFn::VirtnetPoll => "virtio_net",
        }
    }

    /// What the return value means (the prototypes of 6.1–6.18; the loader checks the
    /// running kernel's BTF before attaching the exit program).
    pub const fn returns(self) -> Returns {
        match self {
            // void handle_tx(struct vhost_net *net) (and the other void ones)
            WorkFn::VhostHandleTx
            | WorkFn::VhostHandleRx
            | WorkFn::VhostWakeup
            | WorkFn::XenvifRxAction
            | WorkFn::XenvifRxQueueDropExpired
            | WorkFn::XenvifRxSkb
            | WorkFn::XenvifRxCopyFlush => Returns::Nothing,
            // static bool vhost_run_work_list(void *data)
            WorkFn::VhostRunWorkList => Returns::Bool,
            // static ssize_t tun_get_user(tun, tfile, msg_control, from, noblock, more)
            WorkFn::TunGetUser => Returns::Bytes { wide: true },
            // static int tun_sendmsg(sock, m, total_len), tun_recvmsg(sock, m, total_len, flags)
            WorkFn::TunSendmsg | WorkFn::TunRecvmsg => Returns::Bytes { wide: false },
            // int xenvif_tx_action(queue, budget); int xxx_poll(struct napi_struct *, int budget)
            WorkFn::XenvifTxAction
            | WorkFn::XenvifPoll
            | WorkFn::VethPoll
            | WorkFn::VirtnetPoll => Returns::Packets,
        }
    }

    /// Runs once per frame (tun's calls, netback's per-packet copy setup) rather than once per
    /// batch: the dearer rows to time under a flood.
    pub const fn per_packet(self) -> bool {
        matches!(
            self,
            WorkFn::TunGetUser | WorkFn::TunSendmsg | WorkFn::TunRecvmsg | WorkFn::XenvifRxSkb
        )
    }

    /// The wake-up row is an interval between two functions, not a function's call.
    pub const fn is_interval(self) -> bool {
        matches!(self, WorkFn::VhostWakeup)
    }
}

/// Functions that queue vhost work (`struct vhost_work *` at `WAKEUP_QUEUE_WORK_ARG`):
/// `vhost_worker_queue(worker, work)` and `vhost_vq_work_queue(vq, work)` since 6.5,
/// `vhost_work_queue(dev, work)` before. vtrace attaches to every one the kernel has: Debian's
/// 6.12 inlines `vhost_vq_work_queue` into `vhost_poll_queue` and `vhost_poll_wakeup` (the
/// kick path), which call `vhost_worker_queue` directly.
pub const WAKEUP_QUEUE_FUNCTIONS: [&str; 3] = [
    "vhost_worker_queue",
    "vhost_vq_work_queue",
    "vhost_work_queue",
];
/// vhost-net's work handlers, which the worker calls through `work->fn` (so never inlined):
/// a guest kick on a virtqueue, or the tap's socket becoming ready.
pub const WAKEUP_RUN_FUNCTIONS: [&str; 4] = [
    "handle_tx_kick",
    "handle_rx_kick",
    "handle_tx_net",
    "handle_rx_net",
];

/// Log2 buckets of call durations: bucket `i` counts durations in [2^i, 2^(i+1)) ns (bucket 0
/// also counts 0); the last bucket everything from 2^31 ns (~2.1 s) on.
pub const WORK_BUCKETS: usize = 32;

/// Per-CPU statistics of one work row.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WorkStats {
    /// Calls timed (entry and return both seen on the same task).
    pub calls: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    /// Sum of non-negative return values (packets or bytes; `true`s for `Returns::Bool`).
    pub returned: u64,
    /// Calls that returned a negative errno.
    pub errors: u64,
    /// Returns whose entry this CPU's slot did not hold for the task (another call of the same
    /// function began on this CPU in between, or the entry was before vtrace attached): not
    /// timed.
    pub unmatched: u64,
    pub buckets: [u64; WORK_BUCKETS],
}

impl WorkStats {
    pub const fn zeroed() -> WorkStats {
        WorkStats {
            calls: 0,
            total_ns: 0,
            max_ns: 0,
            returned: 0,
            errors: 0,
            unmatched: 0,
            buckets: [0; WORK_BUCKETS],
        }
    }

    /// The bucket of a duration.
    #[inline(always)]
    pub fn bucket(ns: u64) -> usize {
        let b = 63 - (ns | 1).leading_zeros() as usize;
        if b >= WORK_BUCKETS {
            WORK_BUCKETS - 1
        } else {
            b
        }
    }
}

/// A call in progress, per CPU and work row: the task that entered and when.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WorkEntry {
    /// `bpf_get_current_pid_tgid()`: tgid << 32 | pid.
    pub task: u64,
    /// Entry time (ns, `bpf_ktime_get_ns`); 0 when no call is in progress.
    pub entered_ns: u64,
}

const _: () = assert!(core::mem::size_of::<WorkStats>() == 8 * (6 + WORK_BUCKETS));
const _: () = assert!(core::mem::size_of::<WorkEntry>() == 16);
const _: () = assert!(WorkFn::ALL.len() == WORK_FN_COUNT);
