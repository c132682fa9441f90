//! NAPI poll rounds (`napi:napi_poll`): not a packet hop but the driver's receive batches. Each
//! round is counted per device with the packets it processed and whether it used its whole
//! budget, and the poll function (`napi->poll`) is noted for driver discovery.

use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use vtrace_common::{driver_kind, Counter, Hook};

use crate::{config::conf, drivers, kernel, maps::bump};

// TP_PROTO(struct napi_struct *napi, int work, int budget): fires after `napi->poll` returned
// (net/core/dev.c, `__napi_poll`).
#[inline(always)]
fn poll_round(napi: u64, work: u64, budget: u64) {
    bump(Hook::NapiPoll, Counter::Packets);
    let dev = kernel::read_u64(napi, conf!(offsets.napi_struct_dev));
    let poll = kernel::read_u64(napi, conf!(offsets.napi_struct_poll));
    if dev == 0 {
        return;
    }
    let info = kernel::dev_info(dev, kernel::dev_ifindex(dev));
    let (work, budget) = (work as u32 as i32, budget as u32 as i32);
    drivers::note(
        driver_kind::NAPI_POLL,
        &info,
        poll,
        work.max(0) as u64,
        budget > 0 && work >= budget,
    );
}

#[btf_tracepoint(function = "napi_poll")]
pub fn vt_nic_napi_poll(ctx: BtfTracePointContext) -> i32 {
    poll_round(ctx.arg(0), ctx.arg(1), ctx.arg(2));
    0
}

#[raw_tracepoint(tracepoint = "napi_poll")]
pub fn vt_nic_napi_poll_raw(ctx: RawTracePointContext) -> i32 {
    poll_round(ctx.arg(0), ctx.arg(1), ctx.arg(2));
    0
}
