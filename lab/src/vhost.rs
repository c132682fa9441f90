//! A minimal userspace vhost-net driver: what QEMU does for a virtio-net device with
//! `vhost=on`, without a guest.
//!
//! The process plays the guest's virtio-net driver *and* the VMM: it owns one anonymous
//! mapping holding two split virtqueues (0 = RX, 1 = TX) and their buffers, hands it to
//! `/dev/vhost-net` as the "guest memory" (one region, guest-physical address = userspace
//! address), and attaches a tap as the backend. From then on the kernel's vhost worker
//! (`vhost-<pid>`) moves frames between the rings and the tap, as for a real VM:
//!
//! * TX: frames put on ring 1 and kicked → `handle_tx` → `tun_sendmsg` → the host stack
//!   receives them on the tap (its `rx_packets`);
//! * RX: whatever the host sends to the tap (`tun_net_xmit` puts it in the tap's
//!   `ptr_ring`) → `handle_rx` → `tun_recvmsg` → written into the buffers posted on ring 0.
//!
//! Facts from the kernel (include/uapi/linux/vhost.h, drivers/vhost/{vhost,net}.c):
//! ring addresses given with `VHOST_SET_VRING_ADDR` are userspace addresses of the owner,
//! descriptor addresses are guest-physical and translated through the memory table; the
//! vnet header is passed through to the socket unless `VHOST_NET_F_VIRTIO_NET_HDR` is
//! acked, so the tap must be created with `IFF_VNET_HDR` and the same header size.
//! Needs root (CAP_NET_ADMIN for the tap) and the vhost_net module.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::names::MAX_IFNAME;
use crate::topology::is_lab_addr;

// ---- include/uapi/linux/vhost.h and vhost_types.h ------------------------------------

/// `VHOST_VIRTIO`, the ioctl type of every vhost request.
const VHOST_VIRTIO: u64 = 0xAF;
/// `_IOC` direction bits (asm-generic/ioctl.h): `_IOW` = write (userspace → kernel).
const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// `_IOC(dir, VHOST_VIRTIO, nr, size)`: dir in bits 30–31, size in 16–29, type 8–15, nr 0–7.
const fn vhost_ioc(dir: u64, nr: u64, size: usize) -> libc::c_ulong {
    ((dir << 30) | ((size as u64) << 16) | (VHOST_VIRTIO << 8) | nr) as libc::c_ulong
}

/// `_IOR(VHOST_VIRTIO, 0x00, __u64)`: features the device offers.
const VHOST_GET_FEATURES: libc::c_ulong = vhost_ioc(IOC_READ, 0x00, 8);
/// `_IOW(VHOST_VIRTIO, 0x00, __u64)`: features the driver acks.
const VHOST_SET_FEATURES: libc::c_ulong = vhost_ioc(IOC_WRITE, 0x00, 8);
/// `_IO(VHOST_VIRTIO, 0x01)`: binds the device to this process (its mm, and the worker thread).
const VHOST_SET_OWNER: libc::c_ulong = vhost_ioc(IOC_NONE, 0x01, 0);
/// `_IOW(VHOST_VIRTIO, 0x03, struct vhost_memory)`: the size is the header's only (8 bytes);
/// the kernel reads `nregions` regions after it.
const VHOST_SET_MEM_TABLE: libc::c_ulong =
    vhost_ioc(IOC_WRITE, 0x03, std::mem::size_of::<VhostMemoryHeader>());
/// `_IOW(VHOST_VIRTIO, 0x10, struct vhost_vring_state)`: ring size (a power of 2).
const VHOST_SET_VRING_NUM: libc::c_ulong =
    vhost_ioc(IOC_WRITE, 0x10, std::mem::size_of::<VhostVringState>());
/// `_IOW(VHOST_VIRTIO, 0x11, struct vhost_vring_addr)`.
const VHOST_SET_VRING_ADDR: libc::c_ulong =
    vhost_ioc(IOC_WRITE, 0x11, std::mem::size_of::<VhostVringAddr>());
/// `_IOW(VHOST_VIRTIO, 0x12, struct vhost_vring_state)`: the first avail index to process.
const VHOST_SET_VRING_BASE: libc::c_ulong =
    vhost_ioc(IOC_WRITE, 0x12, std::mem::size_of::<VhostVringState>());
/// `_IOW(VHOST_VIRTIO, 0x20, struct vhost_vring_file)`: eventfd the driver writes to notify.
const VHOST_SET_VRING_KICK: libc::c_ulong =
    vhost_ioc(IOC_WRITE, 0x20, std::mem::size_of::<VhostVringFile>());
