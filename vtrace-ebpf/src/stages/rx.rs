//! Receive: a device hands a packet to the stack. On a host these are the NIC's NAPI poll
//! (`napi_gro_receive_entry`), a veth or tap's peer (`netif_rx`, and tun_get_user delivering
//! directly with `netif_receive_skb`), and every device's entry into the stack.

use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use vtrace_common::Hook;

use crate::hop::{device_hop, Role};
use crate::kernel::{Typed, Untyped};

// TP_PROTO(struct sk_buff *skb) for all three (include/trace/events/net.h).

#[btf_tracepoint(function = "netif_receive_skb")]
pub fn vt_rx_netif_receive_skb(ctx: BtfTracePointContext) -> i32 {
    device_hop::<Typed>(Hook::NetifReceiveSkb, Role::Entry, ctx.arg(0), 0);
    0
}

#[raw_tracepoint(tracepoint = "netif_receive_skb")]
pub fn vt_rx_netif_receive_skb_raw(ctx: RawTracePointContext) -> i32 {
    device_hop::<Untyped>(Hook::NetifReceiveSkb, Role::Entry, ctx.arg(0), 0);
    0
}

#[btf_tracepoint(function = "netif_rx")]
pub fn vt_rx_netif_rx(ctx: BtfTracePointContext) -> i32 {
    device_hop::<Typed>(Hook::NetifRx, Role::Entry, ctx.arg(0), 0);
    0
}

#[raw_tracepoint(tracepoint = "netif_rx")]
pub fn vt_rx_netif_rx_raw(ctx: RawTracePointContext) -> i32 {
    device_hop::<Untyped>(Hook::NetifRx, Role::Entry, ctx.arg(0), 0);
    0
}

#[btf_tracepoint(function = "napi_gro_receive_entry")]
pub fn vt_rx_napi_gro_receive_entry(ctx: BtfTracePointContext) -> i32 {
    device_hop::<Typed>(Hook::NapiGroReceiveEntry, Role::Entry, ctx.arg(0), 0);
    0
}

#[raw_tracepoint(tracepoint = "napi_gro_receive_entry")]
pub fn vt_rx_napi_gro_receive_entry_raw(ctx: RawTracePointContext) -> i32 {
    device_hop::<Untyped>(Hook::NapiGroReceiveEntry, Role::Entry, ctx.arg(0), 0);
    0
}
