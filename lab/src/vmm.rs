//! A VMM-like frame forwarder between two tap devices.
//!
//! A tap device is the host side of a guest NIC: frames the host stack sends *to* the
//! tap (here: frames the bridge forwards to it) are queued for the process holding the
//! tap's file descriptor, which `read`s them, and frames that process `write`s are
//! injected into the host stack as if received on the tap. QEMU's virtio-net backend
//! does exactly this for a guest NIC; a guest that bridges its two NICs therefore
//! produces, on the host, the data path tap A → VMM read → VMM write → tap B. [`Vmm`]
//! reproduces that data path without a guest: one thread per direction reads a frame
//! from one tap and writes it to the other.
//!
//! The kernel queue between the host stack and the reader is the *tun ring*: a
//! `ptr_ring` of socket buffers per tap queue, sized by the device's `txqueuelen`
//! (500 by default for tun/tap). `tun_net_xmit` puts frames into it; when the reader is
//! too slow and the ring is full, the frame is dropped with drop reason
//! `SKB_DROP_REASON_FULL_RING` and counted in the tap's `tx_dropped`.
//! [`VmmOptions::read_pause`] makes the reader slow on purpose, and
//! [`VmmOptions::tap_queue_len`] sets the ring size.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::names::MAX_IFNAME;

/// How long a forwarder thread waits for a frame before checking whether it must stop.
const POLL_TIMEOUT_MS: i32 = 50;
/// Larger than any frame a tap can hand out (no GSO/vnet header is negotiated, so
/// frames are at most MTU + Ethernet header; 64 KiB leaves room for jumbo MTUs).
const FRAME_BUF: usize = 65536;

/// Behaviour of the forwarder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmmOptions {
    /// Sleep before each frame is written to the other tap. Makes the VMM stage
    /// dominant in latency (e.g. 200 µs); each ping round trip crosses it twice.
    pub per_frame_delay: Duration,
    /// Sleep between consecutive reads of a tap (read pacing). Under load the tun ring
    /// fills up and the kernel drops with reason FULL_RING in `tun_net_xmit`.
    pub read_pause: Duration,
    /// The taps' `txqueuelen`, i.e. the tun ring size; `None` keeps the default (500).
    pub tap_queue_len: Option<u32>,
}

/// Counters of a running [`Vmm`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmmStats {
    /// Frames read from `tap_in` and written to `tap_out`.
    pub in_to_out: u64,
    /// Frames read from `tap_out` and written to `tap_in`.
    pub out_to_in: u64,
    /// Frames the VMM read but could not write to the other tap.
    pub dropped: u64,
    /// Failed reads (not counting "no frame ready").
    pub read_errors: u64,
    /// Frames the kernel dropped because `tap_in`'s tun ring was full (its `tx_dropped`).
    pub tap_in_ring_drops: u64,
    /// Frames the kernel dropped because `tap_out`'s tun ring was full (its `tx_dropped`).
    pub tap_out_ring_drops: u64,
}

