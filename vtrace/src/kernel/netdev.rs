//! The kernel's own per-device counters (`struct rtnl_link_stats64`), asked of rtnetlink
//! (RTM_GETLINK dump, IFLA_STATS64) in vtrace's network namespace and in every named one
//! (`ip netns`), so devices inside namespaces have their counters too.

use std::collections::BTreeMap;

/// The drop-related counters of one device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DropCounters {
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    pub rx_missed_errors: u64,
    pub rx_fifo_errors: u64,
    pub tx_fifo_errors: u64,
}

impl DropCounters {
    pub fn delta(&self, before: &DropCounters) -> DropCounters {
        DropCounters {
            rx_dropped: self.rx_dropped.saturating_sub(before.rx_dropped),
            tx_dropped: self.tx_dropped.saturating_sub(before.tx_dropped),
            rx_missed_errors: self
                .rx_missed_errors
                .saturating_sub(before.rx_missed_errors),
            rx_fifo_errors: self.rx_fifo_errors.saturating_sub(before.rx_fifo_errors),
            tx_fifo_errors: self.tx_fifo_errors.saturating_sub(before.tx_fifo_errors),
        }
    }
    pub fn total(&self) -> u64 {
        self.rx_dropped
            + self.tx_dropped
            + self.rx_missed_errors
            + self.rx_fifo_errors
            + self.tx_fifo_errors
    }
}

/// One device as rtnetlink lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    pub counters: DropCounters,
}

/// Counters of every device in vtrace's network namespace (bare names) and in every namespace
/// under /var/run/netns (`name@netns`, as vtrace names them in reports).
pub fn snapshot() -> BTreeMap<String, DropCounters> {
    let mut out: BTreeMap<String, DropCounters> = dump_links()
        .unwrap_or_default()
        .into_iter()
        .map(|l| (l.name, l.counters))
        .collect();
    for ns in netns_names().into_values() {
        if let Ok(links) = links_in(&ns) {
            for l in links {
                out.insert(format!("{}@{ns}", l.name), l.counters);
            }
        }
    }
    out
}

/// The devices of the named namespace (`ip netns` name).
fn links_in(ns: &str) -> std::io::Result<Vec<Link>> {
    let path = std::path::Path::new("/var/run/netns").join(ns);
    // setns affects only the calling thread: do it in a thread of its own.
    std::thread::spawn(move || -> std::io::Result<Vec<Link>> {
        let f = std::fs::File::open(&path)?;
        // SAFETY: a valid namespace fd; CLONE_NEWNET moves only this thread.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        dump_links()
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("netlink thread panicked")))
}

/// The name vtrace shows for device `ifindex` of network namespace `netns` (an inode number;
/// 0 or vtrace's own: this namespace): `name`, or `name@netns` for a named namespace.
pub fn name_of(ifindex: u32, netns: u32) -> Option<String> {
    if netns == 0 || netns == own_netns() {
        return dump_links()
            .ok()?
            .into_iter()
            .find(|l| l.ifindex == ifindex)
            .map(|l| l.name);
    }
    let ns = netns_names().remove(&netns)?;
    let link = links_in(&ns)
        .ok()?
        .into_iter()
        .find(|l| l.ifindex == ifindex)?;
    Some(format!("{}@{ns}", link.name))
}

/// rtnetlink constants (include/uapi/linux/netlink.h, rtnetlink.h, if_link.h).
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const IFLA_IFNAME: u16 = 3;
const IFLA_STATS64: u16 = 23;
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

/// Every device of the calling thread's network namespace with its drop counters.
fn dump_links() -> std::io::Result<Vec<Link>> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the fd is owned below.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh, valid fd.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = [0u8; NLMSG_HDRLEN + IFINFOMSG_LEN];
    let total = req.len() as u32;
    req[0..4].copy_from_slice(&total.to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: sending a buffer we own to our socket (the kernel is the default destination).
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receiving into a buffer we own, bounded by its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if parse_dump(&buf[..n as usize], &mut out)? || n == 0 {
            return Ok(out);
        }
    }
}

