//! Types shared by vtrace's eBPF programs (`vtrace-ebpf`) and its userspace loader (`vtrace`).
//!
//! Everything here is `#[repr(C)]`, without `bool` and without implicit padding, so both sides
//! see the same bytes. Sizes are asserted at compile time. The userspace side gets `aya::Pod`
//! impls behind the `user` feature.
#![no_std]

pub mod packet;
pub mod work;

/// Packets in flight the tracking map holds per possible CPU (see vtrace-ebpf's `TRACKED`).
pub const TRACKED_PER_CPU: u32 = 16384;

/// Length of a kernel device name (`IFNAMSIZ` in include/uapi/linux/if.h).
pub const IFNAMSIZ: usize = 16;
/// How many `--iface` names the kernel-side filter holds.
pub const MAX_IFACE_FILTERS: usize = 8;

/// The hooks of the stable tracepoint tier. The discriminant indexes `COUNTERS` and is carried
/// in every [`HopEvent`]. Keep in step with `vtrace/src/hooks.rs` (names, stages).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    /// `net:netif_receive_skb`: a device hands a received packet to the stack.
    NetifReceiveSkb = 0,
    /// `net:netif_rx`: a (virtual) device queues a packet to the per-CPU backlog.
    NetifRx = 1,
    /// `net:napi_gro_receive_entry`: a NAPI driver passes a packet to GRO.
    NapiGroReceiveEntry = 2,
    /// `net:net_dev_queue`: the stack queues a packet for a device (before the qdisc).
    NetDevQueue = 3,
    /// `net:net_dev_start_xmit`: the packet reaches the driver's `ndo_start_xmit`.
    NetDevStartXmit = 4,
    /// `net:net_dev_xmit`: the driver's `ndo_start_xmit` returned.
    NetDevXmit = 5,
    /// `qdisc:qdisc_dequeue`: a qdisc released a packet towards the driver.
    QdiscDequeue = 6,
    /// `skb:skb_copy_datagram_iovec`: a reader (VMM, vhost, socket) copies the data out.
    SkbCopyDatagramIovec = 7,
    /// `skb:consume_skb`: a normal free.
    ConsumeSkb = 8,
    /// `skb:kfree_skb`: a free with a drop reason.
    KfreeSkb = 9,
    /// `napi:napi_poll`: one NAPI poll round of a device. Not a packet hop: it counts rounds
    /// (in `Counter::Packets`) and feeds driver discovery (`DriverStats`).
    NapiPoll = 10,

    // The function tier (fentry, else kprobe): kernel functions inside a stage. Only
    // functions that take the packet at entry are hops; `FunctionArgs` says where it is.
    /// `br_handle_frame`: a bridge port's rx handler takes the frame.
    BrHandleFrame = 32,
    /// `br_forward`: the bridge forwards to one port.
    BrForward = 33,
    /// `br_pass_frame_up`: the bridge delivers to the host stack.
    BrPassFrameUp = 34,
    /// `br_dev_xmit`: the bridge device transmits.
    BrDevXmit = 35,
    /// `tun_net_xmit`: the host queues a frame on a tap's ring.
    TunNetXmit = 36,
    /// `tun_do_read`: the VMM (or vhost) reads a frame from a tap.
    TunDoRead = 37,
    /// `xenvif_start_xmit`: dom0 queues a packet for a Xen guest (vif).
    XenvifStartXmit = 38,
    /// `veth_xmit`: a veth transmits to its peer.
    VethXmit = 39,
    /// `start_xmit`: virtio-net transmits.
    VirtioStartXmit = 40,
}

/// Number of tracepoint hooks (`Hook` values 0..HOOK_COUNT).
pub const HOOK_COUNT: usize = 11;
/// First `Hook` value of the function tier.
pub const FUNCTION_HOOK_BASE: u32 = 32;
/// Number of function-tier hooks.
pub const FUNCTION_HOOK_COUNT: usize = 9;