/// `_IOW(VHOST_VIRTIO, 0x21, struct vhost_vring_file)`: eventfd vhost signals after used updates.
const VHOST_SET_VRING_CALL: libc::c_ulong =
    vhost_ioc(IOC_WRITE, 0x21, std::mem::size_of::<VhostVringFile>());
/// `_IOW(VHOST_VIRTIO, 0x30, struct vhost_vring_file)`: the tap (or raw socket) of a queue.
const VHOST_NET_SET_BACKEND: libc::c_ulong =
    vhost_ioc(IOC_WRITE, 0x30, std::mem::size_of::<VhostVringFile>());

/// `struct vhost_memory` without its flexible array of regions.
#[repr(C)]
struct VhostMemoryHeader {
    nregions: u32,
    padding: u32,
}

/// `struct vhost_memory_region`.
#[repr(C)]
#[derive(Clone, Copy)]
struct VhostMemoryRegion {
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
    flags_padding: u64,
}

/// `struct vhost_memory` with exactly one region, as passed to VHOST_SET_MEM_TABLE.
#[repr(C)]
struct VhostMemoryOne {
    header: VhostMemoryHeader,
    region: VhostMemoryRegion,
}

/// `struct vhost_vring_state`.
#[repr(C)]
struct VhostVringState {
    index: u32,
    num: u32,
}

/// `struct vhost_vring_file`: `fd` -1 detaches.
#[repr(C)]
struct VhostVringFile {
    index: u32,
    fd: i32,
}

/// `struct vhost_vring_addr`: userspace addresses of the three parts of a split ring.
#[repr(C)]
struct VhostVringAddr {
    index: u32,
    /// VHOST_VRING_F_LOG (dirty logging for migration): not used.
    flags: u32,
    desc_user_addr: u64,
    used_user_addr: u64,
    avail_user_addr: u64,
    log_guest_addr: u64,
}

const _: () = assert!(std::mem::size_of::<VhostMemoryHeader>() == 8);
const _: () = assert!(std::mem::size_of::<VhostMemoryRegion>() == 32);
const _: () = assert!(std::mem::size_of::<VhostMemoryOne>() == 40);
const _: () = assert!(std::mem::size_of::<VhostVringState>() == 8);
const _: () = assert!(std::mem::size_of::<VhostVringFile>() == 8);
const _: () = assert!(std::mem::size_of::<VhostVringAddr>() == 40);

// ---- virtio (include/uapi/linux/virtio_{config,net,ring}.h) -----------------------------

/// Virtio 1.0: little-endian rings, and the net header always has `num_buffers`.
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// The driver may receive one frame into several buffers; vhost writes `num_buffers`.
const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
/// The features acked. vhost_net_set_features() picks the 12-byte
/// `virtio_net_hdr_mrg_rxbuf` when MRG_RXBUF is acked (newer kernels also for VERSION_1
/// alone), so acking MRG_RXBUF makes it 12 bytes on every kernel. No offloads, and no
/// EVENT_IDX, so every used-ring update signals the call eventfd.
const WANTED_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF;
/// `sizeof(struct virtio_net_hdr_mrg_rxbuf)`; the tap gets the same with TUNSETVNETHDRSZ.
pub const VNET_HDR_LEN: usize = 12;

/// Split-ring descriptor flag: the device writes the buffer (RX).
const VRING_DESC_F_WRITE: u16 = 2;

/// Size of both rings (power of 2; vhost accepts up to 32768).
pub const RING_SIZE: u16 = 256;
/// Bytes per RX buffer: one 1500-MTU frame plus the header fits, so with MRG_RXBUF each
/// frame takes one buffer (num_buffers = 1).
const RX_BUF: usize = 2048;
/// Bytes per TX slot: header + one 64-byte frame.
const TX_SLOT: usize = 128;
/// The Ethernet frame sent on TX (no FCS): 14 + 20 (IPv4) + 8 (UDP) + 22 payload.
pub const FRAME_LEN: usize = 64;
const PAGE: usize = 4096;

/// How long the TX phase may take before the used ring is declared stuck.
const TX_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest single wait on the call eventfds.
const POLL_SLICE_MS: i32 = 100;

const UDP_SRC_PORT: u16 = 40000;
const UDP_DST_PORT: u16 = 9000;

/// What to do.
#[derive(Debug, Clone)]
pub struct VhostOptions {
    /// Name of the tap to create (non-persistent: it disappears when the driver exits).
    pub tap: String,
    /// Frames to send through the TX ring.
    pub frames: u64,
    /// Buffers to post on the RX ring (1..=RING_SIZE).
    pub rx_buffers: u16,
    /// IPv4 source of the TX frames (the "guest" address), in 198.18.0.0/15.
    pub src: Ipv4Addr,
    /// IPv4 destination of the TX frames, in 198.18.0.0/15.
    pub dst: Ipv4Addr,
    /// How long to keep receiving after TX has completed.
    pub linger: Duration,
}

