//! Transmit: the stack queues a packet to a device, the qdisc releases it, the driver's
//! `ndo_start_xmit` takes it. On a tap or a Xen vif, `net_dev_start_xmit` is the hand-off to
//! tun's ring or to netback.

use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use vtrace_common::Hook;

use crate::hop::{device_hop, xmit_done_hop, Role};
use crate::kernel::{Typed, Untyped};

// TP_PROTO(struct sk_buff *skb)
#[btf_tracepoint(function = "net_dev_queue")]
pub fn vt_tx_net_dev_queue(ctx: BtfTracePointContext) -> i32 {
    device_hop::<Typed>(Hook::NetDevQueue, Role::Entry, ctx.arg(0), 0);
    0
}

#[raw_tracepoint(tracepoint = "net_dev_queue")]
pub fn vt_tx_net_dev_queue_raw(ctx: RawTracePointContext) -> i32 {
    device_hop::<Untyped>(Hook::NetDevQueue, Role::Entry, ctx.arg(0), 0);
    0
}

// TP_PROTO(const struct sk_buff *skb, const struct net_device *dev)
#[btf_tracepoint(function = "net_dev_start_xmit")]
pub fn vt_tx_net_dev_start_xmit(ctx: BtfTracePointContext) -> i32 {
    device_hop::<Typed>(Hook::NetDevStartXmit, Role::Transit, ctx.arg(0), ctx.arg(1));
    0
}

#[raw_tracepoint(tracepoint = "net_dev_start_xmit")]
pub fn vt_tx_net_dev_start_xmit_raw(ctx: RawTracePointContext) -> i32 {
    device_hop::<Untyped>(Hook::NetDevStartXmit, Role::Transit, ctx.arg(0), ctx.arg(1));
    0
}

// TP_PROTO(struct sk_buff *skb, int rc, struct net_device *dev, unsigned int skb_len).
// Fires after ndo_start_xmit returned: the skb may be gone (a tap reader or veth peer may have
// freed it on another CPU), so it is not read; the device comes from the argument: on a veth
// skb->dev already points at the peer.
#[btf_tracepoint(function = "net_dev_xmit")]
pub fn vt_tx_net_dev_xmit(ctx: BtfTracePointContext) -> i32 {
    xmit_done_hop::<Typed>(
        Hook::NetDevXmit,
        ctx.arg(0),
        ctx.arg(2),
        ctx.arg::<u64>(3) as u32,
    );
    0
}

#[raw_tracepoint(tracepoint = "net_dev_xmit")]
pub fn vt_tx_net_dev_xmit_raw(ctx: RawTracePointContext) -> i32 {
    xmit_done_hop::<Untyped>(
        Hook::NetDevXmit,
        ctx.arg(0),
        ctx.arg(2),
        ctx.arg::<u64>(3) as u32,
    );
    0
}

// TP_PROTO(struct Qdisc *qdisc, const struct netdev_queue *txq, int packets, struct sk_buff *skb)
// skb is NULL when the qdisc had nothing to give.
#[btf_tracepoint(function = "qdisc_dequeue")]
pub fn vt_tx_qdisc_dequeue(ctx: BtfTracePointContext) -> i32 {
    let skb: u64 = ctx.arg(3);
    if skb != 0 {
        device_hop::<Typed>(Hook::QdiscDequeue, Role::Transit, skb, 0);
    }
    0
}

#[raw_tracepoint(tracepoint = "qdisc_dequeue")]
pub fn vt_tx_qdisc_dequeue_raw(ctx: RawTracePointContext) -> i32 {
    let skb: u64 = ctx.arg(3);
    if skb != 0 {
        device_hop::<Untyped>(Hook::QdiscDequeue, Role::Transit, skb, 0);
    }
    0
}
