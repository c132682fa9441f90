//! A 64-byte UDP load generator between two lab namespaces.
//!
//! The sender and the receiver are threads of this process, each moved into its
//! namespace with `setns` (see [`crate::netns`]) before it opens its socket. The sender
//! pushes batches of datagrams with `sendmmsg` (one syscall per batch) for the given
//! duration; the receiver drains its socket with `recvmmsg` until shortly after the
//! sender has stopped. With the default 18-byte payload, every datagram is a minimum
//! size Ethernet frame on the wire: 14 (Ethernet) + 20 (IPv4) + 8 (UDP) + 18 + 4 (FCS)
//! = 64 bytes.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::netns;
use crate::topology::is_lab_addr;

/// Payload that makes a 64-byte frame on the wire.
pub const DEFAULT_PAYLOAD_LEN: usize = 18;
/// Datagrams per `sendmmsg`/`recvmmsg` call by default.
pub const DEFAULT_BATCH: usize = 64;
/// Largest payload that still fits one 1500-byte MTU frame.
pub const MAX_PAYLOAD_LEN: usize = 1472;
/// Kernel limit on messages per `sendmmsg` (UIO_MAXIOV).
const MAX_BATCH: usize = 1024;
/// The receiver stops once nothing arrived for this long after the sender finished...
const GRACE: Duration = Duration::from_millis(200);
/// ...and at the latest this long after the sender finished.
const MAX_GRACE: Duration = Duration::from_secs(2);
/// Receive buffer asked for (SO_RCVBUFFORCE, which root may use beyond rmem_max).
const RCVBUF: libc::c_int = 64 << 20;
const RECV_BUF_LEN: usize = 2048;

/// What to send, from where, to where, for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FloodOptions {
    /// Namespace of the sending thread (e.g. `lab.native().sender_ns`).
    pub sender_ns: String,
    /// Namespace of the receiving thread; `dst` must be one of its addresses.
    pub receiver_ns: String,
    /// Destination; must be in 198.18.0.0/15.
    pub dst: SocketAddrV4,
    /// How long the sender sends.
    pub duration: Duration,
    /// UDP payload bytes per datagram (18 → 64-byte frames). The first up to 8 bytes
    /// hold a little-endian sequence number, so every datagram differs.
    pub payload_len: usize,
    /// Datagrams per `sendmmsg` call.
    pub batch: usize,
}

impl FloodOptions {
    /// 1 second of 64-byte frames in batches of 64.
    pub fn new(
        sender_ns: impl Into<String>,
        receiver_ns: impl Into<String>,
        dst: SocketAddrV4,
    ) -> Self {
        FloodOptions {
            sender_ns: sender_ns.into(),
            receiver_ns: receiver_ns.into(),
            dst,
            duration: Duration::from_secs(1),
            payload_len: DEFAULT_PAYLOAD_LEN,
            batch: DEFAULT_BATCH,
        }
    }
}

/// Result of a flood.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FloodReport {
    /// Datagrams the kernel accepted from the sender.
    pub sent: u64,
    /// Datagrams the receiver got.
    pub received: u64,
    /// How long the sender sent.
    pub elapsed: Duration,
    /// `sent / elapsed`.
    pub sent_pps: f64,
    /// `received / elapsed`.
    pub received_pps: f64,
    /// `sendmmsg` calls that failed transiently (ENOBUFS, EAGAIN, ECONNREFUSED).
    pub send_errors: u64,
}

impl FloodReport {
    /// The report as one JSON object.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"sent\":{},\"received\":{},\"elapsed_s\":{:.6},\"sent_pps\":{:.1},\"received_pps\":{:.1},\"send_errors\":{}}}",
            self.sent,
            self.received,
            self.elapsed.as_secs_f64(),
            self.sent_pps,
            self.received_pps,
            self.send_errors
        )
    }
}

