//! Reading kernel structs at offsets resolved from the running kernel's BTF.
//!
//! aya-ebpf has no CO-RE field relocations, so every offset comes from `CONFIG.offsets`, which
//! userspace filled in from /sys/kernel/btf/vmlinux before load. All reads go through
//! `bpf_probe_read_kernel`, which returns an error instead of faulting.

use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf};
use vtrace_common::{
    packet::{self, words_at, FrameWords, IpWords, L4Words, FRAME_WORDS},
    IFNAMSIZ,
};

use crate::config::conf;

/// `(u16)~0U`: the value `skb->mac_header` / `skb->network_header` hold when unset
/// (include/linux/skbuff.h, `skb_mac_header_was_set`).
const HEADER_UNSET: u16 = 0xffff;

#[inline(always)]
unsafe fn read<T>(base: u64, off: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel copes with any address; a bad one returns an error.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T).ok() }
}

/// How a program reads a field of a struct the kernel handed it, on the hot path.
pub trait Access {
    /// `*(T *)(base + off)`, or None where the read failed (`Untyped` only).
    fn field<T: Copy>(base: u64, off: u32) -> Option<T>;
}

/// The arguments of a BTF-typed tracepoint (`tp_btf`) are pointers the verifier knows the type
/// of, and so are the struct pointers loaded from them. A field is then one plain load, which
/// the JIT makes fault-safe (`BPF_PROBE_MEM`), instead of a `bpf_probe_read_kernel` call: the
/// entry hooks read five fields of every packet this way. The verifier checks the load against
/// the struct's BTF, which needs the offset to be a load-time constant: it is, `CONFIG` is
/// frozen `.rodata`.
pub struct Typed;

/// Raw tracepoints and kprobes get plain integers: every read goes through
/// `bpf_probe_read_kernel`.
pub struct Untyped;

impl Access for Typed {
    #[inline(always)]
    fn field<T: Copy>(base: u64, off: u32) -> Option<T> {
        // SAFETY: `base` is a BTF-typed pointer the verifier tracks; the load is checked
        // against its type at load time and fault-safe at run time.
        Some(unsafe { core::ptr::read((base + off as u64) as *const T) })
    }
}

impl Access for Untyped {
    #[inline(always)]
    fn field<T: Copy>(base: u64, off: u32) -> Option<T> {
        // SAFETY: see `read`.
        unsafe { read::<T>(base, off) }
    }
}

/// `skb->dev`, read as `A` reads.
#[inline(always)]
pub fn skb_dev_as<A: Access>(skb: u64) -> u64 {
    A::field::<u64>(skb, conf!(offsets.sk_buff_dev)).unwrap_or(0)
}

/// `dev->ifindex`, read as `A` reads.
#[inline(always)]
pub fn dev_ifindex_as<A: Access>(dev: u64) -> u32 {
    if dev == 0 {
        return 0;
    }
    A::field::<u32>(dev, conf!(offsets.net_device_ifindex)).unwrap_or(0)
}

/// `skb->dev`.
#[inline(always)]
pub fn skb_dev(skb: u64) -> u64 {
    // SAFETY: see `read`.
    unsafe { read::<u64>(skb, conf!(offsets.sk_buff_dev)) }.unwrap_or(0)
}

/// Whether `dev` (read from `skb->dev`) is a device pointer. Some protocols reuse the field once
/// the skb left the device layer (UDP keeps its `dev_scratch` there): only a kernel address
/// (the upper half on x86-64 and arm64) is followed.
#[inline(always)]
pub fn is_device(dev: u64) -> bool {
    dev >= 0xffff_8000_0000_0000
}

/// `skb->len`.
#[inline(always)]
pub fn skb_len(skb: u64) -> u32 {
    // SAFETY: see `read`.
    unsafe { read::<u32>(skb, conf!(offsets.sk_buff_len)) }.unwrap_or(0)
}

/// What the loader needs to name a device: ifindex, name, netns inode.
pub struct DevInfo {
    pub ifindex: u32,
    pub netns: u32,
    pub name: [u8; IFNAMSIZ],
}

#[inline(always)]
pub fn dev_ifindex(dev: u64) -> u32 {
    if dev == 0 {
        return 0;
    }
    // SAFETY: see `read`.
    unsafe { read::<u32>(dev, conf!(offsets.net_device_ifindex)) }.unwrap_or(0)
}

/// `dev->name`.
#[inline(always)]
pub fn dev_name(dev: u64) -> [u8; IFNAMSIZ] {
    let mut name = [0u8; IFNAMSIZ];
    if dev != 0 {
        // SAFETY: see `read`; the destination is a stack array of IFNAMSIZ bytes.
        let _ = unsafe {
            bpf_probe_read_kernel_buf(
                (dev + conf!(offsets.net_device_name) as u64) as *const u8,
                &mut name,
            )
        };
    }
    name
}

#[inline(always)]
pub fn dev_info(dev: u64, ifindex: u32) -> DevInfo {
    let mut info = DevInfo {
        ifindex,
        netns: 0,
        name: [0; IFNAMSIZ],
    };
    if dev == 0 {
        return info;
    }
    // SAFETY: see `read`; the destination is a stack array of IFNAMSIZ bytes.
    unsafe {
        let _ = bpf_probe_read_kernel_buf(
            (dev + conf!(offsets.net_device_name) as u64) as *const u8,
            &mut info.name,
        );
        // dev->nd_net.net->ns.inum (possible_net_t holds `struct net *net` first).
        if let Some(net) = read::<u64>(dev, conf!(offsets.net_device_nd_net)) {
            info.netns = read::<u32>(net, conf!(offsets.net_ns_inum)).unwrap_or(0);
        }
    }
    info
}

