//! A reader copies the packet out of the kernel: the VMM reading a tap (tun_do_read), vhost-net,
//! or any socket. On the virtual path this is where the frame leaves the host kernel for the VMM.

use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use vtrace_common::Hook;

use crate::hop::reader_hop;

// TP_PROTO(const struct sk_buff *skb, int len); no device: only tracked packets are recorded.
#[btf_tracepoint(function = "skb_copy_datagram_iovec")]
pub fn vt_sock_skb_copy_datagram_iovec(ctx: BtfTracePointContext) -> i32 {
    reader_hop(Hook::SkbCopyDatagramIovec, ctx.arg(0));
    0
}

#[raw_tracepoint(tracepoint = "skb_copy_datagram_iovec")]
pub fn vt_sock_skb_copy_datagram_iovec_raw(ctx: RawTracePointContext) -> i32 {
    reader_hop(Hook::SkbCopyDatagramIovec, ctx.arg(0));
    0
}
