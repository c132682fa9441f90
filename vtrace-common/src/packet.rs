//! Packet identity across copies: a content fingerprint from the headers.
//!
//! When a VMM or vhost writes a frame into a tap, or netback builds an skb from a guest's grant,
//! the kernel makes a new skb: its address says nothing about the old one. What survives the copy
//! is the content. The fingerprint hashes the header fields a bridge or a forwarding VMM does not
//! change (addresses, protocol, IPv4 id / IPv6 flow label, lengths, ports, TCP seq/ack, ICMP
//! id+seq) and a few payload bytes. TTL and checksums are left out, so a router that decrements
//! the TTL still joins.
//!
//! This code runs in the eBPF programs (on fixed-size buffers read with `bpf_probe_read_kernel`,
//! constant indices only, so the verifier has nothing to prove) and in userspace tests.

/// Bytes read at the Ethernet header: 14 + two VLAN tags, rounded up to whole words.
pub const L2_READ: usize = 24;
/// Bytes read at the network header: a full IPv6 header, or IPv4 without options.
pub const L3_READ: usize = 40;
/// Bytes read at the transport header: TCP up to its flags, UDP/ICMP header and 16 payload bytes.
pub const L4_READ: usize = 24;

/// The headers are read into buffers of 64-bit words and taken apart with shifts: the eBPF
/// programs then load whole words from aligned stack slots instead of single bytes, which keeps
/// both their instruction count and their stack frame small. Byte `i` of a buffer is bits
/// `8*(i%8)..` of word `i/8` (little-endian: the eBPF target and the userspace hosts vtrace
/// runs on).
pub type EthWords = [u64; L2_READ / 8];
pub type IpWords = [u64; L3_READ / 8];
pub type L4Words = [u64; L4_READ / 8];

/// Bytes read at once from the Ethernet header: enough for two VLAN tags, an IPv6 header (or
/// IPv4 without options) and the transport bytes the fingerprint takes (22 + 40 + 24 = 86).
pub const FRAME_READ: usize = 96;
pub const FRAME_WORDS: usize = FRAME_READ / 8;
pub type FrameWords = [u64; FRAME_WORDS];

/// `N` words starting `OFF` bytes into a word buffer of `W` words: the headers at a known
/// offset inside one read of the frame, with constant indices and shifts only.
#[inline(always)]
pub fn words_at<const OFF: usize, const N: usize, const W: usize>(buf: &[u64; W]) -> [u64; N] {
    let (i, s) = (OFF / 8, (OFF % 8) * 8);
    let mut out = [0u64; N];
    let mut k = 0;
    while k < N {
        out[k] = if s == 0 {
            buf[i + k]
        } else {
            (buf[i + k] >> s) | (buf[i + k + 1] << (64 - s))
        };
        k += 1;
    }
    out
}

/// Packs bytes into little-endian words (userspace: tests, generated packets); missing bytes
/// are 0.
pub fn words<const W: usize>(bytes: &[u8]) -> [u64; W] {
    let mut out = [0u64; W];
    let mut i = 0;
    while i < W * 8 && i < bytes.len() {
        out[i / 8] |= (bytes[i] as u64) << (8 * (i % 8));
        i += 1;
    }
    out
}

/// Byte `i` of a word buffer (a constant index: a shift and a mask).
#[inline(always)]
fn byte<const W: usize>(w: &[u64; W], i: usize) -> u8 {
    (w[i / 8] >> (8 * (i % 8))) as u8
}

/// Big-endian 16-bit field at byte `i`.
#[inline(always)]
fn be16_at<const W: usize>(w: &[u64; W], i: usize) -> u16 {
    ((byte(w, i) as u16) << 8) | byte(w, i + 1) as u16
}

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Where the network header starts relative to the Ethernet header, and its ethertype, after
/// stepping over up to two in-band VLAN tags (802.1Q / 802.1ad). Tags the NIC stripped into
/// `skb->vlan_tci` are not in memory and need no stepping over.
#[inline(always)]
pub fn parse_l2(eth: &EthWords) -> Option<(u16, u32)> {
    let mut ethertype = be16_at(eth, 12);
    let mut off = 14u32;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = be16_at(eth, 16);
        off = 18;
        if ethertype == ETH_P_8021Q {
            ethertype = be16_at(eth, 20);
            off = 22;
        }
    }
    if ethertype == ETH_P_IP || ethertype == ETH_P_IPV6 {
        Some((ethertype, off))
    } else {
        None
    }
}