/// Sends 64-byte (by default) UDP datagrams from `sender_ns` to `dst` in `receiver_ns`
/// as fast as possible for `duration`, and counts what arrives.
pub fn flood(opts: FloodOptions) -> Result<FloodReport> {
    check(&opts)?;
    let done = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel::<()>();

    let receiver = {
        let (ns, dst, done) = (opts.receiver_ns.clone(), opts.dst, done.clone());
        std::thread::Builder::new()
            .name("flood-recv".into())
            .spawn(move || -> Result<u64> {
                netns::enter(&ns)?;
                receive(dst, ready_tx, &done)
            })
            .context("cannot spawn the receiver thread")?
    };
    // The receiver drops `ready_tx` without sending if its setup fails.
    if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        done.store(true, Ordering::Relaxed);
        return match receiver.join() {
            Ok(Err(e)) => Err(e.context(format!("receiver in {}", opts.receiver_ns))),
            Ok(Ok(_)) | Err(_) => Err(anyhow!(
                "the receiver in {} did not start",
                opts.receiver_ns
            )),
        };
    }

    let sender = {
        let opts = opts.clone();
        std::thread::Builder::new()
            .name("flood-send".into())
            .spawn(move || -> Result<SendResult> {
                netns::enter(&opts.sender_ns)?;
                send(&opts)
            })
            .context("cannot spawn the sender thread")
    };
    let sent = match sender {
        Ok(h) => h
            .join()
            .map_err(|_| anyhow!("the sender thread panicked"))
            .and_then(|r| r),
        Err(e) => Err(e),
    };
    done.store(true, Ordering::Relaxed);
    let received = receiver
        .join()
        .map_err(|_| anyhow!("the receiver thread panicked"))
        .and_then(|r| r)
        .with_context(|| format!("receiver in {}", opts.receiver_ns));
    let sent = sent.with_context(|| format!("sender in {}", opts.sender_ns))?;
    let received = received?;

    let secs = sent.elapsed.as_secs_f64().max(1e-9);
    Ok(FloodReport {
        sent: sent.sent,
        received,
        elapsed: sent.elapsed,
        sent_pps: sent.sent as f64 / secs,
        received_pps: received as f64 / secs,
        send_errors: sent.errors,
    })
}

fn check(opts: &FloodOptions) -> Result<()> {
    let ip: Ipv4Addr = *opts.dst.ip();
    if !is_lab_addr(ip) {
        bail!("refusing to flood {ip}: lab traffic stays within 198.18.0.0/15");
    }
    if opts.dst.port() == 0 {
        bail!("destination port must not be 0");
    }
    if opts.payload_len > MAX_PAYLOAD_LEN {
        bail!(
            "payload of {} bytes does not fit one frame (max {MAX_PAYLOAD_LEN})",
            opts.payload_len
        );
    }
    if opts.batch == 0 || opts.batch > MAX_BATCH {
        bail!("batch must be within 1..={MAX_BATCH}");
    }
    if opts.duration.is_zero() {
        bail!("duration must be positive");
    }
    Ok(())
}

struct SendResult {
    sent: u64,
    errors: u64,
    elapsed: Duration,
}

fn send(opts: &FloodOptions) -> Result<SendResult> {
    let sock = UdpSocket::bind("0.0.0.0:0").context("cannot bind the sender socket")?;
    sock.connect(opts.dst)
        .with_context(|| format!("cannot connect the sender socket to {}", opts.dst))?;
    let fd = sock.as_raw_fd();

    let (len, batch) = (opts.payload_len, opts.batch);
    // One contiguous buffer holding `batch` payloads; all access goes through `base`.
    let mut payloads = vec![0u8; len * batch];
    let base = payloads.as_mut_ptr();
    let mut iovecs: Vec<libc::iovec> = (0..batch)
        .map(|i| libc::iovec {
            // SAFETY: i * len is within `payloads` (or 0 for an empty payload).
            iov_base: unsafe { base.add(i * len) }.cast(),
            iov_len: len,
        })
        .collect();
    // SAFETY: an all-zero mmsghdr is valid (no address, no control data).
    let mut msgs: Vec<libc::mmsghdr> = (0..batch).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, iov) in msgs.iter_mut().zip(iovecs.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let stamp = len.min(8);

    let (mut seq, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < opts.duration {
        for i in 0..batch {
            let bytes = (seq + i as u64).to_le_bytes();
            // SAFETY: writes `stamp` ≤ len bytes at the start of payload i.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(i * len), stamp) };
        }
        // SAFETY: `msgs` holds `batch` headers whose iovecs point into `payloads`,
        // both alive for the call. The socket is connected, so no address is needed.
        let rc = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), batch as libc::c_uint, 0) };
        if rc > 0 {
            seq += rc as u64;
            continue;
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => {}
            // Queue full or the receiver's port momentarily unreachable: keep going.
            Some(libc::ENOBUFS | libc::EAGAIN | libc::ECONNREFUSED) => {
                errors += 1;
                std::thread::yield_now();
            }
            _ => return Err(anyhow!("sendmmsg to {}: {err}", opts.dst)),
        }
    }
    let elapsed = start.elapsed();
    drop(payloads);
    Ok(SendResult {
        sent: seq,
        errors,
        elapsed,
    })
}

