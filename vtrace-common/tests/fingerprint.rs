//! The content fingerprint that joins a packet across copies: what it must keep equal (a copy,
//! a router's TTL decrement, bytes past the packet's end) and what it must tell apart.

use vtrace_common::packet::*;

/// An Ethernet frame: optional 802.1Q tag, IPv4, ICMP echo with `seq` and a payload.
fn icmp_frame(vlan: bool, ttl: u8, seq: u16, ip_id: u16) -> Vec<u8> {
    icmp_frame_with(vlan, ttl, seq, ip_id, 16)
}

fn icmp_frame_with(vlan: bool, ttl: u8, seq: u16, ip_id: u16, payload_len: usize) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    if vlan {
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
    }
    f.extend_from_slice(&[0x08, 0x00]);
    let payload = vec![0xaa_u8; payload_len];
    let total = (20 + 8 + payload.len()) as u16;
    f.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        (ip_id >> 8) as u8,
        ip_id as u8,
        0x40,
        0,
        ttl,
        1,
        0x12,
        0x34,
    ]);
    f.extend_from_slice(&[198, 18, 1, 1, 198, 18, 1, 2]);
    f.extend_from_slice(&[8, 0, 0xbe, 0xef, 0x12, 0x34, (seq >> 8) as u8, seq as u8]);
    f.extend_from_slice(&payload);
    f
}

fn fp_of(frame: &[u8], garbage_after: u8) -> Option<(u64, L3)> {
    let mut buf = frame.to_vec();
    buf.resize(frame.len() + 64, garbage_after);
    // As the eBPF programs read them: fixed-size reads into word buffers.
    let eth: EthWords = words(&buf[..L2_READ]);
    let (ethertype, off) = parse_l2(&eth)?;
    let off = off as usize;
    let ip: IpWords = words(&buf[off..off + L3_READ]);
    let l3 = parse_l3(ethertype, &ip)?;
    let l4_at = off + l3.l4_off as usize;
    let l4: L4Words = words(&buf[l4_at..l4_at + L4_READ]);
    Some((fingerprint(&l3, &l4), l3))
}

#[test]
fn a_copy_has_the_same_fingerprint_whatever_follows_the_packet() {
    let f = icmp_frame(false, 64, 7, 100);
    assert_eq!(fp_of(&f, 0).unwrap().0, fp_of(&f, 0xff).unwrap().0);
}

#[test]
fn a_router_decrementing_ttl_keeps_the_fingerprint() {
    let a = fp_of(&icmp_frame(false, 64, 7, 100), 0).unwrap().0;
    let b = fp_of(&icmp_frame(false, 63, 7, 100), 0).unwrap().0;
    assert_eq!(a, b);
}

#[test]
fn vlan_tagged_and_untagged_copies_join() {
    let (a, l3a) = fp_of(&icmp_frame(false, 64, 7, 100), 0).unwrap();
    let (b, l3b) = fp_of(&icmp_frame(true, 64, 7, 100), 0).unwrap();
    assert_eq!(l3a, l3b);
    assert_eq!(a, b);
}

#[test]
fn different_packets_differ() {
    let base = fp_of(&icmp_frame(false, 64, 7, 100), 0).unwrap().0;
    assert_ne!(
        base,
        fp_of(&icmp_frame(false, 64, 8, 100), 0).unwrap().0,
        "ICMP seq"
    );
    assert_ne!(
        base,
        fp_of(&icmp_frame(false, 64, 7, 101), 0).unwrap().0,
        "IPv4 id"
    );
    assert_ne!(base, 0, "0 means no fingerprint");
}