impl Default for VhostOptions {
    fn default() -> Self {
        VhostOptions {
            tap: "vtvh0".into(),
            frames: 200,
            rx_buffers: RING_SIZE,
            src: Ipv4Addr::new(198, 18, 6, 2),
            dst: Ipv4Addr::new(198, 18, 6, 1),
            linger: Duration::from_millis(1000),
        }
    }
}

/// What happened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VhostReport {
    /// Features acked to vhost-net.
    pub features: u64,
    /// Frames put on the TX ring.
    pub tx_sent: u64,
    /// TX descriptors vhost returned on the used ring (consumed by `handle_tx`).
    pub tx_used: u64,
    /// Frames vhost wrote into RX buffers (`handle_rx`).
    pub rx_frames: u64,
    /// Of those, ICMP echo requests addressed to the source address (host pings).
    pub rx_echo_requests: u64,
}

/// Creates the tap, drives vhost-net through TX and RX as described in the module
/// documentation, and tears everything down (the tap disappears) before returning.
pub fn run(opts: &VhostOptions) -> Result<VhostReport> {
    if opts.rx_buffers == 0 || opts.rx_buffers > RING_SIZE {
        bail!("--rx-buffers must be 1..={RING_SIZE}");
    }
    for (what, a) in [("source", opts.src), ("destination", opts.dst)] {
        if !is_lab_addr(a) {
            bail!("{what} address {a} is outside 198.18.0.0/15, the only range the lab sends to");
        }
    }
    let tap = VnetTap::create(&opts.tap)?;
    let dst_mac = tap.up_and_mac()?;
    let mut dev = Device::open(&tap)?;
    let mut report = VhostReport {
        features: dev.features,
        ..VhostReport::default()
    };
    let src_mac = local_mac(opts.src);
    let mut rx_done = |dev: &Device, id: u16, len: u32, r: &mut VhostReport| {
        r.rx_frames += 1;
        if is_echo_request_to(dev.rx_frame(id, len), opts.src) {
            r.rx_echo_requests += 1;
        }
    };

    // RX first, so that anything the host sends once the backend is attached lands.
    for id in 0..opts.rx_buffers {
        dev.post_rx(id);
    }
    dev.rx.publish();
    dev.kick(Queue::Rx)?;

    // TX: fill every free descriptor, kick once per batch, reap the used ring, repeat.
    let mut free: Vec<u16> = (0..RING_SIZE).rev().collect();
    let deadline = Instant::now() + TX_TIMEOUT;
    while report.tx_used < opts.frames {
        let mut posted = false;
        while report.tx_sent < opts.frames {
            let Some(id) = free.pop() else { break };
            let frame = build_frame(src_mac, dst_mac, opts.src, opts.dst, report.tx_sent as u32);
            dev.post_tx(id, &frame);
            report.tx_sent += 1;
            posted = true;
        }
        if posted {
            dev.tx.publish();
            dev.kick(Queue::Tx)?;
        }
        while let Some((id, _)) = dev.tx.pop_used() {
            free.push(id);
            report.tx_used += 1;
        }
        dev.reap_rx(&mut rx_done, &mut report)?;
        if report.tx_used >= opts.frames {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "tx: vhost returned {} of {} frames on the used ring within {} s (is the tap up? dmesg may show a vhost error)",
                report.tx_used,
                report.tx_sent,
                TX_TIMEOUT.as_secs()
            );
        }
        dev.wait_call(POLL_SLICE_MS)?;
    }

    // Linger: receive what the host sends to the tap, re-posting each buffer.
    let until = Instant::now() + opts.linger;
    loop {
        dev.reap_rx(&mut rx_done, &mut report)?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        dev.wait_call((left.as_millis() as i32).clamp(1, POLL_SLICE_MS))?;
    }
    // `dev` is dropped before `tap`: closing /dev/vhost-net stops the worker and drops its
    // reference to the tap's file; then the tap's last fd closes and the device goes away.
    drop(dev);
    drop(tap);
    Ok(report)
}

// ---- the tap ----------------------------------------------------------------------------

/// Layout of `struct ifreq` for the requests used here: the name, then a 24-byte union
/// (`ifr_flags` is its first short, `ifr_hwaddr` a `struct sockaddr`).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }
}

/// A non-persistent tap whose frames carry a 12-byte virtio-net header.
struct VnetTap {
    file: File,
    name: String,
}