/// Parses one datagram of an RTM_GETLINK dump into `out`; true at NLMSG_DONE.
pub fn parse_dump(mut b: &[u8], out: &mut Vec<Link>) -> std::io::Result<bool> {
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "malformed rtnetlink message",
        )
    };
    while b.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(b[0..4].try_into().map_err(|_| bad())?) as usize;
        let ty = u16::from_ne_bytes(b[4..6].try_into().map_err(|_| bad())?);
        if len < NLMSG_HDRLEN || len > b.len() {
            return Err(bad());
        }
        match ty {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => return Err(bad()),
            RTM_NEWLINK if len >= NLMSG_HDRLEN + IFINFOMSG_LEN => {
                // struct ifinfomsg: family, pad, type (u16), index (i32), flags, change.
                let ifindex = u32::from_ne_bytes(
                    b[NLMSG_HDRLEN + 4..NLMSG_HDRLEN + 8]
                        .try_into()
                        .map_err(|_| bad())?,
                );
                if let Some((name, counters)) = parse_link(&b[NLMSG_HDRLEN + IFINFOMSG_LEN..len]) {
                    out.push(Link {
                        ifindex,
                        name,
                        counters,
                    });
                }
            }
            _ => {}
        }
        b = &b[align4(len).min(b.len())..];
    }
    Ok(false)
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The attributes of one RTM_NEWLINK: the name and the drop fields of rtnl_link_stats64.
fn parse_link(mut attrs: &[u8]) -> Option<(String, DropCounters)> {
    let (mut name, mut stats) = (None, None);
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let ty = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            break;
        }
        let payload = &attrs[4..len];
        match ty {
            IFLA_IFNAME => {
                let end = payload
                    .iter()
                    .position(|c| *c == 0)
                    .unwrap_or(payload.len());
                name = Some(String::from_utf8_lossy(&payload[..end]).into_owned());
            }
            IFLA_STATS64 => {
                // rtnl_link_stats64: u64 fields in this order (include/uapi/linux/if_link.h).
                let field = |i: usize| {
                    payload
                        .get(i * 8..i * 8 + 8)
                        .and_then(|w| w.try_into().ok())
                        .map(u64::from_ne_bytes)
                        .unwrap_or(0)
                };
                stats = Some(DropCounters {
                    rx_dropped: field(6),
                    tx_dropped: field(7),
                    rx_fifo_errors: field(14),
                    rx_missed_errors: field(15),
                    tx_fifo_errors: field(18),
                });
            }
            _ => {}
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    Some((name?, stats.unwrap_or_default()))
}

/// The network namespace inode of this process (to tell host devices from namespaced ones).
pub fn own_netns() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino() as u32)
        .unwrap_or(0)
}

/// Names of the namespaces under /var/run/netns (`ip netns`), by inode.
pub fn netns_names() -> BTreeMap<u32, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/var/run/netns") {
        for e in dir.flatten() {
            if let Ok(m) = std::fs::metadata(e.path()) {
                out.insert(m.ino() as u32, e.file_name().to_string_lossy().to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(payload);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    #[test]
    fn parses_a_link_dump() {
        let mut stats = vec![0u8; 8 * 24];
        stats[6 * 8..7 * 8].copy_from_slice(&5u64.to_ne_bytes());
        stats[7 * 8..8 * 8].copy_from_slice(&2_200_538u64.to_ne_bytes());
        stats[15 * 8..16 * 8].copy_from_slice(&9u64.to_ne_bytes());
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body[4..8].copy_from_slice(&7u32.to_ne_bytes());
        body.extend(attr(IFLA_IFNAME, b"tap0\0"));
        body.extend(attr(IFLA_STATS64, &stats));
        let mut msg = Vec::new();
        msg.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
        msg.extend_from_slice(&[0u8; 10]);
        msg.extend(body);
        let mut done = vec![0u8; NLMSG_HDRLEN];
        done[0..4].copy_from_slice(&(NLMSG_HDRLEN as u32).to_ne_bytes());
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        msg.extend(done);
        let mut out = Vec::new();
        assert!(parse_dump(&msg, &mut out).unwrap());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].name, "tap0");
        assert_eq!(out[0].ifindex, 7);
        assert_eq!(out[0].counters.rx_dropped, 5);
        assert_eq!(out[0].counters.tx_dropped, 2_200_538);
        assert_eq!(out[0].counters.rx_missed_errors, 9);
        // Cut anywhere: an error or an incomplete parse, never a panic.
        for cut in 0..msg.len() {
            let _ = parse_dump(&msg[..cut], &mut Vec::new());
        }
    }

    /// Against this machine's kernel: loopback is always there.
    #[test]
    fn dumps_this_namespace() {
        let links = dump_links().expect("rtnetlink answers");
        assert!(
            links.iter().any(|l| l.name == "lo" && l.ifindex == 1),
            "{links:?}"
        );
        assert_eq!(name_of(1, 0).as_deref(), Some("lo"));
    }
}
