//! The hop logic every stage shares: count every packet; for the sampled ones, record the hop.

use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns};
use vtrace_common::{
    flags,
    packet::{self, Filter},
    Counter, DropKey, Hook, HopEvent, IFNAMSIZ,
};

use crate::{
    config::conf,
    kernel,
    maps::{bump, DROPS, EVENTS, TRACKED},
};

/// Loopback has ifindex 1 in every network namespace (net/core/dev.c, `loopback_net_init`).
const LOOPBACK_IFINDEX: u32 = 1;

/// What kind of hook this is, for the identity rules.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A device hook where the skb is alive and its headers readable: a sampled packet may
    /// start being tracked here.
    Device,
    /// A device hook after the driver took the skb (`net_dev_xmit`): the skb may already be
    /// freed or reused by then, so only packets tracked before are recorded.
    DeviceAfter,
}

/// A hop at a device: `dev` is the tracepoint's own device argument where it has one (on a veth,
/// `skb->dev` already points at the peer at `net_dev_xmit`), else 0 to take `skb->dev`.
#[inline(always)]
pub fn device_hop(hook: Hook, kind: Kind, skb: u64, dev: u64) {
    bump(hook as u32);
    if conf!(flags) & flags::TRACK == 0 {
        return;
    }
    let dev = if dev == 0 { kernel::skb_dev(skb) } else { dev };
    let ifindex = kernel::dev_ifindex(dev);
    if conf!(flags) & flags::SKIP_LOOPBACK != 0 && ifindex == LOOPBACK_IFINDEX {
        return;
    }
    // SAFETY: the value is a plain u64 copied out at once.
    let (fingerprint, new) = match unsafe { TRACKED.get(&skb) } {
        Some(fp) => (*fp, false),
        None => {
            if kind == Kind::DeviceAfter {
                return;
            }
            match new_packet(skb) {
                Some(fp) => (fp, true),
                None => return,
            }
        }
    };
    let info = kernel::dev_info(dev, ifindex);
    if conf!(flags) & flags::FILTER_IFACE != 0 && !iface_listed(&info.name) {
        return;
    }
    // First sampled hop of this skb: remember it until it is freed.
    if new && TRACKED.insert(&skb, &fingerprint, 0).is_err() {
        bump(Counter::TrackInsertFailed as u32);
    }
    emit(hook, skb, fingerprint, &info, 0, 0);
}

/// Parses a packet not tracked yet; returns its fingerprint when it passes the filter and the
/// sample.
#[inline(always)]
fn new_packet(skb: u64) -> Option<u64> {
    let Some(h) = kernel::headers(skb) else {
        bump(Counter::Unparsed as u32);
        return None;
    };
    let fl = conf!(flags);
    if fl & (flags::FILTER_PROTO | flags::FILTER_HOST | flags::FILTER_PORT) != 0 {
        let (sport, dport) = packet::ports(&h.l3, &h.l4);
        let filter = Filter {
            proto: conf!(proto) as u8,
            host: conf!(host),
            host_set: fl & flags::FILTER_HOST != 0,
            port: conf!(port),
        };
        if !filter.matches(&h.l3, sport, dport) {
            return None;
        }
    }
    let fp = packet::fingerprint(&h.l3, &h.l4);
    if !packet::sampled(fp, conf!(sample_every)) {
        return None;
    }
    bump(Counter::Sampled as u32);
    Some(fp)
}

/// A hop without a device (a reader copying data out): recorded for tracked packets only.
#[inline(always)]
pub fn reader_hop(hook: Hook, skb: u64) {
    bump(hook as u32);
    if conf!(flags) & flags::TRACK == 0 {
        return;
    }
    // SAFETY: the value is a plain u64 copied out at once.
    if let Some(fp) = unsafe { TRACKED.get(&skb) } {
        let fp = *fp;
        emit(hook, skb, fp, &kernel::dev_info(0, 0), 0, 0);
    }
}

/// The end of an skb's life. `reason` is the kernel's `enum skb_drop_reason` for `kfree_skb`,
/// `None` for `consume_skb` (a normal free, not a drop).
#[inline(always)]
pub fn free_hop(hook: Hook, skb: u64, location: u64, reason: Option<u32>) {
    bump(hook as u32);
    let fl = conf!(flags);
    let mut dev_info = None;
    if let Some(reason) = reason {
        if fl & flags::DROPS != 0 {
            let dev = kernel::skb_dev(skb);
            let info = kernel::dev_info(dev, kernel::dev_ifindex(dev));
            count_drop(&info, reason, location);
            dev_info = Some(info);
        }
    }
    if fl & flags::TRACK == 0 {
        return;
    }
    // SAFETY: the value is a plain u64 copied out at once.
    if let Some(fp) = unsafe { TRACKED.get(&skb) } {
        let fp = *fp;
        // Forget the address now: the next skb allocated here is another packet.
        let _ = TRACKED.remove(&skb);
        let info = match dev_info {
            Some(info) => info,
            None => kernel::dev_info(0, 0),
        };
        emit(hook, skb, fp, &info, reason.unwrap_or(0), location);
    }
}

#[inline(always)]
fn count_drop(info: &kernel::DevInfo, reason: u32, location: u64) {
    let key = DropKey {
        location,
        ifindex: info.ifindex,
        netns: info.netns,
        reason,
        _pad: 0,
        ifname: info.name,
    };
    match DROPS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value of this CPU.
        Some(count) => unsafe { *count += 1 },
        None => {
            if DROPS.insert(&key, &1, 0).is_err() {
                bump(Counter::DropInsertFailed as u32);
            }
        }
    }
}

#[inline(always)]
fn emit(hook: Hook, skb: u64, fingerprint: u64, info: &kernel::DevInfo, reason: u32, loc: u64) {
    let Some(mut entry) = EVENTS.reserve::<HopEvent>(0) else {
        bump(Counter::LostEvents as u32);
        return;
    };
    // SAFETY: helpers without preconditions.
    let (ts_ns, cpu) = unsafe { (bpf_ktime_get_ns(), bpf_get_smp_processor_id()) };
    entry.write(HopEvent {
        ts_ns,
        skb,
        fingerprint,
        location: loc,
        hook: hook as u32,
        cpu,
        ifindex: info.ifindex,
        netns: info.netns,
        reason,
        len: kernel::skb_len(skb),
        ifname: info.name,
    });
    entry.submit(0);
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
