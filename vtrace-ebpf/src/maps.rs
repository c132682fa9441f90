//! Maps shared by every stage. Per-CPU where a value is written on every packet, so the hot
//! path never contends on a cache line.

use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use vtrace_common::{
    counter_slot, Counter, DriverKey, DriverStats, DropKey, DropStats, Hook, COUNTER_SLOTS,
};

/// Per-hook rows of `Counter`s: every packet, lost events, failed inserts, ...
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Sampled packets in flight: skb address -> fingerprint. An entry lives from the packet's first
/// sampled hop until `consume_skb`/`kfree_skb`, because the kernel reuses skb memory at once.
/// LRU, so a packet whose free we never saw cannot fill it up. Per-CPU LRU lists
/// (BPF_F_NO_COMMON_LRU): inserts and evictions take no lock shared by every CPU. The kernel
/// splits max_entries between the possible CPUs, so the loader sizes it to
/// `TRACKED_PER_CPU` times their number.
#[map]
pub static TRACKED: LruHashMap<u64, u64> =
    LruHashMap::with_max_entries(vtrace_common::TRACKED_PER_CPU, BPF_F_NO_COMMON_LRU);

/// include/uapi/linux/bpf.h
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

/// What `net_dev_start_xmit` leaves for `net_dev_xmit` of the same skb on the same CPU.
#[repr(C)]
pub struct XmitHandOver {
    pub skb: u64,
    pub fingerprint: u64,
}

/// A few slots per CPU: a transmit can nest (a bridge device's xmit transmits on its ports)
/// before the outer `net_dev_xmit` fires.
pub const XMIT_SLOTS_LEN: u32 = 8;

#[map]
pub static XMIT_HANDOVER: PerCpuArray<XmitHandOver> =
    PerCpuArray::with_max_entries(XMIT_SLOTS_LEN, 0);

/// The sample decision `net_dev_queue` took for the skb it saw last on this CPU (fingerprint 0:
/// not sampled), for the `net_dev_start_xmit` that follows it: at once, on the same CPU, on a
/// device without a queue (veth, tap, bridge), and usually on one with a queue too; and for a
/// free of the same skb in the driver. A match spares the unsampled packets the tracking-map
/// lookup; a miss just does the lookup.
#[map]
pub static QUEUE_DECISION: PerCpuArray<XmitHandOver> = PerCpuArray::with_max_entries(1, 0);

/// Hop events of sampled packets, for userspace to join and time. The loader sizes it.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Drops counted in the kernel, by device, reason and location: no event per drop.
#[map]
pub static DROPS: PerCpuHashMap<DropKey, DropStats> = PerCpuHashMap::with_max_entries(4096, 0);

/// Counts one `c` in `hook`'s row (see `vtrace_common::Counter`).
#[inline(always)]
pub fn bump(hook: Hook, c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(counter_slot(hook as u32, c)) {
        // SAFETY: this CPU's slot in this program's own row: nothing else writes it meanwhile.
        unsafe { *p += 1 };
    }
}

/// Driver discovery (see `drivers.rs`): per device and kind, the function and its call counts.
#[map]
pub static DRIVERS: PerCpuHashMap<DriverKey, DriverStats> =
    PerCpuHashMap::with_max_entries(1024, 0);