impl VnetTap {
    fn create(name: &str) -> Result<VnetTap> {
        if name.is_empty() || name.len() > MAX_IFNAME || name.contains(['/', ' ', '\0']) {
            bail!("invalid interface name {name:?}");
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .context("cannot open /dev/net/tun (tun module?)")?;
        let mut req = IfReq::new(name);
        // IFF_VNET_HDR: every frame read or written is preceded by a virtio_net_hdr, which
        // vhost-net passes through unchanged (sock_hlen = header size, vhost_hlen = 0).
        // No IFF_PERSIST: the device lives as long as an fd (ours or vhost's) refers to it.
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        req.data[..2].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq; `req` has its layout and size.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } != 0 {
            return Err(ioctl_error("TUNSETIFF", &format!("creating tap {name}")));
        }
        let got_len = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(libc::IFNAMSIZ);
        if &req.name[..got_len] != name.as_bytes() {
            bail!(
                "kernel created tap {:?} instead of {name:?}",
                String::from_utf8_lossy(&req.name[..got_len])
            );
        }
        // The tun default is 10 bytes (struct virtio_net_hdr); ours has num_buffers too.
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } != 0 {
            return Err(ioctl_error("TUNSETVNETHDRSZ", &format!("on tap {name}")));
        }
        Ok(VnetTap {
            file,
            name: name.to_string(),
        })
    }

    /// Sets the link up (SIOCSIFFLAGS |= IFF_UP) and returns its MAC address, the
    /// destination of the TX frames (as a guest addressing its gateway on the host).
    fn up_and_mac(&self) -> Result<[u8; 6]> {
        // SAFETY: plain socket(2); the fd is owned right away.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error()).context("socket(AF_INET) for interface ioctls");
        }
        // SAFETY: `raw` is a fresh fd nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq::new(&self.name);
        // SAFETY: SIOCGIFFLAGS fills ifr_flags of a struct ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } != 0 {
            return Err(ioctl_error("SIOCGIFFLAGS", &format!("on {}", self.name)));
        }
        let flags = i16::from_ne_bytes([req.data[0], req.data[1]]) | libc::IFF_UP as i16;
        req.data[..2].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: SIOCSIFFLAGS reads ifr_flags of a struct ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) } != 0 {
            return Err(ioctl_error(
                "SIOCSIFFLAGS",
                &format!("setting {} up", self.name),
            ));
        }
        let mut req = IfReq::new(&self.name);
        // SAFETY: SIOCGIFHWADDR fills ifr_hwaddr (sa_family, then the address in sa_data).
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
            return Err(ioctl_error("SIOCGIFHWADDR", &format!("on {}", self.name)));
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&req.data[2..8]);
        Ok(mac)
    }
}

// ---- guest memory and split rings -------------------------------------------------------

/// The anonymous mapping that stands for guest memory: rings and buffers.
struct Region {
    base: *mut u8,
    len: usize,
}