/// For an skb without a device (a drop after the stack let go of `skb->dev`, e.g. a socket
/// queue purge): the device it last arrived on (`skb->skb_iif`, set by
/// `__netif_receive_skb_core`) and, through its socket, the network namespace that ifindex
/// belongs to. The name is resolved in userspace.
#[inline(always)]
pub fn arrival_info(skb: u64) -> DevInfo {
    // SAFETY: see `read`.
    unsafe {
        let ifindex = read::<u32>(skb, conf!(offsets.sk_buff_skb_iif)).unwrap_or(0);
        let mut netns = 0;
        if let Some(sk) = read::<u64>(skb, conf!(offsets.sk_buff_sk)).filter(|sk| *sk != 0) {
            if let Some(net) = read::<u64>(sk, conf!(offsets.sock_net)) {
                netns = read::<u32>(net, conf!(offsets.net_ns_inum)).unwrap_or(0);
            }
        }
        DevInfo {
            ifindex,
            netns,
            name: [0; IFNAMSIZ],
        }
    }
}

/// The packet's headers, read from the skb's linear data.
pub struct Headers {
    pub l3: packet::L3,
    pub l4: L4Words,
}

/// Finds and reads the network and transport headers of `skb`.
///
/// Both on receive (after `eth_type_trans`) and on transmit (`__dev_queue_xmit` resets it), the
/// Ethernet header is at `head + mac_header`; tun/tap and veth set it too. A device without
/// Ethernet header (mac == network header, e.g. a tun in IFF_TUN mode) is read from the network
/// header with `skb->protocol` as ethertype.
#[inline(always)]
pub fn headers<A: Access>(skb: u64) -> Option<Headers> {
    // The sk_buff fields as `A` reads them; the packet bytes (behind `head`, a plain
    // `unsigned char *`) always through bpf_probe_read_kernel.
    let head = A::field::<u64>(skb, conf!(offsets.sk_buff_head))?;
    let mac = A::field::<u16>(skb, conf!(offsets.sk_buff_mac_header))?;
    let net = A::field::<u16>(skb, conf!(offsets.sk_buff_network_header))?;
    if mac != HEADER_UNSET && (net == HEADER_UNSET || net > mac) {
        return frame_headers(head + mac as u64);
    }
    if net == HEADER_UNSET {
        return None;
    }
    // No link-layer header (a tun in IFF_TUN mode): the network header, typed by skb->protocol.
    let ethertype = u16::from_be(A::field::<u16>(skb, conf!(offsets.sk_buff_protocol))?);
    let l3_addr = head + net as u64;
    let ip: IpWords = read_words(l3_addr)?;
    let l3 = packet::parse_l3(ethertype, &ip)?;
    let l4: L4Words = read_words(l3_addr + l3.l4_off as u64)?;
    Some(Headers { l3, l4 })
}

/// The headers of an Ethernet frame at `eth`, from one read of its first 96 bytes in the common
/// case (every helper call costs about as much as the parse), from a second read of the
/// transport header after IPv4 options.
#[inline(always)]
fn frame_headers(eth: u64) -> Option<Headers> {
    let frame: FrameWords = read_words(eth)?;
    let (ethertype, l2) = packet::parse_l2(&words_at::<0, 3, FRAME_WORDS>(&frame))?;
    let ip: IpWords = match l2 {
        14 => words_at::<14, 5, FRAME_WORDS>(&frame),
        18 => words_at::<18, 5, FRAME_WORDS>(&frame),
        _ => words_at::<22, 5, FRAME_WORDS>(&frame),
    };
    let l3 = packet::parse_l3(ethertype, &ip)?;
    let l4: L4Words = match (l2, l3.l4_off) {
        (14, 20) => words_at::<34, 3, FRAME_WORDS>(&frame),
        (18, 20) => words_at::<38, 3, FRAME_WORDS>(&frame),
        (22, 20) => words_at::<42, 3, FRAME_WORDS>(&frame),
        (14, 40) => words_at::<54, 3, FRAME_WORDS>(&frame),
        (18, 40) => words_at::<58, 3, FRAME_WORDS>(&frame),
        (22, 40) => words_at::<62, 3, FRAME_WORDS>(&frame),
        _ => read_words(eth + l2 as u64 + l3.l4_off as u64)?,
    };
    Some(Headers { l3, l4 })
}

/// `W` words of packet data at `addr` (any alignment), into an aligned stack buffer.
#[inline(always)]
fn read_words<const W: usize>(addr: u64) -> Option<[u64; W]> {
    // SAFETY: see `read`; [u64; W] is plain data valid for any bytes.
    unsafe { bpf_probe_read_kernel(addr as *const [u64; W]).ok() }
}

/// A pointer-sized field of a kernel struct, 0 when unreadable.
#[inline(always)]
pub fn read_u64(base: u64, off: u32) -> u64 {
    // SAFETY: see `read`.
    unsafe { read::<u64>(base, off) }.unwrap_or(0)
}
