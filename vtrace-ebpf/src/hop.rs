//! The hop logic every stage shares: count every packet; for the sampled ones, record the hop.

use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns};
use vtrace_common::{
    driver_kind, drop_flags, flags, hop_flags,
    packet::{self, Filter},
    Counter, DropKey, DropStats, Hook, HopEvent, IFNAMSIZ,
};

use crate::{
    config::conf,
    drivers,
    kernel::{self, Access, Untyped},
    maps::{
        bump, XmitHandOver, DROPS, EVENTS, QUEUE_DECISION, TRACKED, XMIT_HANDOVER, XMIT_SLOTS_LEN,
    },
};

/// include/uapi/linux/bpf.h: submit without notifying the consumer.
const BPF_RB_NO_WAKEUP: u64 = 1;

/// Loopback has ifindex 1 in every network namespace (net/core/dev.c, `loopback_net_init`).
const LOOPBACK_IFINDEX: u32 = 1;

/// Where a device hook sits in an skb's life, which decides how a packet is recognised there.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Where an skb enters a device's path (receive: `netif_receive_skb`, `netif_rx`,
    /// `napi_gro_receive_entry`; transmit: `net_dev_queue`). A new skb, or a copy, is first
    /// seen at one of these: the packet is parsed, fingerprinted and the sample decided here.
    Entry,
    /// Later on the same skb (`net_dev_start_xmit`, `qdisc_dequeue`): every skb here passed an
    /// entry hook, so one lookup of its address tells whether it is sampled; only sampled
    /// packets are parsed (to check the entry is not left over from an earlier packet).
    Transit,
}

/// A hop at a device, where the skb is alive and its headers readable. `dev` is the
/// tracepoint's own device argument where it has one, else 0 to take `skb->dev`.
///
/// The tracking map is written only for sampled packets: at `--sample 16` the other 15 in 16
/// cost a parse and a hash at entry hooks and one lookup at transit hooks.
#[inline(always)]
pub fn device_hop<A: Access>(hook: Hook, role: Role, skb: u64, dev: u64) {
    bump(hook, Counter::Packets);
    if conf!(flags) & flags::TRACK == 0 {
        return;
    }
    let (fingerprint, first, (dev, ifindex)) = match role {
        Role::Transit => {
            if hook == Hook::NetDevStartXmit && queued_unsampled(skb, false) {
                return;
            }
            // Untyped from here: once the skb pointer has been a map key, older verifiers
            // (6.1) take the reloaded copy for a plain number ("invalid mem access
            // 'scalar'") and refuse the typed loads. Only tracked packets read on, 1 in N.
            let Some(fp) = tracked::<Untyped>(skb) else {
                return;
            };
            let Some(d) = device::<Untyped>(skb, dev) else {
                return;
            };
            (fp, false, d)
        }
        // The cheap checks (loopback, --iface) come before the parse.
        Role::Entry => {
            let Some(d) = device::<A>(skb, dev) else {
                return;
            };
            let fp = sampled_packet::<A>(hook, skb);
            if hook == Hook::NetDevQueue {
                note_queue_decision(skb, fp);
            }
            if fp == 0 {
                return;
            }
            // Is this skb already tracked with this content? A missing entry, or one with
            // other content (the address was reused after a free that has no tracepoint),
            // starts a new life here.
            // SAFETY: the value is a plain u64 copied out at once.
            let known = matches!(unsafe { TRACKED.get(&skb) }, Some(old) if *old == fp);
            (fp, !known, d)
        }
    };
    // Only sampled packets get here: the device's name and namespace are read for them alone.
    let info = kernel::dev_info(dev, ifindex);
    if first && TRACKED.insert(&skb, &fingerprint, 0).is_err() {
        bump(hook, Counter::TrackInsertFailed);
    }
    if hook == Hook::NetDevStartXmit {
        hand_over(skb, fingerprint);
        // Driver discovery rides on the sampled packets: a few reads, 1 packet in N.
        drivers::note(
            driver_kind::XMIT,
            &info,
            drivers::ndo_start_xmit(dev),
            0,
            false,
        );
    }
    let flags = if first { hop_flags::FIRST } else { 0 };
    emit(
        Hop {
            hook,
            skb,
            fingerprint,
            reason: 0,
            location: 0,
            flags,
            len: kernel::skb_len(skb),
        },
        &info,
    );
}