/// Where a function hook finds the packet and the device among its arguments (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FunctionArgs {
    pub skb: usize,
    /// The argument is `struct sk_buff **` (rx handlers), not `struct sk_buff *`.
    pub skb_indirect: bool,
    /// A `struct net_device *` argument, where the function has one.
    pub dev: Option<usize>,
}

impl Hook {
    /// The stable tracepoint tier.
    pub const TRACEPOINTS: [Hook; HOOK_COUNT] = [
        Hook::NetifReceiveSkb,
        Hook::NetifRx,
        Hook::NapiGroReceiveEntry,
        Hook::NetDevQueue,
        Hook::NetDevStartXmit,
        Hook::NetDevXmit,
        Hook::QdiscDequeue,
        Hook::SkbCopyDatagramIovec,
        Hook::ConsumeSkb,
        Hook::KfreeSkb,
        Hook::NapiPoll,
    ];

    /// The function tier, in `Hook` value order.
    pub const FUNCTIONS: [Hook; FUNCTION_HOOK_COUNT] = [
        Hook::BrHandleFrame,
        Hook::BrForward,
        Hook::BrPassFrameUp,
        Hook::BrDevXmit,
        Hook::TunNetXmit,
        Hook::TunDoRead,
        Hook::XenvifStartXmit,
        Hook::VethXmit,
        Hook::VirtioStartXmit,
    ];

    pub fn from_u32(v: u32) -> Option<Hook> {
        if v >= FUNCTION_HOOK_BASE {
            Hook::FUNCTIONS
                .get((v - FUNCTION_HOOK_BASE) as usize)
                .copied()
        } else {
            Hook::TRACEPOINTS.get(v as usize).copied()
        }
    }

    pub fn is_function(self) -> bool {
        self as u32 >= FUNCTION_HOOK_BASE
    }

    /// The hook's name: the tracepoint's (as in `/sys/kernel/tracing/events/<group>/<name>`)
    /// or the kernel function's.
    pub fn name(self) -> &'static str {
        match self {
            Hook::BrHandleFrame => "br_handle_frame",
            Hook::BrForward => "br_forward",
            Hook::BrPassFrameUp => "br_pass_frame_up",
            Hook::BrDevXmit => "br_dev_xmit",
            Hook::TunNetXmit => "tun_net_xmit",
            Hook::TunDoRead => "tun_do_read",
            Hook::XenvifStartXmit => "xenvif_start_xmit",
            Hook::VethXmit => "veth_xmit",
            Hook::VirtioStartXmit => "start_xmit",
            Hook::NetifReceiveSkb => "netif_receive_skb",
            Hook::NetifRx => "netif_rx",
            Hook::NapiGroReceiveEntry => "napi_gro_receive_entry",
            Hook::NetDevQueue => "net_dev_queue",
            Hook::NetDevStartXmit => "net_dev_start_xmit",
            Hook::NetDevXmit => "net_dev_xmit",
            Hook::QdiscDequeue => "qdisc_dequeue",
            Hook::SkbCopyDatagramIovec => "skb_copy_datagram_iovec",
            Hook::ConsumeSkb => "consume_skb",
            Hook::KfreeSkb => "kfree_skb",
            Hook::NapiPoll => "napi_poll",
        }
    }

    /// Function hooks: the positions of the packet and the device among the arguments
    /// (checked against the running kernel's BTF by vtrace's tests and at attach time).
    pub const fn function_args(self) -> Option<FunctionArgs> {
        const fn at(skb: usize, dev: Option<usize>) -> Option<FunctionArgs> {
            Some(FunctionArgs {
                skb,
                skb_indirect: false,
                dev,
            })
        }
        match self {
            // rx_handler_result_t br_handle_frame(struct sk_buff **pskb)
            Hook::BrHandleFrame => Some(FunctionArgs {
                skb: 0,
                skb_indirect: true,
                dev: None,
            }),
            // void br_forward(const struct net_bridge_port *to, struct sk_buff *skb, bool, bool)
            Hook::BrForward => at(1, None),
            // int br_pass_frame_up(struct sk_buff *skb, bool promisc)
            Hook::BrPassFrameUp => at(0, None),
            // netdev_tx_t xxx(struct sk_buff *skb, struct net_device *dev): ndo_start_xmit
            Hook::BrDevXmit
            | Hook::TunNetXmit
            | Hook::XenvifStartXmit
            | Hook::VethXmit
            | Hook::VirtioStartXmit => at(0, Some(1)),
            // ssize_t tun_do_read(tun, tfile, struct iov_iter *to, int noblock, void *ptr)
            Hook::TunDoRead => at(4, None),
            _ => None,
        }
    }

    /// The group: the tracepoint's (`net`, `qdisc`, `skb`), or `fn` for functions.
    pub fn group(self) -> &'static str {
        if self.is_function() {
            return "fn";
        }
        match self {
            Hook::QdiscDequeue => "qdisc",
            Hook::SkbCopyDatagramIovec | Hook::ConsumeSkb | Hook::KfreeSkb => "skb",
            Hook::NapiPoll => "napi",
            _ => "net",
        }
    }
}