/// Layout of `struct ifreq` as far as TUNSETIFF uses it: the name and `ifr_flags`,
/// padded to the kernel's 40 bytes.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A tap device owned by this process. Non-persistent: the kernel removes the device
/// when the last file descriptor attached to it is closed, which happens when the
/// `Tap` is dropped and also when the process dies for any reason.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates tap device `name` in the calling thread's network namespace.
    pub fn create(name: &str) -> Result<Tap> {
        if name.is_empty() || name.len() > MAX_IFNAME || name.contains(['/', ' ', '\0']) {
            bail!("invalid interface name {name:?}");
        }
        // Non-blocking so the forwarder can poll with a timeout and drain the ring
        // until EAGAIN; close-on-exec so children (`ip`, `ping`) do not keep the tap.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .context("cannot open /dev/net/tun")?;
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            // IFF_TAP: Ethernet frames (a tun device would carry bare IP packets).
            // IFF_NO_PI: no 4-byte "packet information" header (flags + ethertype)
            // before each frame, so reads and writes are exactly one Ethernet frame.
            // No IFF_PERSIST, hence the device lives only as long as the fd.
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq; `req` has its layout and size.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            let hint = match err.raw_os_error() {
                Some(libc::EBUSY) => " (a tap of that name is in use)",
                Some(libc::EINVAL) => " (a non-tap device of that name probably exists)",
                Some(libc::EPERM) => " (needs CAP_NET_ADMIN)",
                _ => "",
            };
            bail!("cannot create tap {name}: TUNSETIFF: {err}{hint}");
        }
        let got_len = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let got = String::from_utf8_lossy(&req.name[..got_len]).into_owned();
        if got != name {
            bail!("kernel created tap {got:?} instead of {name:?}");
        }
        Ok(Tap { file, name: got })
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (non-blocking: `WouldBlock` when the ring is empty).
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame; the kernel injects it as received on this tap.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }

    /// Waits up to `timeout_ms` for a readable frame.
    fn wait_readable(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        match rc {
            0 => Ok(false),
            n if n > 0 => {
                if pfd.revents & libc::POLLIN != 0 {
                    Ok(true)
                } else {
                    Err(io::Error::other(format!(
                        "poll on tap {}: revents {:#x}",
                        self.name, pfd.revents
                    )))
                }
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }
}

#[derive(Default)]
struct Counters {
    in_to_out: AtomicU64,
    out_to_in: AtomicU64,
    dropped: AtomicU64,
    read_errors: AtomicU64,
}

/// The forwarder: frames read from `tap_in` are written to `tap_out` and vice versa,
/// one thread per direction. Dropping it stops the threads (within the poll timeout,
/// ≤ 50 ms), closes the fds and so removes both taps.
pub struct Vmm {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    counters: Arc<Counters>,
    tap_in: String,
    tap_out: String,
}

impl Vmm {
    /// Starts forwarding between two taps (already configured and up, or not: frames
    /// only arrive once they are up).
    pub fn start(tap_in: Tap, tap_out: Tap, opts: &VmmOptions) -> Result<Vmm> {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let names = (tap_in.name.clone(), tap_out.name.clone());
        let tap_in = Arc::new(tap_in);
        let tap_out = Arc::new(tap_out);
        let mut vmm = Vmm {
            stop: stop.clone(),
            threads: Vec::new(),
            counters: counters.clone(),
            tap_in: names.0,
            tap_out: names.1,
        };
        for (src, dst, forward_in_to_out) in [
            (tap_in.clone(), tap_out.clone(), true),
            (tap_out, tap_in, false),
        ] {
            let stop = stop.clone();
            let counters = counters.clone();
            let opts = opts.clone();
            let thread_name = if forward_in_to_out {
                "vmm-in>out"
            } else {
                "vmm-out>in"
            };
            // On error `vmm` is dropped, which stops the thread already started.
            let handle = std::thread::Builder::new()
                .name(thread_name.into())
                .spawn(move || forward(&src, &dst, forward_in_to_out, &counters, &opts, &stop))
                .with_context(|| format!("cannot spawn VMM thread {thread_name}"))?;
            vmm.threads.push(handle);
        }
        Ok(vmm)
    }

    /// Current counters.
    pub fn stats(&self) -> VmmStats {
        let c = &self.counters;
        VmmStats {
            in_to_out: c.in_to_out.load(Ordering::Relaxed),
            out_to_in: c.out_to_in.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            read_errors: c.read_errors.load(Ordering::Relaxed),
            tap_in_ring_drops: tx_dropped(&self.tap_in),
            tap_out_ring_drops: tx_dropped(&self.tap_out),
        }
    }

    /// Names of the taps, `(tap_in, tap_out)`.
    pub fn taps(&self) -> (&str, &str) {
        (&self.tap_in, &self.tap_out)
    }

    /// Stops the forwarding threads and waits for them; the taps disappear once the
    /// last thread has dropped its handles. Idempotent.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The tap's kernel `tx_dropped` counter (ring overflows), 0 if unreadable.
fn tx_dropped(dev: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{dev}/statistics/tx_dropped"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Lets short sleeps (per-frame delay, read pause) be close to what was asked: the
/// default timer slack of 50 µs would lengthen every sleep by up to that much.
fn tighten_timer_slack() {
    const PR_SET_TIMERSLACK: libc::c_int = 29;
    // SAFETY: prctl with integer arguments; affects only the calling thread.
    unsafe {
        libc::prctl(
            PR_SET_TIMERSLACK,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        );
    }
}

fn forward(
    src: &Tap,
    dst: &Tap,
    in_to_out: bool,
    c: &Counters,
    opts: &VmmOptions,
    stop: &AtomicBool,
) {
    tighten_timer_slack();
    let forwarded = if in_to_out {
        &c.in_to_out
    } else {
        &c.out_to_in
    };
    let mut buf = vec![0u8; FRAME_BUF];
    while !stop.load(Ordering::Relaxed) {
        match src.wait_readable(POLL_TIMEOUT_MS) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => {
                // E.g. the tap is being torn down; avoid spinning on a persistent error.
                c.read_errors.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(POLL_TIMEOUT_MS as u64));
                continue;
            }
        }
        // Drain what is queued in the tun ring, one frame per read.
        while !stop.load(Ordering::Relaxed) {
            let n = match src.read_frame(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    c.read_errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            };
            if !opts.per_frame_delay.is_zero() {
                std::thread::sleep(opts.per_frame_delay);
            }
            match dst.write_frame(&buf[..n]) {
                Ok(_) => forwarded.fetch_add(1, Ordering::Relaxed),
                Err(_) => c.dropped.fetch_add(1, Ordering::Relaxed),
            };
            if !opts.read_pause.is_zero() {
                std::thread::sleep(opts.read_pause);
            }
        }
    }
}
