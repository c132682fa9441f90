//! Driver discovery: which function serves each device, read from the device itself.
//!
//! The function tier wants the NIC driver's `ndo_start_xmit` and NAPI poll, but their names
//! differ per driver (`start_xmit`/`virtnet_poll` for virtio-net, `ixgbe_xmit_frame`/
//! `ixgbe_poll`, ...). Instead of a table of drivers, the programs read the function pointers the
//! kernel itself calls: `dev->netdev_ops->ndo_start_xmit` at `net_dev_start_xmit`, and
//! `napi->poll` at `napi:napi_poll`. Userspace symbolizes the addresses with /proc/kallsyms.

use vtrace_common::{DriverKey, DriverStats};

use crate::{
    config::conf,
    kernel::{self, DevInfo},
    maps::DRIVERS,
};

/// Adds one call of `kind` on the device `info` describes to the discovery map, with the
/// function it runs. Each `kind` is written by one program only, so no two programs share a row
/// on a CPU.
#[inline(always)]
pub fn note(kind: u32, info: &DevInfo, func: u64, work: u64, budget_full: bool) {
    if info.ifindex == 0 || func == 0 {
        return;
    }
    let key = DriverKey {
        netns: info.netns,
        ifindex: info.ifindex,
        kind,
        _pad: 0,
    };
    match DRIVERS.get_ptr_mut(&key) {
        // SAFETY: this CPU's value of a row only this kind's program writes.
        Some(s) => unsafe {
            (*s).func = func;
            (*s).calls += 1;
            (*s).work += work;
            (*s).budget_full += budget_full as u64;
        },
        None => {
            let s = DriverStats {
                func,
                calls: 1,
                work,
                budget_full: budget_full as u64,
                ifname: info.name,
            };
            // A full map loses the row, not the packet: discovery is best effort.
            let _ = DRIVERS.insert(&key, &s, 0);
        }
    }
}

/// `dev->netdev_ops->ndo_start_xmit`.
#[inline(always)]
pub fn ndo_start_xmit(dev: u64) -> u64 {
    let ops = kernel::read_u64(dev, conf!(offsets.net_device_netdev_ops));
    if ops == 0 {
        return 0;
    }
    kernel::read_u64(ops, conf!(offsets.net_device_ops_ndo_start_xmit))
}