#[test]
fn ipv6_udp_ports_and_flow_label() {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&[0x86, 0xdd]);
    f.extend_from_slice(&[0x60, 0x01, 0x23, 0x45, 0, 16, 17, 64]);
    f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8].repeat(4));
    f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb9].repeat(4));
    f.extend_from_slice(&[0x30, 0x39, 0x1f, 0x90, 0, 16, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
    let (fp, l3) = fp_of(&f, 0).unwrap();
    assert_eq!(l3.proto, IPPROTO_UDP);
    assert_eq!(l3.ident, 0x12345);
    let l4: L4Words = words(&[0x30, 0x39, 0x1f, 0x90]);
    assert_eq!(ports(&l3, &l4), (12345, 8080));
    let filter = Filter {
        proto: IPPROTO_UDP,
        host: l3.dst,
        host_set: true,
        port: 8080,
    };
    assert!(filter.matches(&l3, 12345, 8080));
    assert!(!Filter { port: 53, ..filter }.matches(&l3, 12345, 8080));
    assert!(!Filter {
        proto: IPPROTO_TCP,
        ..filter
    }
    .matches(&l3, 12345, 8080));
    assert_ne!(fp, 0);
}

#[test]
fn not_ip_is_not_parsed() {
    let mut arp = icmp_frame(false, 64, 1, 1);
    arp[12] = 0x08;
    arp[13] = 0x06;
    assert!(fp_of(&arp, 0).is_none());
}

/// A short packet (4 payload bytes): what the reads pick up past its end differs between the
/// two skbs of a copy, and must not change the fingerprint.
#[test]
fn bytes_past_a_short_packet_are_not_hashed() {
    let f = icmp_frame_with(false, 64, 7, 100, 4);
    assert_eq!(fp_of(&f, 0x00).unwrap().0, fp_of(&f, 0x5a).unwrap().0);
    let g = icmp_frame_with(false, 64, 7, 100, 5);
    assert_ne!(
        fp_of(&f, 0).unwrap().0,
        fp_of(&g, 0).unwrap().0,
        "the length is hashed"
    );
}

/// The transport checksum (left partial by offloads on one side of a copy) is not hashed.
#[test]
fn the_transport_checksum_is_not_hashed() {
    let f = icmp_frame(false, 64, 7, 100);
    let mut g = f.clone();
    // ICMP checksum: bytes 2-3 of the ICMP header (14 Ethernet + 20 IP).
    g[14 + 20 + 2] ^= 0xff;
    g[14 + 20 + 3] ^= 0x0f;
    assert_eq!(fp_of(&f, 0).unwrap().0, fp_of(&g, 0).unwrap().0);
}

/// Sampling takes its decision from the fingerprint: real fingerprints of a ping run (one per
/// sequence number) are chosen at about the rate asked for.
#[test]
fn sampling_of_real_fingerprints_is_near_the_rate() {
    let n = 16_000u16;
    let chosen = (0..n)
        .filter(|seq| {
            sampled(
                fp_of(&icmp_frame(false, 64, *seq, seq.wrapping_mul(7)), 0)
                    .unwrap()
                    .0,
                16,
            )
        })
        .count();
    assert!(
        (700..1_300).contains(&chosen),
        "about 1 in 16 of {n}: {chosen}"
    );
    assert!((0..100u16).all(|s| sampled(fp_of(&icmp_frame(false, 64, s, 1), 0).unwrap().0, 1)));
}

/// `--host 198.18.1.2` reaches the programs as the v4-mapped octets (`Config::host`), packed
/// into words there: they must equal the parsed IPv4 destination, word for word.
#[test]
fn an_ipv4_host_filter_matches_the_parsed_address() {
    let f = icmp_frame(false, 64, 1, 1);
    let (_, l3) = fp_of(&f, 0).unwrap();
    let mapped = std::net::Ipv4Addr::new(198, 18, 1, 2)
        .to_ipv6_mapped()
        .octets();
    let host: [u64; 2] = words(&mapped);
    assert_eq!(l3.dst, host);
    let filter = Filter {
        proto: 0,
        host,
        host_set: true,
        port: 0,
    };
    assert!(filter.matches(&l3, 0, 0));
    let other: [u64; 2] = words(
        &std::net::Ipv4Addr::new(198, 18, 1, 3)
            .to_ipv6_mapped()
            .octets(),
    );
    assert!(!Filter {
        host: other,
        ..filter
    }
    .matches(&l3, 0, 0));
}

/// The eBPF programs read the first 96 bytes of a frame once and take the headers out of the
/// words at their offsets: every offset they use must give the bytes found there.
#[test]
fn headers_taken_from_one_read_equal_the_bytes_at_their_offset() {
    let bytes: Vec<u8> = (0..FRAME_READ as u8)
        .map(|b| b.wrapping_mul(37) ^ 0x5a)
        .collect();
    let frame: FrameWords = words(&bytes);
    macro_rules! check {
        ($off:literal, $n:literal) => {
            let got: [u64; $n] = words_at::<$off, $n, FRAME_WORDS>(&frame);
            let want: [u64; $n] = words(&bytes[$off..$off + 8 * $n]);
            assert_eq!(got, want, "{} words at byte {}", $n, $off);
        };
    }
    check!(0, 3);
    check!(14, 5);
    check!(18, 5);
    check!(22, 5);
    check!(34, 3);
    check!(38, 3);
    check!(42, 3);
    check!(54, 3);
    check!(58, 3);
    check!(62, 3);
}