/// What the per-CPU `COUNTERS` array counts, per hook. Each hook's program counts into a row
/// of its own (`counter_slot`), so no two programs ever write the same slot: a plain add is
/// exact without atomics (the kernel never runs a program nested in itself on one CPU, and
/// a softirq program interrupting a process-context one writes another row).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Every packet at the hook.
    Packets = 0,
    /// Hop events that did not fit in the ring buffer.
    LostEvents = 1,
    /// Sampled packets whose skb could not be added to the tracking map.
    TrackInsertFailed = 2,
    /// Drops that could not be added to the drop map.
    DropInsertFailed = 3,
    /// Entry hops (see vtrace-ebpf's `Role::Entry`) of packets chosen by the 1-in-N sample.
    Sampled = 4,
    /// Packets whose headers could not be read (not IPv4/IPv6, header not in the linear area).
    Unparsed = 5,
    /// Hop events the programs tried to send (sent or lost): received + lost == emitted.
    Emitted = 6,
}

/// Counters per hook row.
pub const COUNTERS_PER_HOOK: u32 = 8;
/// Rows: one per `Hook` value (tracepoints from 0, functions from `FUNCTION_HOOK_BASE`).
pub const HOOK_ROWS: u32 = FUNCTION_HOOK_BASE + FUNCTION_HOOK_COUNT as u32;
/// Slots of `COUNTERS`.
pub const COUNTER_SLOTS: u32 = HOOK_ROWS * COUNTERS_PER_HOOK;
const _: () = assert!((Counter::Emitted as u32) < COUNTERS_PER_HOOK);

/// The slot of counter `c` in hook `hook`'s row.
#[inline(always)]
pub const fn counter_slot(hook: u32, c: Counter) -> u32 {
    hook * COUNTERS_PER_HOOK + c as u32
}

/// Byte offsets of the kernel struct fields the programs read, resolved in userspace from the
/// running kernel's BTF (`/sys/kernel/btf/vmlinux`) and set as a global before load: aya-ebpf
/// has no CO-RE relocations, and layouts differ between kernels and configs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub sk_buff_dev: u32,
    pub sk_buff_len: u32,
    pub sk_buff_head: u32,
    pub sk_buff_mac_header: u32,
    pub sk_buff_network_header: u32,
    pub sk_buff_protocol: u32,
    pub net_device_name: u32,
    pub net_device_ifindex: u32,
    /// `net_device.nd_net` (a `possible_net_t` whose first member is `struct net *net`).
    pub net_device_nd_net: u32,
    /// `net.ns.inum`: the network namespace's inode number, as `ip netns identify` and
    /// `/proc/<pid>/ns/net` show it.
    pub net_ns_inum: u32,
    /// `sk_buff.skb_iif`: the ifindex of the device the packet last arrived on.
    pub sk_buff_skb_iif: u32,
    /// `sk_buff.sk`: the owning socket, if any.
    pub sk_buff_sk: u32,
    /// `sock.__sk_common.skc_net`: the socket's network namespace (`struct net *`).
    pub sock_net: u32,
    /// `net_device.netdev_ops` (`const struct net_device_ops *`).
    pub net_device_netdev_ops: u32,
    /// `net_device_ops.ndo_start_xmit`: the driver's transmit function.
    pub net_device_ops_ndo_start_xmit: u32,
    /// `napi_struct.poll`: the driver's NAPI poll function.
    pub napi_struct_poll: u32,
    /// `napi_struct.dev`: the device the NAPI context serves.
    pub napi_struct_dev: u32,
    pub _pad: u32,
}