/// What the network header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L3 {
    pub proto: u8,
    /// Offset of the transport header from the network header.
    pub l4_off: u32,
    /// Bytes of transport header and payload (IP total length minus the IP header).
    pub l4_len: u32,
    /// The 16-byte address as two little-endian words; IPv4 as v4-mapped IPv6
    /// (::ffff:a.b.c.d).
    pub src: [u64; 2],
    pub dst: [u64; 2],
    /// IPv4 identification, or the IPv6 flow label.
    pub ident: u32,
}

/// The second word of a v4-mapped address (bytes 8..16: 00 00 ff ff a b c d) from the IPv4
/// address's four bytes as a little-endian u32.
#[inline(always)]
fn v4_mapped(addr_le: u64) -> [u64; 2] {
    [0, 0xffff_0000 | (addr_le << 32)]
}

#[inline(always)]
pub fn parse_l3(ethertype: u16, ip: &IpWords) -> Option<L3> {
    let version = byte(ip, 0) >> 4;
    if ethertype == ETH_P_IP {
        if version != 4 {
            return None;
        }
        let ihl = ((byte(ip, 0) & 0x0f) as u32) * 4;
        let total = be16_at(ip, 2) as u32;
        if ihl < 20 || total < ihl {
            return None;
        }
        Some(L3 {
            proto: byte(ip, 9),
            l4_off: ihl,
            l4_len: total - ihl,
            // Source at bytes 12..16 (upper half of word 1), destination at 16..20.
            src: v4_mapped(ip[1] >> 32),
            dst: v4_mapped(ip[2] & 0xffff_ffff),
            ident: be16_at(ip, 4) as u32,
        })
    } else if ethertype == ETH_P_IPV6 {
        if version != 6 {
            return None;
        }
        Some(L3 {
            proto: byte(ip, 6),
            l4_off: 40,
            l4_len: be16_at(ip, 4) as u32,
            // Source at bytes 8..24, destination at 24..40: whole words.
            src: [ip[1], ip[2]],
            dst: [ip[3], ip[4]],
            ident: ((byte(ip, 1) as u32 & 0x0f) << 16) | be16_at(ip, 2) as u32,
        })
    } else {
        None
    }
}

/// The transport ports, 0 for protocols without ports.
#[inline(always)]
pub fn ports(l3: &L3, l4: &L4Words) -> (u16, u16) {
    match l3.proto {
        IPPROTO_TCP | IPPROTO_UDP => (be16_at(l4, 0), be16_at(l4, 2)),
        _ => (0, 0),
    }
}