fn receive(dst: SocketAddrV4, ready: mpsc::Sender<()>, done: &AtomicBool) -> Result<u64> {
    let sock = UdpSocket::bind(dst)
        .with_context(|| format!("cannot bind the receiver socket to {dst}"))?;
    let fd = sock.as_raw_fd();
    set_rcvbuf(fd);

    let batch = DEFAULT_BATCH;
    let mut bufs = vec![0u8; RECV_BUF_LEN * batch];
    let base = bufs.as_mut_ptr();
    let mut iovecs: Vec<libc::iovec> = (0..batch)
        .map(|i| libc::iovec {
            // SAFETY: within `bufs`.
            iov_base: unsafe { base.add(i * RECV_BUF_LEN) }.cast(),
            iov_len: RECV_BUF_LEN,
        })
        .collect();
    // SAFETY: an all-zero mmsghdr is valid.
    let mut msgs: Vec<libc::mmsghdr> = (0..batch).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, iov) in msgs.iter_mut().zip(iovecs.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    // The sender may start now.
    let _ = ready.send(());

    let mut received = 0u64;
    let mut last_rx = Instant::now();
    let mut done_seen: Option<Instant> = None;
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, 20) };
        if rc > 0 {
            loop {
                // SAFETY: `msgs` holds `batch` headers pointing into `bufs`.
                let n = unsafe {
                    libc::recvmmsg(
                        fd,
                        msgs.as_mut_ptr(),
                        batch as libc::c_uint,
                        libc::MSG_DONTWAIT,
                        std::ptr::null_mut(),
                    )
                };
                if n > 0 {
                    received += n as u64;
                    last_rx = Instant::now();
                    continue;
                }
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EAGAIN | libc::EINTR) => break,
                    _ => return Err(anyhow!("recvmmsg on {dst}: {err}")),
                }
            }
        }
        if done_seen.is_none() && done.load(Ordering::Relaxed) {
            done_seen = Some(Instant::now());
        }
        if let Some(t) = done_seen {
            let quiet = last_rx.max(t).elapsed() >= GRACE;
            if quiet || t.elapsed() >= MAX_GRACE {
                break;
            }
        }
    }
    drop(bufs);
    Ok(received)
}

/// A big receive buffer so bursts are not dropped while the receiver is descheduled.
fn set_rcvbuf(fd: libc::c_int) {
    let size = RCVBUF;
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let p = (&size as *const libc::c_int).cast();
    // SAFETY: setsockopt with a c_int option value.
    unsafe {
        if libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, p, len) != 0 {
            // Not privileged: the normal option, capped at net.core.rmem_max.
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, p, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_payload_makes_64_byte_frames() {
        assert_eq!(14 + 20 + 8 + DEFAULT_PAYLOAD_LEN + 4, 64);
    }

    #[test]
    fn refuses_destinations_outside_the_lab_block() {
        for dst in ["10.0.0.1:9", "198.20.0.1:9", "127.0.0.1:9"] {
            let dst: SocketAddrV4 = dst.parse().expect("addr");
            let err = flood(FloodOptions::new("a", "b", dst)).expect_err("must refuse");
            assert!(format!("{err}").contains("198.18.0.0/15"), "{err}");
        }
    }

    #[test]
    fn checks_options() {
        let dst: SocketAddrV4 = "198.18.0.2:9000".parse().expect("addr");
        let ok = FloodOptions::new("a", "b", dst);
        assert!(check(&ok).is_ok());
        assert!(check(&FloodOptions {
            batch: 0,
            ..ok.clone()
        })
        .is_err());
        assert!(check(&FloodOptions {
            payload_len: 2000,
            ..ok.clone()
        })
        .is_err());
        assert!(check(&FloodOptions {
            duration: Duration::ZERO,
            ..ok.clone()
        })
        .is_err());
        assert!(check(&FloodOptions {
            dst: "198.18.0.2:0".parse().expect("addr"),
            ..ok
        })
        .is_err());
    }

    #[test]
    fn json_report() {
        let r = FloodReport {
            sent: 10,
            received: 9,
            elapsed: Duration::from_millis(500),
            sent_pps: 20.0,
            received_pps: 18.0,
            send_errors: 0,
        };
        assert_eq!(
            r.to_json(),
            "{\"sent\":10,\"received\":9,\"elapsed_s\":0.500000,\"sent_pps\":20.0,\"received_pps\":18.0,\"send_errors\":0}"
        );
    }
}