impl Region {
    fn new(len: usize) -> Result<Region> {
        // SAFETY: anonymous private mapping, no fd; checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("mmap of {len} bytes for the rings"));
        }
        Ok(Region {
            base: p.cast(),
            len,
        })
    }

    fn addr(&self, offset: usize) -> u64 {
        self.base as u64 + offset as u64
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; vhost no longer uses it (the
        // Device closes /dev/vhost-net before its Region is dropped).
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Byte offsets of one split ring's parts, each on its own page (vhost needs 16-byte
/// alignment for the descriptor table, 2 for avail, 4 for used).
#[derive(Clone, Copy)]
struct RingLayout {
    desc: usize,
    avail: usize,
    used: usize,
}

impl RingLayout {
    const PAGES: usize = 3;

    fn at(offset: usize) -> RingLayout {
        // desc: 16 B × 256 = one page; avail: 4 + 2 × 256 (+2 used_event); used: 4 + 8 × 256 (+2).
        const _: () = assert!(16 * RING_SIZE as usize <= PAGE);
        const _: () = assert!(6 + 8 * RING_SIZE as usize <= PAGE);
        RingLayout {
            desc: offset,
            avail: offset + PAGE,
            used: offset + 2 * PAGE,
        }
    }
}

/// The driver side of one split virtqueue in the region.
struct Ring {
    base: *mut u8,
    layout: RingLayout,
    /// Next avail index to publish (the driver's shadow of avail->idx).
    avail_idx: u16,
    /// Next used entry to read.
    last_used: u16,
}

impl Ring {
    /// Writes descriptor `id` (single buffer, no chaining).
    fn set_desc(&mut self, id: u16, addr: u64, len: u32, flags: u16) {
        assert!(id < RING_SIZE);
        // struct vring_desc { le64 addr; le32 len; le16 flags; le16 next; }
        // SAFETY: inside this ring's descriptor page; only the driver writes descriptors.
        unsafe {
            let d = self.base.add(self.layout.desc + 16 * id as usize);
            std::ptr::write_volatile(d.cast::<u64>(), addr.to_le());
            std::ptr::write_volatile(d.add(8).cast::<u32>(), len.to_le());
            std::ptr::write_volatile(d.add(12).cast::<u16>(), flags.to_le());
            std::ptr::write_volatile(d.add(14).cast::<u16>(), 0);
        }
    }

    /// Adds descriptor `id` to the avail ring (visible to vhost after `publish`).
    fn push_avail(&mut self, id: u16) {
        let slot = self.avail_idx % RING_SIZE;
        // struct vring_avail { le16 flags; le16 idx; le16 ring[]; }
        // SAFETY: ring[slot] inside the avail page; vhost reads it only after idx moves past.
        unsafe {
            let p = self.base.add(self.layout.avail + 4 + 2 * slot as usize);
            std::ptr::write_volatile(p.cast::<u16>(), id.to_le());
        }
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Stores avail->idx after the entries and descriptors (release: vhost reads the idx,
    /// then, after its smp_rmb, the ring entries).
    fn publish(&self) {
        fence(Ordering::Release);
        self.idx_at(self.layout.avail + 2)
            .store(self.avail_idx.to_le(), Ordering::Release);
    }

    /// Takes the next used entry, if vhost has added one: (descriptor id, bytes written).
    fn pop_used(&mut self) -> Option<(u16, u32)> {
        // struct vring_used { le16 flags; le16 idx; struct { le32 id; le32 len; } ring[]; }
        let idx = u16::from_le(self.idx_at(self.layout.used + 2).load(Ordering::Acquire));
        if idx == self.last_used {
            return None;
        }
        let slot = self.last_used % RING_SIZE;
        // SAFETY: ring[slot] inside the used page, written by vhost before it stored idx.
        let (id, len) = unsafe {
            let e = self.base.add(self.layout.used + 4 + 8 * slot as usize);
            (
                u32::from_le(std::ptr::read_volatile(e.cast::<u32>())),
                u32::from_le(std::ptr::read_volatile(e.add(4).cast::<u32>())),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some((id as u16, len))
    }

    fn idx_at(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: a 2-byte-aligned u16 inside the region, which outlives the Ring; shared
        // with the kernel, hence accessed atomically.
        unsafe { &*self.base.add(offset).cast::<AtomicU16>() }
    }
}

#[derive(Clone, Copy)]
enum Queue {
    Rx = 0,
    Tx = 1,
}

/// /dev/vhost-net set up with both queues on a tap. Field order is drop order: the vhost
/// fd closes first (vhost_net_release stops the worker and drops the backend), then the
/// eventfds, then the memory is unmapped.
struct Device {
    /// Held open for the device's lifetime only; every request is made in `open`.
    _vhost: File,
    kick: [OwnedFd; 2],
    call: [OwnedFd; 2],
    features: u64,
    rx: Ring,
    tx: Ring,
    rx_buf: usize,
    tx_buf: usize,
    region: Region,
}

impl Device {
    fn open(tap: &VnetTap) -> Result<Device> {
        let rx_layout = RingLayout::at(0);
        let tx_layout = RingLayout::at(RingLayout::PAGES * PAGE);
        let rx_buf = 2 * RingLayout::PAGES * PAGE;
        let tx_buf = rx_buf + RING_SIZE as usize * RX_BUF;
        let len = (tx_buf + RING_SIZE as usize * TX_SLOT).next_multiple_of(PAGE);
        let region = Region::new(len)?;
        let vhost = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/vhost-net")
            .context("cannot open /dev/vhost-net (load the vhost_net module; it exists only on kernels built with CONFIG_VHOST_NET)")?;
        let fd = vhost.as_raw_fd();
        vhost_ioctl(
            fd,
            VHOST_SET_OWNER,
            std::ptr::null_mut::<u8>(),
            "VHOST_SET_OWNER",
        )?;
        let mut offered = 0u64;
        vhost_ioctl(fd, VHOST_GET_FEATURES, &mut offered, "VHOST_GET_FEATURES")?;
        if offered & WANTED_FEATURES != WANTED_FEATURES {
            bail!(
                "/dev/vhost-net offers features {offered:#x}, without VIRTIO_F_VERSION_1 and VIRTIO_NET_F_MRG_RXBUF ({WANTED_FEATURES:#x})"
            );
        }
        let mut features = WANTED_FEATURES;
        vhost_ioctl(fd, VHOST_SET_FEATURES, &mut features, "VHOST_SET_FEATURES")?;
        // One region, identity-mapped: descriptor addresses (guest-physical) equal the
        // userspace addresses, so the kernel's translation is the identity.
        let mut mem = VhostMemoryOne {
            header: VhostMemoryHeader {
                nregions: 1,
                padding: 0,
            },
            region: VhostMemoryRegion {
                guest_phys_addr: region.addr(0),
                memory_size: region.len as u64,
                userspace_addr: region.addr(0),
                flags_padding: 0,
            },
        };
        vhost_ioctl(fd, VHOST_SET_MEM_TABLE, &mut mem, "VHOST_SET_MEM_TABLE")?;
        let eventfd = |what: &str| -> Result<OwnedFd> {
            // SAFETY: eventfd(2) with constant flags; the fd is owned right away.
            let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if raw < 0 {
                return Err(io::Error::last_os_error())
                    .with_context(|| format!("eventfd for {what}"));
            }
            // SAFETY: fresh fd.
            Ok(unsafe { OwnedFd::from_raw_fd(raw) })
        };
        let kick = [eventfd("RX kick")?, eventfd("TX kick")?];
        let call = [eventfd("RX call")?, eventfd("TX call")?];
        for (q, layout) in [(Queue::Rx, rx_layout), (Queue::Tx, tx_layout)] {
            let index = q as u32;
            let name = |ioctl: &str| format!("{ioctl} (queue {index})");
            let mut num = VhostVringState {
                index,
                num: RING_SIZE as u32,
            };
            vhost_ioctl(
                fd,
                VHOST_SET_VRING_NUM,
                &mut num,
                &name("VHOST_SET_VRING_NUM"),
            )?;
            let mut base = VhostVringState { index, num: 0 };
            vhost_ioctl(
                fd,
                VHOST_SET_VRING_BASE,
                &mut base,
                &name("VHOST_SET_VRING_BASE"),
            )?;
            let mut addr = VhostVringAddr {
                index,
                flags: 0,
                desc_user_addr: region.addr(layout.desc),
                used_user_addr: region.addr(layout.used),
                avail_user_addr: region.addr(layout.avail),
                log_guest_addr: 0,
            };
            vhost_ioctl(
                fd,
                VHOST_SET_VRING_ADDR,
                &mut addr,
                &name("VHOST_SET_VRING_ADDR"),
            )?;
            let mut k = VhostVringFile {
                index,
                fd: kick[q as usize].as_raw_fd(),
            };
            vhost_ioctl(
                fd,
                VHOST_SET_VRING_KICK,
                &mut k,
                &name("VHOST_SET_VRING_KICK"),
            )?;
            let mut c = VhostVringFile {
                index,
                fd: call[q as usize].as_raw_fd(),
            };
            vhost_ioctl(
                fd,
                VHOST_SET_VRING_CALL,
                &mut c,
                &name("VHOST_SET_VRING_CALL"),
            )?;
        }
        // Attaching the backend checks the rings (vq_access_ok), reads used->idx and starts
        // polling the tap's socket for RX. vhost takes its own reference to the tap file.
        for q in [Queue::Rx, Queue::Tx] {
            let mut b = VhostVringFile {
                index: q as u32,
                fd: tap.file.as_raw_fd(),
            };
            let what = format!(
                "VHOST_NET_SET_BACKEND (queue {}, tap {})",
                q as u32, tap.name
            );
            vhost_ioctl(fd, VHOST_NET_SET_BACKEND, &mut b, &what)?;
        }
        let ring = |layout| Ring {
            base: region.base,
            layout,
            avail_idx: 0,
            last_used: 0,
        };
        Ok(Device {
            rx: ring(rx_layout),
            tx: ring(tx_layout),
            _vhost: vhost,
            kick,
            call,
            features,
            rx_buf,
            tx_buf,
            region,
        })
    }

    /// Makes RX buffer `id` device-writable and available (publish separately).
    fn post_rx(&mut self, id: u16) {
        let addr = self.region.addr(self.rx_buf + id as usize * RX_BUF);
        self.rx
            .set_desc(id, addr, RX_BUF as u32, VRING_DESC_F_WRITE);
        self.rx.push_avail(id);
    }

    /// Copies `header + frame` into TX slot `id` and makes it available (publish separately).
    fn post_tx(&mut self, id: u16, frame: &[u8; FRAME_LEN]) {
        let off = self.tx_buf + id as usize * TX_SLOT;
        // SAFETY: slot `id` lies inside the region; vhost reads it only once it is
        // available and this slot is not reused before vhost returned it on the used ring.
        unsafe {
            let p = self.region.base.add(off);
            // A zeroed virtio_net_hdr: no checksum offload, no GSO.
            std::ptr::write_bytes(p, 0, VNET_HDR_LEN);
            std::ptr::copy_nonoverlapping(frame.as_ptr(), p.add(VNET_HDR_LEN), FRAME_LEN);
        }
        let addr = self.region.addr(off);
        self.tx
            .set_desc(id, addr, (VNET_HDR_LEN + FRAME_LEN) as u32, 0);
        self.tx.push_avail(id);
    }

    /// The Ethernet frame in RX buffer `id`, `len` bytes written by vhost (header included).
    fn rx_frame(&self, id: u16, len: u32) -> &[u8] {
        let len = (len as usize).min(RX_BUF);
        if (id as usize) >= RING_SIZE as usize || len < VNET_HDR_LEN {
            return &[];
        }
        // SAFETY: inside RX buffer `id`, which vhost has returned and does not write again
        // until it is re-posted.
        let buf = unsafe {
            std::slice::from_raw_parts(
                self.region.base.add(self.rx_buf + id as usize * RX_BUF),
                len,
            )
        };
        &buf[VNET_HDR_LEN..]
    }

    /// Hands every filled RX buffer to `done`, re-posts it and kicks if any was re-posted.
    fn reap_rx(
        &mut self,
        done: &mut impl FnMut(&Device, u16, u32, &mut VhostReport),
        report: &mut VhostReport,
    ) -> Result<()> {
        let mut any = false;
        while let Some((id, len)) = self.rx.pop_used() {
            if id >= RING_SIZE {
                bail!("rx: vhost returned descriptor id {id}, beyond the ring of {RING_SIZE}");
            }
            done(self, id, len, report);
            self.post_rx(id);
            any = true;
        }
        if any {
            self.rx.publish();
            self.kick(Queue::Rx)?;
        }
        Ok(())
    }

    /// Notifies vhost that queue `q` has new avail entries (its worker polls the eventfd).
    fn kick(&self, q: Queue) -> Result<()> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to our eventfd.
        let n = unsafe { libc::write(self.kick[q as usize].as_raw_fd(), one.as_ptr().cast(), 8) };
        if n != 8 {
            return Err(io::Error::last_os_error()).context("write to the kick eventfd");
        }
        Ok(())
    }

    /// Waits up to `ms` for vhost to signal either call eventfd, and clears them.
    fn wait_call(&self, ms: i32) -> Result<()> {
        let mut pfds = self.call.each_ref().map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: two valid pollfds.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), 2, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e).context("poll on the call eventfds");
            }
        }
        for p in pfds.iter().filter(|p| p.revents & libc::POLLIN != 0) {
            let mut v = [0u8; 8];
            // SAFETY: an 8-byte read from our non-blocking eventfd (resets its counter).
            unsafe { libc::read(p.fd, v.as_mut_ptr().cast(), 8) };
        }
        Ok(())
    }
}

/// An ioctl on /dev/vhost-net; the error names the request and the errno.
fn vhost_ioctl<T>(fd: RawFd, req: libc::c_ulong, arg: *mut T, what: &str) -> Result<()> {
    // SAFETY: `req` is one of the vhost requests above and `arg` points to the struct
    // (or u64) whose size is encoded in it, or is null for _IO requests.
    if unsafe { libc::ioctl(fd, req, arg) } != 0 {
        return Err(ioctl_error(what, "on /dev/vhost-net"));
    }
    Ok(())
}

/// "`NAME` `context` failed: EFAULT (Bad address)" from the current errno.
fn ioctl_error(name: &str, context: &str) -> anyhow::Error {
    let e = io::Error::last_os_error();
    let code = e.raw_os_error().unwrap_or(0);
    let errno = errno_name(code).map_or_else(|| format!("errno {code}"), str::to_string);
    let msg = e.to_string();
    let text = msg.split(" (os error").next().unwrap_or(&msg);
    anyhow::anyhow!("ioctl {name} {context} failed: {errno} ({text})")
}

fn errno_name(code: i32) -> Option<&'static str> {
    Some(match code {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EBADF => "EBADF",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOTTY => "ENOTTY",
        libc::E2BIG => "E2BIG",
        libc::ENOBUFS => "ENOBUFS",
        libc::ENXIO => "ENXIO",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTSOCK => "ENOTSOCK",
        _ => return None,
    })
}