/// Leaves `net_dev_queue`'s decision for `skb` (0: not sampled) on this CPU.
#[inline(always)]
fn note_queue_decision(skb: u64, fingerprint: u64) {
    if let Some(slot) = QUEUE_DECISION.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; tracepoint programs are not preempted by each other here.
        unsafe { *slot = XmitHandOver { skb, fingerprint } };
    }
}

/// Whether `net_dev_queue` on this CPU decided just now that `skb` is not sampled. Only "not
/// sampled" is trusted: a sampled packet is still checked against the tracking map. The slot
/// stays for the driver's free of the same skb (a full tap ring drops inside
/// `ndo_start_xmit`), which clears it (`end`). An address reused by a packet that reached the
/// driver without `net_dev_queue` here (a packet socket's qdisc bypass) costs at worst one
/// missed hop, never a wrong one.
#[inline(always)]
fn queued_unsampled(skb: u64, end: bool) -> bool {
    let Some(slot) = QUEUE_DECISION.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: as in `note_queue_decision`.
    unsafe {
        if (*slot).skb != skb || (*slot).fingerprint != 0 {
            return false;
        }
        if end {
            (*slot).skb = 0;
        }
        true
    }
}

/// The hop's device (the tracepoint's own device argument where it has one, else `skb->dev`)
/// and its ifindex, or None when the loopback or `--iface` filter leaves it out. The name is
/// read here only when `--iface` needs it.
#[inline(always)]
fn device<A: Access>(skb: u64, dev: u64) -> Option<(u64, u32)> {
    let dev = if dev == 0 {
        kernel::skb_dev_as::<A>(skb)
    } else {
        dev
    };
    let ifindex = kernel::dev_ifindex_as::<A>(dev);
    if conf!(flags) & flags::SKIP_LOOPBACK != 0 && ifindex == LOOPBACK_IFINDEX {
        return None;
    }
    if conf!(flags) & flags::FILTER_IFACE != 0 && !iface_listed(&kernel::dev_name(dev)) {
        return None;
    }
    Some((dev, ifindex))
}

/// `net_dev_xmit`: the driver's ndo_start_xmit returned. The skb may already be freed or
/// reused (a tap reader or a veth peer may have consumed it on another CPU), so nothing is read
/// from it: the packet is recognised from the hand-over `net_dev_start_xmit` left on this CPU,
/// the device and length come from the tracepoint's own arguments.
#[inline(always)]
pub fn xmit_done_hop<A: Access>(hook: Hook, skb: u64, dev: u64, len: u32) {
    bump(hook, Counter::Packets);
    if conf!(flags) & flags::TRACK == 0 {
        return;
    }
    let Some(fingerprint) = take_hand_over(skb) else {
        return;
    };
    let Some((dev, ifindex)) = device::<A>(skb, dev) else {
        return;
    };
    let info = kernel::dev_info(dev, ifindex);
    emit(
        Hop {
            hook,
            skb,
            fingerprint,
            reason: 0,
            location: 0,
            flags: 0,
            len,
        },
        &info,
    );
}

/// Leaves the fingerprint of `skb` for `net_dev_xmit` on this CPU, in a free slot (or the
/// first, if a nesting deeper than the table left none free). The slots are searched rather
/// than indexed by address bits: a BTF-typed skb pointer allows no arithmetic.
#[inline(always)]
fn hand_over(skb: u64, fingerprint: u64) {
    let mut target = 0;
    let mut i = 0;
    while i < XMIT_SLOTS_LEN {
        if let Some(slot) = XMIT_HANDOVER.get_ptr(i) {
            // SAFETY: this CPU's slot, read only.
            if unsafe { (*slot).skb } == 0 {
                target = i;
                break;
            }
        }
        i += 1;
    }
    if let Some(slot) = XMIT_HANDOVER.get_ptr_mut(target) {
        // SAFETY: this CPU's slot; tracepoint programs are not preempted by each other here.
        unsafe { *slot = XmitHandOver { skb, fingerprint } };
    }
}