/// The content fingerprint of a packet; never 0 (0 means "no fingerprint").
///
/// `l4` holds what was read at the transport header; only bytes within the packet (`l4_len`)
/// are hashed, so memory past the end of a short packet never changes the result. The hash
/// works on 64-bit words (independent multiplies, summed): it runs at every entry hop of every
/// packet.
#[inline(always)]
pub fn fingerprint(l3: &L3, l4: &L4Words) -> u64 {
    // Transport fields that survive a copy: ports and TCP seq/ack and flags; the UDP length;
    // ICMP type/code/id/seq. Then payload bytes up to L4_READ, bounded by the packet's length.
    // Checksums are masked out (TCP bytes 16-17, UDP 6-7, ICMP 2-3; little-endian word order):
    // checksum offload leaves them partial on one side of a copy and final on the other, and
    // NAT rewrites them. (A TTL decrement changes only the IP header checksum, not hashed.)
    let checksum: [u64; 3] = match l3.proto {
        IPPROTO_TCP => [0, 0, 0xffff],
        IPPROTO_UDP => [0xffff << 48, 0, 0],
        IPPROTO_ICMP | IPPROTO_ICMPV6 => [0xffff << 16, 0, 0],
        _ => [0, 0, 0],
    };
    let covered = if l3.l4_len < L4_READ as u32 {
        l3.l4_len as u64
    } else {
        L4_READ as u64
    };
    // Each word times its own odd constant, summed: the products are independent (no chain
    // of multiplies, no rotates, which BPF has no instruction for), then one avalanche.
    let sum = l3.src[0]
        .wrapping_mul(K[0])
        .wrapping_add(l3.src[1].wrapping_mul(K[1]))
        .wrapping_add(l3.dst[0].wrapping_mul(K[2]))
        .wrapping_add(l3.dst[1].wrapping_mul(K[3]))
        .wrapping_add((((l3.proto as u64) << 32) | l3.l4_len as u64).wrapping_mul(K[4]))
        .wrapping_add((l3.ident as u64).wrapping_mul(K[5]))
        .wrapping_add((l4[0] & covered_mask(covered, 0) & !checksum[0]).wrapping_mul(K[6]))
        .wrapping_add((l4[1] & covered_mask(covered, 1) & !checksum[1]).wrapping_mul(K[7]))
        .wrapping_add((l4[2] & covered_mask(covered, 2) & !checksum[2]).wrapping_mul(K[8]));
    let v = avalanche(sum);
    if v == 0 {
        1
    } else {
        v
    }
}

/// The bits of word `k` (bytes 8k..8k+8, little-endian) that lie within the first `covered`
/// bytes.
#[inline(always)]
fn covered_mask(covered: u64, k: u64) -> u64 {
    let start = k * 8;
    if covered >= start + 8 {
        u64::MAX
    } else if covered <= start {
        0
    } else {
        (1u64 << ((covered - start) * 8)) - 1
    }
}

/// Consistent sampling: every hop, on both sides of a copy, takes the same decision for the
/// same packet because it is taken from the fingerprint alone. The fingerprint's high 32 bits,
/// uniform after its final avalanche, are scaled to `0..every` with a multiply and a shift
/// (sampled: 0, i.e. the lowest 1/every of the range): a modulo would put a 64-bit division in
/// every entry hook, for every packet.
#[inline(always)]
pub fn sampled(fingerprint: u64, every: u32) -> bool {
    every <= 1 || ((fingerprint >> 32) * every as u64) >> 32 == 0
}

/// The packet filter set at load time (`Config`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filter {
    /// IP protocol, 0 = any.
    pub proto: u8,
    /// Source or destination address (v4-mapped for IPv4) as two little-endian words (see
    /// `words`), when `host_set`.
    pub host: [u64; 2],
    pub host_set: bool,
    /// Source or destination port, 0 = any.
    pub port: u16,
}

impl Filter {
    pub fn matches(&self, l3: &L3, sport: u16, dport: u16) -> bool {
        if self.proto != 0 && self.proto != l3.proto {
            return false;
        }
        if self.host_set && self.host != l3.src && self.host != l3.dst {
            return false;
        }
        if self.port != 0 && self.port != sport && self.port != dport {
            return false;
        }
        true
    }
}

/// One odd multiplier per hashed word (the SHA-512 initial hash values, made odd, and the
/// golden ratio). Odd: a word that differs changes its product, so a single changed field always
/// changes the sum.
const K: [u64; 9] = [
    0x6a09_e667_f3bc_c909,
    0xbb67_ae85_84ca_a73b,
    0x3c6e_f372_fe94_f82b,
    0xa54f_f53a_5f1d_36f1,
    0x510e_527f_ade6_82d1,
    0x9b05_688c_2b3e_6c1f,
    0x1f83_d9ab_fb41_bd6b,
    0x5be0_cd19_137e_2179,
    0x9e37_79b9_7f4a_7c15,
];

/// MurmurHash3's fmix64: every input bit reaches every output bit, so `sampled` can take the
/// high half.
#[inline(always)]
fn avalanche(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}