// ---- frames -----------------------------------------------------------------------------

/// A locally administered unicast MAC derived from the source address: 02:00 + its octets.
pub fn local_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x00, o[0], o[1], o[2], o[3]]
}

/// One 64-byte Ethernet/IPv4/UDP frame (ports 40000 → 9000), `seq` in the IP id and the
/// payload; both checksums filled in.
pub fn build_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    seq: u32,
) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (FRAME_LEN - 14) as u16;
    let udp_len = ip_len - 20;
    {
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = libc::IPPROTO_UDP as u8;
        ip[12..16].copy_from_slice(&src.octets());
        ip[16..20].copy_from_slice(&dst.octets());
        let sum = inet_checksum(ip, 0);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
    }
    f[34..36].copy_from_slice(&UDP_SRC_PORT.to_be_bytes());
    f[36..38].copy_from_slice(&UDP_DST_PORT.to_be_bytes());
    f[38..40].copy_from_slice(&udp_len.to_be_bytes());
    f[42..54].copy_from_slice(b"vtrace-vhost");
    f[54..58].copy_from_slice(&seq.to_be_bytes());
    // UDP checksum over the pseudo-header (addresses, protocol, length) and the datagram.
    let mut pseudo = 0u32;
    for w in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    pseudo += libc::IPPROTO_UDP as u32 + u32::from(udp_len);
    let sum = match inet_checksum(&f[34..], pseudo) {
        0 => 0xffff,
        s => s,
    };
    f[40..42].copy_from_slice(&sum.to_be_bytes());
    f
}