#[inline(always)]
fn take_hand_over(skb: u64) -> Option<u64> {
    let mut i = 0;
    while i < XMIT_SLOTS_LEN {
        if let Some(slot) = XMIT_HANDOVER.get_ptr_mut(i) {
            // SAFETY: as in `hand_over`.
            unsafe {
                if (*slot).skb == skb {
                    (*slot).skb = 0;
                    return Some((*slot).fingerprint);
                }
            }
        }
        i += 1;
    }
    None
}

/// Parses the packet; returns its fingerprint when it passes the filter and the sample, else
/// 0 (never a fingerprint). A BPF subprogram of its own, not inlined: the parse buffers live in
/// its stack frame, which keeps every program's frame within the 512-byte limit.
#[inline(never)]
fn sampled_packet<A: Access>(hook: Hook, skb: u64) -> u64 {
    let Some(h) = kernel::headers::<A>(skb) else {
        bump(hook, Counter::Unparsed);
        return 0;
    };
    let fl = conf!(flags);
    if fl & (flags::FILTER_PROTO | flags::FILTER_HOST | flags::FILTER_PORT) != 0 {
        let (sport, dport) = packet::ports(&h.l3, &h.l4);
        let filter = Filter {
            proto: conf!(proto) as u8,
            host: packet::words(&conf!(host)),
            host_set: fl & flags::FILTER_HOST != 0,
            port: conf!(port),
        };
        if !filter.matches(&h.l3, sport, dport) {
            return 0;
        }
    }
    let fp = packet::fingerprint(&h.l3, &h.l4);
    if !packet::sampled(fp, conf!(sample_every)) {
        return 0;
    }
    bump(hook, Counter::Sampled);
    fp
}

/// The tracked fingerprint of `skb`, checked against its current content: an entry left by a
/// free we could not see belongs to an earlier packet at the same address, and is dropped.
#[inline(always)]
fn tracked<A: Access>(skb: u64) -> Option<u64> {
    // SAFETY: the value is a plain u64 copied out at once.
    let fp = unsafe { TRACKED.get(&skb) }.copied()?;
    let now = kernel::headers::<A>(skb).map(|h| packet::fingerprint(&h.l3, &h.l4));
    if now != Some(fp) {
        let _ = TRACKED.remove(&skb);
        return None;
    }
    Some(fp)
}

/// A reader copying the data out (a VMM or vhost reading a tap, a socket): recorded for
/// tracked packets only, and the end of the packet's tracking. After the copy the data path
/// is over, and many readers free the skb without a tracepoint (UDP's
/// `__consume_stateless_skb`, TCP's `__kfree_skb`): forgetting the address here keeps the
/// tracking map free of entries whose free we would never see.
#[inline(always)]
pub fn reader_hop(hook: Hook, skb: u64) {
    bump(hook, Counter::Packets);
    if conf!(flags) & flags::TRACK == 0 {
        return;
    }
    // Untyped, as at transit hooks: a map lookup keyed by the pointer comes first.
    if let Some(fp) = tracked::<Untyped>(skb) {
        let _ = TRACKED.remove(&skb);
        let hop = Hop {
            hook,
            skb,
            fingerprint: fp,
            reason: 0,
            location: 0,
            flags: 0,
            len: kernel::skb_len(skb),
        };
        emit(hop, &kernel::dev_info(0, 0));
    }
}

/// The end of an skb's life. `reason` is the kernel's `enum skb_drop_reason` for `kfree_skb`,
/// `None` for `consume_skb` (a normal free, not a drop). Both tracepoints fire before the data
/// is released, so the content can still be checked.
#[inline(always)]
pub fn free_hop(hook: Hook, skb: u64, location: u64, reason: Option<u32>) {
    bump(hook, Counter::Packets);
    let fl = conf!(flags);
    if let Some(reason) = reason {
        if fl & flags::DROPS != 0 {
            let dev = kernel::skb_dev(skb);
            if kernel::is_device(dev) {
                count_device_drop(dev, reason, location);
            } else {
                count_arrival_drop(&kernel::arrival_info(skb), reason, location);
            }
        }
    }
    if fl & flags::TRACK == 0 || queued_unsampled(skb, true) {
        return;
    }
    if let Some(fp) = tracked::<Untyped>(skb) {
        // Forget the address now: the next skb allocated here is another packet.
        let _ = TRACKED.remove(&skb);
        // A drop names the device it happened at (skb->dev), whatever else is enabled; a
        // normal free has no device of its own.
        let info = match reason {
            Some(_) => {
                let dev = kernel::skb_dev(skb);
                if kernel::is_device(dev) {
                    kernel::dev_info(dev, kernel::dev_ifindex(dev))
                } else {
                    kernel::dev_info(0, 0)
                }
            }
            None => kernel::dev_info(0, 0),
        };
        if info.ifindex != 0 && fl & flags::FILTER_IFACE != 0 && !iface_listed(&info.name) {
            return;
        }
        let hop = Hop {
            hook,
            skb,
            fingerprint: fp,
            reason: reason.unwrap_or(0),
            location,
            flags: 0,
            len: kernel::skb_len(skb),
        };
        emit(hop, &info);
    }
}