/// `Config::flags` bits.
pub mod flags {
    /// Track sampled packets and emit hop events (latency).
    pub const TRACK: u32 = 1 << 0;
    /// Count drops at `kfree_skb` (drops).
    pub const DROPS: u32 = 1 << 1;
    /// Only report hops on the devices named in `iface_names`.
    pub const FILTER_IFACE: u32 = 1 << 2;
    /// Only packets with IP protocol `proto`.
    pub const FILTER_PROTO: u32 = 1 << 3;
    /// Only packets from or to `host` (IPv4 as v4-mapped IPv6).
    pub const FILTER_HOST: u32 = 1 << 4;
    /// Only packets from or to `port` (TCP/UDP).
    pub const FILTER_PORT: u32 = 1 << 5;
    /// Leave out the loopback device (vtrace's own exporter traffic runs there).
    pub const SKIP_LOOPBACK: u32 = 1 << 6;
}

/// Load-time configuration: a read-only global the loader sets before load, so the verifier
/// sees constants and can drop disabled branches.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub offsets: KernelOffsets,
    pub flags: u32,
    /// Time 1 packet in `sample_every`, chosen by fingerprint hash (1 = every packet).
    pub sample_every: u32,
    pub iface_count: u32,
    pub proto: u32,
    pub port: u16,
    pub _pad: [u8; 2],
    pub host: [u8; 16],
    pub iface_names: [[u8; IFNAMSIZ]; MAX_IFACE_FILTERS],
}

impl Config {
    pub const fn zeroed() -> Config {
        Config {
            offsets: KernelOffsets {
                sk_buff_dev: 0,
                sk_buff_len: 0,
                sk_buff_head: 0,
                sk_buff_mac_header: 0,
                sk_buff_network_header: 0,
                sk_buff_protocol: 0,
                net_device_name: 0,
                net_device_ifindex: 0,
                net_device_nd_net: 0,
                net_ns_inum: 0,
                sk_buff_skb_iif: 0,
                sk_buff_sk: 0,
                sock_net: 0,
                net_device_netdev_ops: 0,
                net_device_ops_ndo_start_xmit: 0,
                napi_struct_poll: 0,
                napi_struct_dev: 0,
                _pad: 0,
            },
            flags: 0,
            sample_every: 1,
            iface_count: 0,
            proto: 0,
            port: 0,
            _pad: [0; 2],
            host: [0; 16],
            iface_names: [[0; IFNAMSIZ]; MAX_IFACE_FILTERS],
        }
    }
}

/// One packet seen at one hook: what the kernel sends to userspace for sampled packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HopEvent {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC.
    pub ts_ns: u64,
    /// The skb's address: the packet's identity within one skb's life.
    pub skb: u64,
    /// Content fingerprint from the headers: the identity across copies into new skbs.
    pub fingerprint: u64,
    /// `kfree_skb` only: the kernel text address that freed it.
    pub location: u64,
    pub hook: u32,
    pub cpu: u32,
    pub ifindex: u32,
    /// Network namespace inode number of the device (0 when the hook has no device).
    pub netns: u32,
    /// `kfree_skb` only: `enum skb_drop_reason`.
    pub reason: u32,
    /// `skb->len`.
    pub len: u32,
    pub ifname: [u8; IFNAMSIZ],
    /// `hop_flags` bits.
    pub flags: u32,
    pub _pad: u32,
}

/// `HopEvent::flags` bits.
pub mod hop_flags {
    /// The kernel started tracking this skb at this hop: a new skb (or a reused address with
    /// new content), so userspace starts a new segment here.
    pub const FIRST: u32 = 1 << 0;
}