/// RFC 1071 checksum of `data`, starting from a partial sum.
fn inet_checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for w in data.chunks(2) {
        let hi = u32::from(w[0]) << 8;
        sum += hi | w.get(1).map_or(0, |&b| u32::from(b));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether `frame` is an IPv4 ICMP echo request to `to`.
fn is_echo_request_to(frame: &[u8], to: Ipv4Addr) -> bool {
    if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] {
        return false;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    ip[0] >> 4 == 4
        && ihl >= 20
        && ip.len() > ihl
        && ip[9] == libc::IPPROTO_ICMP as u8
        && ip[16..20] == to.octets()
        && ip[ihl] == 8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values as strace and QEMU's vhost backend show them on x86-64.
        assert_eq!(VHOST_GET_FEATURES, 0x8008_af00);
        assert_eq!(VHOST_SET_FEATURES, 0x4008_af00);
        assert_eq!(VHOST_SET_OWNER, 0xaf01);
        assert_eq!(VHOST_SET_MEM_TABLE, 0x4008_af03);
        assert_eq!(VHOST_SET_VRING_NUM, 0x4008_af10);
        assert_eq!(VHOST_SET_VRING_ADDR, 0x4028_af11);
        assert_eq!(VHOST_SET_VRING_BASE, 0x4008_af12);
        assert_eq!(VHOST_SET_VRING_KICK, 0x4008_af20);
        assert_eq!(VHOST_SET_VRING_CALL, 0x4008_af21);
        assert_eq!(VHOST_NET_SET_BACKEND, 0x4008_af30);
    }

    #[test]
    fn frame_has_valid_checksums() {
        let src = Ipv4Addr::new(198, 18, 6, 2);
        let dst = Ipv4Addr::new(198, 18, 6, 1);
        let f = build_frame(local_mac(src), [0xff; 6], src, dst, 7);
        assert_eq!(&f[6..12], &[2, 0, 198, 18, 6, 2]);
        // A correct header sums (with its checksum) to 0xffff, i.e. checksum 0.
        assert_eq!(inet_checksum(&f[14..34], 0), 0);
        let mut pseudo = 0u32;
        for w in [198u16 << 8 | 18, 6 << 8 | 2, 198 << 8 | 18, 6 << 8 | 1] {
            pseudo += u32::from(w);
        }
        pseudo += 17 + 30;
        assert_eq!(inet_checksum(&f[34..], pseudo), 0);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 50);
        assert!(!is_echo_request_to(&f, src));
    }

    #[test]
    fn recognises_echo_requests() {
        let mut f = [0u8; 98];
        f[12] = 0x08;
        f[14] = 0x45;
        f[14 + 9] = 1;
        f[30..34].copy_from_slice(&[198, 18, 6, 2]);
        f[34] = 8;
        assert!(is_echo_request_to(&f, Ipv4Addr::new(198, 18, 6, 2)));
        assert!(!is_echo_request_to(&f, Ipv4Addr::new(198, 18, 6, 3)));
        f[34] = 0;
        assert!(!is_echo_request_to(&f, Ipv4Addr::new(198, 18, 6, 2)));
    }
}