/// Counts a drop at device `dev`: two reads and a lookup; the name and namespace are read only
/// when this CPU creates the row.
#[inline(always)]
fn count_device_drop(dev: u64, reason: u32, location: u64) {
    let ifindex = kernel::dev_ifindex(dev);
    let key = DropKey {
        location,
        origin: dev,
        ifindex,
        reason,
        flags: 0,
        _pad: 0,
    };
    // SAFETY: this CPU's value; only the kfree_skb program writes this map, and it does not
    // nest in itself.
    if let Some(stats) = DROPS.get_ptr_mut(&key) {
        unsafe { (*stats).count += 1 };
        return;
    }
    let info = kernel::dev_info(dev, ifindex);
    insert_drop(&key, info.netns, info.name);
}

/// Counts a drop of an skb without a device, at the device it last arrived on.
#[inline(always)]
fn count_arrival_drop(info: &kernel::DevInfo, reason: u32, location: u64) {
    let key = DropKey {
        location,
        origin: info.netns as u64,
        ifindex: info.ifindex,
        reason,
        flags: drop_flags::ARRIVAL_DEVICE,
        _pad: 0,
    };
    // SAFETY: as in `count_device_drop`.
    if let Some(stats) = DROPS.get_ptr_mut(&key) {
        unsafe { (*stats).count += 1 };
        return;
    }
    insert_drop(&key, info.netns, info.name);
}

#[inline(always)]
fn insert_drop(key: &DropKey, netns: u32, ifname: [u8; IFNAMSIZ]) {
    let stats = DropStats {
        count: 1,
        netns,
        _pad: 0,
        ifname,
    };
    if DROPS.insert(key, &stats, 0).is_err() {
        bump(Hook::KfreeSkb, Counter::DropInsertFailed);
    }
}

/// One hop to send: what the event carries beside the device.
struct Hop {
    hook: Hook,
    skb: u64,
    fingerprint: u64,
    reason: u32,
    location: u64,
    flags: u32,
    len: u32,
}

#[inline(always)]
fn emit(hop: Hop, info: &kernel::DevInfo) {
    bump(hop.hook, Counter::Emitted);
    // The time is taken before the reservation, which may wait on the ring's lock.
    // SAFETY: helpers without preconditions.
    let (ts_ns, cpu) = unsafe { (bpf_ktime_get_ns(), bpf_get_smp_processor_id()) };
    let Some(mut entry) = EVENTS.reserve::<HopEvent>(0) else {
        bump(hop.hook, Counter::LostEvents);
        return;
    };
    entry.write(HopEvent {
        ts_ns,
        skb: hop.skb,
        fingerprint: hop.fingerprint,
        location: hop.location,
        hook: hop.hook as u32,
        cpu,
        ifindex: info.ifindex,
        netns: info.netns,
        reason: hop.reason,
        len: hop.len,
        ifname: info.name,
        flags: hop.flags,
        _pad: 0,
    });
    // No wakeup: userspace drains the ring on a timer (vtrace/src/session.rs), so the kernel
    // does not pay an irq_work per event.
    entry.submit(BPF_RB_NO_WAKEUP);
}

#[inline(always)]
fn iface_listed(name: &[u8; IFNAMSIZ]) -> bool {
    let count = conf!(iface_count) as usize;
    let mut i = 0;
    while i < vtrace_common::MAX_IFACE_FILTERS {
        if i < count && conf!(iface_names[i]) == *name {
            return true;
        }
        i += 1;
    }
    false
}