/// `DropKey::flags` bits.
pub mod drop_flags {
    /// The skb had no device at the drop (`skb->dev` NULL, e.g. purged from a socket queue):
    /// `ifindex` is the device it last arrived on (`skb->skb_iif`), `origin` its socket's
    /// namespace inode; the name is left for userspace to resolve.
    pub const ARRIVAL_DEVICE: u32 = 1 << 0;
}

/// Key of the in-kernel drop aggregation: one row per device, reason and location. The device
/// is keyed by its address and ifindex, which the program reads with two loads; its name and
/// namespace, three more reads, are taken only when a row is created (`DropStats`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DropKey {
    pub location: u64,
    /// The `struct net_device` address; for an `ARRIVAL_DEVICE` row, the namespace inode.
    pub origin: u64,
    pub ifindex: u32,
    pub reason: u32,
    /// `drop_flags` bits.
    pub flags: u32,
    pub _pad: u32,
}

/// Value of the drop aggregation, per CPU: the count, and the device's name and namespace as
/// the CPU that created its copy of the row read them (zero on the other CPUs until they drop
/// there too).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropStats {
    pub count: u64,
    pub netns: u32,
    pub _pad: u32,
    pub ifname: [u8; IFNAMSIZ],
}

/// Which driver function a [`DriverKey`] row describes.
pub mod driver_kind {
    /// `dev->netdev_ops->ndo_start_xmit`, read at `net_dev_start_xmit` (sampled packets).
    pub const XMIT: u32 = 0;
    /// `napi->poll`, read at `napi:napi_poll` (every poll round).
    pub const NAPI_POLL: u32 = 1;
}

/// Key of the driver discovery map: which function serves a device, read from the device's
/// own function pointers at run time (so a NIC driver vtrace has never heard of is found too).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DriverKey {
    pub netns: u32,
    pub ifindex: u32,
    /// `driver_kind` value.
    pub kind: u32,
    pub _pad: u32,
}

/// Value of the driver discovery map (per CPU; userspace sums `calls`, `work`, `budget_full`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Kernel text address of the function (symbolized by userspace from kallsyms).
    pub func: u64,
    /// `XMIT`: sampled packets that showed it; `NAPI_POLL`: poll rounds.
    pub calls: u64,
    /// `NAPI_POLL`: packets the polls processed (`work`); 0 for `XMIT`.
    pub work: u64,
    /// `NAPI_POLL`: polls that used their whole budget (the device had more waiting).
    pub budget_full: u64,
    pub ifname: [u8; IFNAMSIZ],
}

const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 72);
const _: () = assert!(core::mem::size_of::<DriverKey>() == 16);
const _: () = assert!(core::mem::size_of::<DriverStats>() == 48);
const _: () = assert!(core::mem::size_of::<Config>() == 72 + 20 + 16 + 16 * MAX_IFACE_FILTERS);
const _: () = assert!(core::mem::size_of::<HopEvent>() == 80);
const _: () = assert!(core::mem::size_of::<DropKey>() == 32);
const _: () = assert!(core::mem::size_of::<DropStats>() == 32);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of them are #[repr(C)], made only of integers and integer arrays, and have no
    // padding (the sizes are asserted above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::HopEvent {}
    unsafe impl aya::Pod for super::DropKey {}
    unsafe impl aya::Pod for super::DropStats {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::DriverKey {}
    unsafe impl aya::Pod for super::DriverStats {}
    unsafe impl aya::Pod for super::work::WorkStats {}
    unsafe impl aya::Pod for super::work::WorkEntry {}
}

/// Bytes of `name` as a NUL-padded kernel device name (truncated to IFNAMSIZ-1).
pub fn ifname_bytes(name: &[u8]) -> [u8; IFNAMSIZ] {
    let mut out = [0u8; IFNAMSIZ];
    let n = if name.len() < IFNAMSIZ - 1 {
        name.len()
    } else {
        IFNAMSIZ - 1
    };
    let mut i = 0;
    while i < n {
        out[i] = name[i];
        i += 1;
    }
    out
}
