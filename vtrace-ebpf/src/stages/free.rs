//! The end of an skb: `consume_skb` (normal free) and `kfree_skb` (a drop, with the kernel's
//! `enum skb_drop_reason` since 5.17 and the caller's address as location).

use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use vtrace_common::Hook;

use crate::hop::free_hop;

// TP_PROTO(struct sk_buff *skb), and since 6.3 (struct sk_buff *skb, void *location). Only the
// skb is read: the verifier refuses an argument the kernel's tracepoint does not have, and a
// normal free's location is not reported, so one program loads on 6.1 (Debian 12) and later.
#[btf_tracepoint(function = "consume_skb")]
pub fn vt_free_consume_skb(ctx: BtfTracePointContext) -> i32 {
    free_hop(Hook::ConsumeSkb, ctx.arg(0), 0, None);
    0
}

#[raw_tracepoint(tracepoint = "consume_skb")]
pub fn vt_free_consume_skb_raw(ctx: RawTracePointContext) -> i32 {
    free_hop(Hook::ConsumeSkb, ctx.arg(0), 0, None);
    0
}

// TP_PROTO(struct sk_buff *skb, void *location, enum skb_drop_reason reason, struct sock *rx_sk)
#[btf_tracepoint(function = "kfree_skb")]
pub fn vt_free_kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let reason: u64 = ctx.arg(2);
    free_hop(Hook::KfreeSkb, ctx.arg(0), ctx.arg(1), Some(reason as u32));
    0
}

#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn vt_free_kfree_skb_raw(ctx: RawTracePointContext) -> i32 {
    let reason: u64 = ctx.arg(2);
    free_hop(Hook::KfreeSkb, ctx.arg(0), ctx.arg(1), Some(reason as u32));
    0
}
