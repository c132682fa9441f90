//! The record file format, version 2: what `vtrace record` writes and `vtrace report` reads.
//! (Version 2: function-tier hook numbers 32-40 and per-hook counter rows.)
//!
//! A record file is self-contained: device names, drop reasons and drop locations are resolved
//! when recording, so a file can be reported on another machine, kernel or vtrace build (of the
//! same format version). Every integer is little-endian; there is no padding.
//!
//! ```text
//! file     = magic version frame* ;
//! magic    = "VTRACE-REC\0"                  11 bytes
//! version  = u16                             format version, 1 here
//! frame    = kind:u8 len:u32 payload[len] crc:u32
//!            crc: CRC-32 (IEEE 802.3, as zlib's crc32) of kind, len and payload
//! str      = len:u32 UTF-8[len]
//! ```
//!
//! The first frame is the header, then device and hop frames in the order they arrived, then
//! the trailer, the last frame; nothing follows it.
//!
//! | kind | frame   | payload |
//! |------|---------|---------|
//! | 0x01 | header  | vtrace_version:str kernel_release:str (uname -r) hostname:str boot_id:str clock:str start_mono_ns:u64 start_unix_ns:u64 sample_every:u32 flags:u32 (`vtrace_common::flags`) ring_kib:u32 command:str |
//! | 0x02 | device  | id:u32 ifindex:u32 netns:u32 ifname:[u8;16] (NUL-padded) name:str (resolved: `name` or `name@netns`) |
//! | 0x03 | hop     | ts_ns:u64 skb:u64 fingerprint:u64 location:u64 device:u32 cpu:u32 len:u32 reason:u32 flags:u32 hook:u8 (53 bytes) |
//! | 0x04 | trailer | duration_s:f64 end_mono_ns:u64 hop_events:u64 counters:(n:u32 u64[n]) drops:(n:u32 drop[n]) ifaces:(n:u32 iface[n]) notes:(n:u32 str[n]), then (added later in version 2, absent from older files) drop_devices:(n:u32 u8[n]) drivers:(n:u32 driver[n]) |
//!
//! - `clock`: a note on the hop timestamps: `CLOCK_MONOTONIC` (`bpf_ktime_get_ns`), nanoseconds
//!   since this boot (`boot_id`) not counting suspend; `start_mono_ns` and `start_unix_ns` are
//!   the same instant on that clock and on the wall clock, to place hops in wall time.
//! - Device ids count from 1, one per (ifname, netns, ifindex) seen; `ifindex` 0 is a hop
//!   without a device (a reader's copy, a free).
//! - A hop's `device` is the id of a device frame written before it; `hook` is the
//!   `vtrace_common::Hook` number; `flags` are `vtrace_common::hop_flags` (`FIRST`: the kernel
//!   started tracking the skb here); `location` and `reason` are set for `kfree_skb` only.
//! - `counters` are the kernel's `COUNTERS` slots in `vtrace_common` order: one row of
//!   `COUNTERS_PER_HOOK` per `Hook` value (`counter_slot`), each row packets, lost events,
//!   failed tracking inserts, failed drop inserts, sampled, unparsed, emitted events.
//! - `drop = iface:str reason:str location:str reason_code:u32 count:u64`: every reason,
//!   including those that are not losses (`NOT_DROPPED_YET`, `CONSUMED`; `report` leaves them
//!   out); `location` is `func+0x1b3 [module]` (or the bare address when kallsyms could not
//!   name it).
//! - `iface = name:str rx_dropped:u64 tx_dropped:u64 rx_missed_errors:u64 rx_fifo_errors:u64
//!   tx_fifo_errors:u64`: the device's own counters, deltas over the recording (devices of
//!   the recording host's own network namespace; only the `--iface` ones when given).
//! - `drop_devices`: one per drop, in order: 0 = the drop's device is `skb->dev` at the drop,
//!   1 = the skb had none and it is the device it last arrived on (`skb->skb_iif`).
//! - `driver = iface:str role:str function:str module:str (empty: built in) calls:u64
//!   has_napi:u8 napi_packets:u64 napi_budget_exhausted:u64 hook:str (empty: none) tier:str`:
//!   the driver functions discovered while recording (`vtrace drops`' driver table).
//! - `hop_events` is the number of hop frames before the trailer (a consistency check).
//!
//! Compatible additions within a version append fields at the end of a payload: readers skip
//! payload bytes they do not know. Anything else (a new frame kind, a new hook number, a changed
//! field) needs a new version; a reader refuses other versions.
//!
//! A file without its trailer was cut short (vtrace killed, disk full): what it holds up to the
//! last whole frame is still readable.

use std::{
    collections::HashSet,
    fmt,
    io::{self, Read, Write},
};

use vtrace_common::{Hook, IFNAMSIZ};

use crate::discovery::{DriverFunction, NapiRounds};

/// The first bytes of every record file.
pub const MAGIC: &[u8; 11] = b"VTRACE-REC\0";
/// The format version this vtrace writes and reads.
pub const VERSION: u16 = 2;
/// What the hop timestamps are.
pub const CLOCK_NOTE: &str = "CLOCK_MONOTONIC (bpf_ktime_get_ns): ns since boot (boot_id), \
not counting suspend; start_mono_ns and start_unix_ns are the same instant";

const KIND_HEADER: u8 = 0x01;
const KIND_DEVICE: u8 = 0x02;
const KIND_HOP: u8 = 0x03;
const KIND_TRAILER: u8 = 0x04;
/// Bytes of a version-1 hop payload.
pub const HOP_LEN: u32 = 53;
/// Bounds on payload lengths, to tell a corrupt length from a real frame.
const MAX_HOP: u32 = 1024;
const MAX_DEVICE: u32 = 64 * 1024;
const MAX_FRAME: u32 = 256 << 20;
/// Bytes around a payload: kind, length, checksum.
const FRAME_OVERHEAD: u64 = 1 + 4 + 4;

/// The first frame: where and how the recording was made.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    pub vtrace_version: String,
    /// `uname -r` of the recording host.
    pub kernel_release: String,
    pub hostname: String,
    /// `/proc/sys/kernel/random/boot_id`: the boot the timestamps count from.
    pub boot_id: String,
    /// What the timestamps are ([`CLOCK_NOTE`]).
    pub clock: String,
    /// CLOCK_MONOTONIC at the start, ns.
    pub start_mono_ns: u64,
    /// The wall clock at the same instant, ns since the Unix epoch.
    pub start_unix_ns: u64,
    /// 1 packet in N was timed.
    pub sample_every: u32,
    /// `vtrace_common::flags` of the tracer.
    pub flags: u32,
    pub ring_kib: u32,
    /// The command line that made the file.
    pub command: String,
}

/// A device, named once; hops refer to it by `id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub id: u32,
    pub ifindex: u32,
    pub netns: u32,
    pub ifname: [u8; IFNAMSIZ],
    /// As users see it: `tap0`, or `eth0@vm-a` in another network namespace.
    pub name: String,
}

/// One packet at one hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hop {
    pub ts_ns: u64,
    pub skb: u64,
    pub fingerprint: u64,
    pub location: u64,
    pub device: u32,
    pub cpu: u32,
    pub len: u32,
    pub reason: u32,
    /// `vtrace_common::hop_flags` bits.
    pub flags: u32,
    pub hook: Hook,
}

/// A drop row, names resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropRecord {
    pub iface: String,
    pub reason: String,
    pub location: String,
    pub reason_code: u32,
    pub count: u64,
    /// The skb had no device at the drop: `iface` is the one it last arrived on.
    pub arrival: bool,
}

/// A device's own drop counters, deltas over the recording.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IfaceCounters {
    pub iface: String,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    pub rx_missed_errors: u64,
    pub rx_fifo_errors: u64,
    pub tx_fifo_errors: u64,
}

/// The last frame: what is only known at the end.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trailer {
    pub duration_s: f64,
    pub end_mono_ns: u64,
    /// Hop frames in the file (the writer fills it in).
    pub hop_events: u64,
    /// `vtrace_common` counter slots, in order.
    pub counters: Vec<u64>,
    pub drops: Vec<DropRecord>,
    pub ifaces: Vec<IfaceCounters>,
    /// Problems met while recording (e.g. the drop table could not be read).
    pub notes: Vec<String>,
    /// Driver functions discovered while recording.
    pub drivers: Vec<DriverFunction>,
}

/// A frame after the header.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Device(Device),
    Hop(Hop),
    Trailer(Trailer),
}

/// Why a file cannot be read (further). Displayed as one line, without the file name.
#[derive(Debug)]
pub enum FormatError {
    /// Not a record file at all.
    NotARecord(String),
    /// A record file of another format version.
    Version(u16),
    /// The file ends inside a frame (or before the header is complete).
    Truncated { at: u64, frame: u64, what: String },
    /// A frame that cannot be what the writer wrote.
    Corrupt { at: u64, frame: u64, what: String },
    /// The file could not be read.
    Io { at: u64, err: io::Error },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::NotARecord(why) => write!(f, "not a vtrace record file ({why})"),
            FormatError::Version(v) => write!(
                f,
                "written by format version {v}, this vtrace reads version {VERSION}{}",
                if *v > VERSION {
                    " (use a newer vtrace)"
                } else {
                    " (use the vtrace that wrote it)"
                }
            ),
            FormatError::Truncated { at, frame, what } => {
                write!(f, "truncated at byte {at} (frame {frame}: {what})")
            }
            FormatError::Corrupt { at, frame, what } => {
                write!(f, "corrupt at byte {at} (frame {frame}: {what})")
            }
            FormatError::Io { at, err } => write!(f, "read error at byte {at}: {err}"),
        }
    }
}

impl std::error::Error for FormatError {}

// ---------------------------------------------------------------------------------------------
// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), as zlib's crc32().

const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// Continues a CRC-32 over `bytes` (start with 0).
pub fn crc32(crc: u32, bytes: &[u8]) -> u32 {
    let mut c = !crc;
    for b in bytes {
        c = CRC_TABLE[((c ^ *b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

// ---------------------------------------------------------------------------------------------
// Writing.

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_str(b: &mut Vec<u8>, s: &str) {
    put_u32(b, s.len() as u32);
    b.extend_from_slice(s.as_bytes());
}

/// Writes a record file: the header at once, then frames as they come.
pub struct Writer<W: Write> {
    out: W,
    payload: Vec<u8>,
    bytes: u64,
    hops: u64,
    devices: u64,
}

impl<W: Write> Writer<W> {
    /// Writes the magic, the version and the header frame.
    pub fn new(mut out: W, header: &Header) -> io::Result<Writer<W>> {
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        let mut w = Writer {
            out,
            payload: Vec::with_capacity(256),
            bytes: (MAGIC.len() + 2) as u64,
            hops: 0,
            devices: 0,
        };
        let p = &mut w.payload;
        put_str(p, &header.vtrace_version);
        put_str(p, &header.kernel_release);
        put_str(p, &header.hostname);
        put_str(p, &header.boot_id);
        put_str(p, &header.clock);
        put_u64(p, header.start_mono_ns);
        put_u64(p, header.start_unix_ns);
        put_u32(p, header.sample_every);
        put_u32(p, header.flags);
        put_u32(p, header.ring_kib);
        put_str(p, &header.command);
        w.emit(KIND_HEADER)?;
        Ok(w)
    }

    fn emit(&mut self, kind: u8) -> io::Result<()> {
        let len = u32::try_from(self.payload.len())
            .ok()
            .filter(|l| *l <= MAX_FRAME)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
        let head = {
            let mut h = [0u8; 5];
            h[0] = kind;
            h[1..].copy_from_slice(&len.to_le_bytes());
            h
        };
        let crc = crc32(crc32(0, &head), &self.payload);
        self.out.write_all(&head)?;
        self.out.write_all(&self.payload)?;
        self.out.write_all(&crc.to_le_bytes())?;
        self.bytes += FRAME_OVERHEAD + len as u64;
        self.payload.clear();
        Ok(())
    }

    pub fn device(&mut self, d: &Device) -> io::Result<()> {
        let p = &mut self.payload;
        put_u32(p, d.id);
        put_u32(p, d.ifindex);
        put_u32(p, d.netns);
        p.extend_from_slice(&d.ifname);
        put_str(p, &d.name);
        self.devices += 1;
        self.emit(KIND_DEVICE)
    }

    pub fn hop(&mut self, h: &Hop) -> io::Result<()> {
        let p = &mut self.payload;
        put_u64(p, h.ts_ns);
        put_u64(p, h.skb);
        put_u64(p, h.fingerprint);
        put_u64(p, h.location);
        put_u32(p, h.device);
        put_u32(p, h.cpu);
        put_u32(p, h.len);
        put_u32(p, h.reason);
        put_u32(p, h.flags);
        p.push(h.hook as u32 as u8);
        self.hops += 1;
        self.emit(KIND_HOP)
    }

    /// Writes the trailer (`hop_events` is this writer's count) and flushes.
    pub fn trailer(&mut self, t: &Trailer) -> io::Result<()> {
        let p = &mut self.payload;
        put_u64(p, t.duration_s.to_bits());
        put_u64(p, t.end_mono_ns);
        put_u64(p, self.hops);
        put_u32(p, t.counters.len() as u32);
        for c in &t.counters {
            put_u64(p, *c);
        }
        put_u32(p, t.drops.len() as u32);
        for d in &t.drops {
            put_str(p, &d.iface);
            put_str(p, &d.reason);
            put_str(p, &d.location);
            put_u32(p, d.reason_code);
            put_u64(p, d.count);
        }
        put_u32(p, t.ifaces.len() as u32);
        for i in &t.ifaces {
            put_str(p, &i.iface);
            for v in [
                i.rx_dropped,
                i.tx_dropped,
                i.rx_missed_errors,
                i.rx_fifo_errors,
                i.tx_fifo_errors,
            ] {
                put_u64(p, v);
            }
        }
        put_u32(p, t.notes.len() as u32);
        for n in &t.notes {
            put_str(p, n);
        }
        put_u32(p, t.drops.len() as u32);
        for d in &t.drops {
            p.push(u8::from(d.arrival));
        }
        put_u32(p, t.drivers.len() as u32);
        for d in &t.drivers {
            put_str(p, &d.iface);
            put_str(p, &d.role);
            put_str(p, &d.function);
            put_str(p, d.module.as_deref().unwrap_or(""));
            put_u64(p, d.calls);
            let napi = d.napi.unwrap_or(NapiRounds {
                packets: 0,
                budget_exhausted: 0,
            });
            p.push(u8::from(d.napi.is_some()));
            put_u64(p, napi.packets);
            put_u64(p, napi.budget_exhausted);
            put_str(p, d.hook.as_deref().unwrap_or(""));
            put_str(p, &d.tier);
        }
        self.emit(KIND_TRAILER)?;
        self.out.flush()
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// Bytes written so far (some may still sit in a buffer of `W`).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn hops(&self) -> u64 {
        self.hops
    }

    pub fn devices(&self) -> u64 {
        self.devices
    }

    pub fn get_ref(&self) -> &W {
        &self.out
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub fn into_inner(self) -> W {
        self.out
    }
}

// ---------------------------------------------------------------------------------------------
// Reading.

/// A bounds-checked cursor over one payload; errors are the "what" of a corrupt frame.
struct Cur<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        match self.i.checked_add(n) {
            Some(end) if end <= self.b.len() => {
                let s = &self.b[self.i..end];
                self.i = end;
                Ok(s)
            }
            _ => Err(format!(
                "{what} runs past the end of the frame's {} bytes",
                self.b.len()
            )),
        }
    }
    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let s = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn str(&mut self, what: &str) -> Result<String, String> {
        let n = self.u32(what)? as usize;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }
    fn at_end(&self) -> bool {
        self.i >= self.b.len()
    }
    /// A count of items of at least `min_size` bytes each, checked against what is left.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize, String> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min_size) > self.b.len() - self.i {
            return Err(format!(
                "{what}: {n} entries cannot fit in {} bytes",
                self.b.len() - self.i
            ));
        }
        Ok(n)
    }
}

fn parse_header(p: &[u8]) -> Result<Header, String> {
    let mut c = Cur { b: p, i: 0 };
    Ok(Header {
        vtrace_version: c.str("vtrace_version")?,
        kernel_release: c.str("kernel_release")?,
        hostname: c.str("hostname")?,
        boot_id: c.str("boot_id")?,
        clock: c.str("clock")?,
        start_mono_ns: c.u64("start_mono_ns")?,
        start_unix_ns: c.u64("start_unix_ns")?,
        sample_every: c.u32("sample_every")?,
        flags: c.u32("flags")?,
        ring_kib: c.u32("ring_kib")?,
        command: c.str("command")?,
    })
}

fn parse_device(p: &[u8]) -> Result<Device, String> {
    let mut c = Cur { b: p, i: 0 };
    let id = c.u32("id")?;
    let ifindex = c.u32("ifindex")?;
    let netns = c.u32("netns")?;
    let mut ifname = [0u8; IFNAMSIZ];
    ifname.copy_from_slice(c.take(IFNAMSIZ, "ifname")?);
    let name = c.str("name")?;
    Ok(Device {
        id,
        ifindex,
        netns,
        ifname,
        name,
    })
}

fn parse_hop(p: &[u8]) -> Result<Hop, String> {
    let mut c = Cur { b: p, i: 0 };
    let ts_ns = c.u64("ts_ns")?;
    let skb = c.u64("skb")?;
    let fingerprint = c.u64("fingerprint")?;
    let location = c.u64("location")?;
    let device = c.u32("device")?;
    let cpu = c.u32("cpu")?;
    let len = c.u32("len")?;
    let reason = c.u32("reason")?;
    let flags = c.u32("flags")?;
    let code = c.u8("hook")?;
    let hook = Hook::from_u32(code as u32).ok_or_else(|| format!("unknown hook {code}"))?;
    Ok(Hop {
        ts_ns,
        skb,
        fingerprint,
        location,
        device,
        cpu,
        len,
        reason,
        flags,
        hook,
    })
}

fn parse_trailer(p: &[u8]) -> Result<Trailer, String> {
    let mut c = Cur { b: p, i: 0 };
    let duration_s = f64::from_bits(c.u64("duration_s")?);
    if !duration_s.is_finite() || duration_s < 0.0 {
        return Err(format!("duration {duration_s} s"));
    }
    let end_mono_ns = c.u64("end_mono_ns")?;
    let hop_events = c.u64("hop_events")?;
    let mut counters = Vec::new();
    for _ in 0..c.count(8, "counters")? {
        counters.push(c.u64("counter")?);
    }
    let mut drops = Vec::new();
    for _ in 0..c.count(4 * 3 + 4 + 8, "drops")? {
        drops.push(DropRecord {
            iface: c.str("drop iface")?,
            reason: c.str("drop reason")?,
            location: c.str("drop location")?,
            reason_code: c.u32("drop reason code")?,
            count: c.u64("drop count")?,
            arrival: false,
        });
    }
    let mut ifaces = Vec::new();
    for _ in 0..c.count(4 + 5 * 8, "ifaces")? {
        ifaces.push(IfaceCounters {
            iface: c.str("iface name")?,
            rx_dropped: c.u64("rx_dropped")?,
            tx_dropped: c.u64("tx_dropped")?,
            rx_missed_errors: c.u64("rx_missed_errors")?,
            rx_fifo_errors: c.u64("rx_fifo_errors")?,
            tx_fifo_errors: c.u64("tx_fifo_errors")?,
        });
    }
    let mut notes = Vec::new();
    for _ in 0..c.count(4, "notes")? {
        notes.push(c.str("note")?);
    }
    // Added later in version 2: older files end here.
    let mut drivers = Vec::new();
    if !c.at_end() {
        let n = c.count(1, "drop devices")?;
        if n != drops.len() {
            return Err(format!("{n} drop devices for {} drops", drops.len()));
        }
        for d in drops.iter_mut() {
            d.arrival = match c.u8("drop device")? {
                0 => false,
                1 => true,
                v => return Err(format!("drop device {v}")),
            };
        }
        for _ in 0..c.count(4 * 6 + 8 * 3 + 1, "drivers")? {
            let opt = |s: String| (!s.is_empty()).then_some(s);
            let iface = c.str("driver iface")?;
            let role = c.str("driver role")?;
            let function = c.str("driver function")?;
            let module = opt(c.str("driver module")?);
            let calls = c.u64("driver calls")?;
            let has_napi = c.u8("driver napi")? != 0;
            let napi = NapiRounds {
                packets: c.u64("napi packets")?,
                budget_exhausted: c.u64("napi budget exhausted")?,
            };
            drivers.push(DriverFunction {
                iface,
                role,
                function,
                module,
                calls,
                napi: has_napi.then_some(napi),
                hook: opt(c.str("driver hook")?),
                tier: c.str("driver tier")?,
            });
        }
    }
    Ok(Trailer {
        duration_s,
        end_mono_ns,
        hop_events,
        counters,
        drops,
        ifaces,
        notes,
        drivers,
    })
}

/// Reads a record file frame by frame, checking each (length, checksum, content, device
/// references, order). Never panics, whatever the bytes.
pub struct Reader<R: Read> {
    inner: R,
    /// Bytes consumed so far.
    pos: u64,
    /// The file's size when known, to tell a cut file from a corrupt length early.
    size: Option<u64>,
    /// Frames read (the header is frame 1).
    frames: u64,
    header_read: bool,
    trailer_read: bool,
    devices: HashSet<u32>,
    hops: u64,
    payload: Vec<u8>,
}

/// Reads until `buf` is full or the input ends; returns how many bytes came.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        KIND_HEADER => "header",
        KIND_DEVICE => "device",
        KIND_HOP => "hop event",
        KIND_TRAILER => "trailer",
        _ => "unknown",
    }
}

impl<R: Read> Reader<R> {
    /// `size`: the file's length when known (a regular file), for clearer errors.
    pub fn new(inner: R, size: Option<u64>) -> Reader<R> {
        Reader {
            inner,
            pos: 0,
            size,
            frames: 0,
            header_read: false,
            trailer_read: false,
            devices: HashSet::new(),
            hops: 0,
            payload: Vec::new(),
        }
    }

    /// Byte offset of the next unread byte.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Hop frames read so far.
    pub fn hops(&self) -> u64 {
        self.hops
    }

    fn io(&self, err: io::Error) -> FormatError {
        FormatError::Io { at: self.pos, err }
    }

    /// Reads the magic, the version and the header frame. Call first, once.
    pub fn header(&mut self) -> Result<Header, FormatError> {
        let mut start = [0u8; 13];
        let n = fill(&mut self.inner, &mut start).map_err(|e| self.io(e))?;
        self.pos = n as u64;
        let got = &start[..n];
        let magic_part = &got[..n.min(MAGIC.len())];
        if n == 0 {
            return Err(FormatError::NotARecord("empty file".into()));
        }
        if magic_part != &MAGIC[..magic_part.len()] {
            let shown: Vec<String> = got.iter().take(8).map(|b| format!("{b:02x}")).collect();
            return Err(FormatError::NotARecord(format!(
                "starts with {}, not VTRACE-REC",
                shown.join(" ")
            )));
        }
        if n < start.len() {
            return Err(FormatError::Truncated {
                at: n as u64,
                frame: 1,
                what: "in the magic and version".into(),
            });
        }
        let version = u16::from_le_bytes([start[11], start[12]]);
        if version != VERSION {
            return Err(FormatError::Version(version));
        }
        match self.frame()? {
            Some((KIND_HEADER, at)) => {
                let h = parse_header(&self.payload).map_err(|what| FormatError::Corrupt {
                    at,
                    frame: 1,
                    what: format!("header: {what}"),
                })?;
                self.header_read = true;
                Ok(h)
            }
            Some((kind, at)) => Err(FormatError::Corrupt {
                at,
                frame: 1,
                what: format!("a {} frame where the header belongs", kind_name(kind)),
            }),
            None => Err(FormatError::Truncated {
                at: self.pos,
                frame: 1,
                what: "the header is missing".into(),
            }),
        }
    }

    /// Reads one raw frame into `self.payload`: its kind and start offset, or None at a clean
    /// end of file (between frames).
    fn frame(&mut self) -> Result<Option<(u8, u64)>, FormatError> {
        let at = self.pos;
        let frame = self.frames + 1;
        let mut head = [0u8; 5];
        let n = fill(&mut self.inner, &mut head).map_err(|e| self.io(e))?;
        self.pos += n as u64;
        if n == 0 {
            return Ok(None);
        }
        let kind = head[0];
        let truncated = |what: String| FormatError::Truncated { at, frame, what };
        let corrupt = |what: String| FormatError::Corrupt { at, frame, what };
        if !matches!(kind, KIND_HEADER | KIND_DEVICE | KIND_HOP | KIND_TRAILER) {
            return Err(corrupt(format!("unknown frame kind 0x{kind:02x}")));
        }
        if n < head.len() {
            return Err(truncated(format!(
                "a {} frame cut in its length field",
                kind_name(kind)
            )));
        }
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        let (min, max) = match kind {
            KIND_HOP => (HOP_LEN, MAX_HOP),
            KIND_DEVICE => (12 + IFNAMSIZ as u32 + 4, MAX_DEVICE),
            _ => (0, MAX_FRAME),
        };
        if len < min || len > max {
            return Err(corrupt(format!(
                "a {} frame of {len} bytes (expected {})",
                kind_name(kind),
                if kind == KIND_HOP {
                    format!("{HOP_LEN}")
                } else {
                    format!("{min} to {max}")
                }
            )));
        }
        if let Some(size) = self.size {
            let need = len as u64 + 4;
            let left = size.saturating_sub(self.pos);
            if need > left {
                return Err(truncated(format!(
                    "a {} frame of {len} bytes, {} of its bytes are missing",
                    kind_name(kind),
                    need - left
                )));
            }
        }
        self.payload.clear();
        // Grows with the bytes that actually come, whatever the length says.
        let got = (&mut self.inner)
            .take(len as u64)
            .read_to_end(&mut self.payload)
            .map_err(|e| self.io(e))?;
        self.pos += got as u64;
        let mut crc_bytes = [0u8; 4];
        let c = if got == len as usize {
            let c = fill(&mut self.inner, &mut crc_bytes).map_err(|e| self.io(e))?;
            self.pos += c as u64;
            c
        } else {
            0
        };
        if got < len as usize || c < 4 {
            return Err(truncated(format!(
                "a {} frame of {len} bytes cut short",
                kind_name(kind)
            )));
        }
        let crc = crc32(crc32(0, &head), &self.payload);
        if crc != u32::from_le_bytes(crc_bytes) {
            return Err(corrupt(format!(
                "a {} frame of {len} bytes fails its checksum",
                kind_name(kind)
            )));
        }
        self.frames += 1;
        Ok(Some((kind, at)))
    }

    /// The next frame after the header, or None at the end of the file (whether the trailer
    /// came before is for the caller to see).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FormatError> {
        if !self.header_read {
            self.header()?;
        }
        if self.trailer_read {
            let at = self.pos;
            let mut one = [0u8; 1];
            return match fill(&mut self.inner, &mut one).map_err(|e| self.io(e))? {
                0 => Ok(None),
                _ => Err(FormatError::Corrupt {
                    at,
                    frame: self.frames + 1,
                    what: "data after the trailer".into(),
                }),
            };
        }
        let Some((kind, at)) = self.frame()? else {
            return Ok(None);
        };
        let frame = self.frames;
        let corrupt = |what: String| FormatError::Corrupt { at, frame, what };
        let name = kind_name(kind);
        let wrap = |what: String| corrupt(format!("{name}: {what}"));
        match kind {
            KIND_DEVICE => {
                let d = parse_device(&self.payload).map_err(wrap)?;
                if !self.devices.insert(d.id) {
                    return Err(corrupt(format!("device {} defined twice", d.id)));
                }
                Ok(Some(Frame::Device(d)))
            }
            KIND_HOP => {
                let h = parse_hop(&self.payload).map_err(wrap)?;
                if !self.devices.contains(&h.device) {
                    return Err(corrupt(format!(
                        "hop event on device {}, which no earlier frame defines",
                        h.device
                    )));
                }
                self.hops += 1;
                Ok(Some(Frame::Hop(h)))
            }
            KIND_TRAILER => {
                let t = parse_trailer(&self.payload).map_err(wrap)?;
                if t.hop_events != self.hops {
                    return Err(corrupt(format!(
                        "the trailer counts {} hop events, the file holds {}",
                        t.hop_events, self.hops
                    )));
                }
                self.trailer_read = true;
                Ok(Some(Frame::Trailer(t)))
            }
            _ => Err(corrupt("a second header".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_zlib() {
        // The check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32(0, b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(crc32(0, b"1234"), b"56789"), 0xCBF4_3926);
    }

    fn header() -> Header {
        Header {
            vtrace_version: "0.1.0".into(),
            kernel_release: "6.1.0".into(),
            hostname: "h".into(),
            boot_id: "b".into(),
            clock: CLOCK_NOTE.into(),
            start_mono_ns: 1,
            start_unix_ns: 2,
            sample_every: 1,
            flags: 3,
            ring_kib: 4096,
            command: "vtrace record -o x".into(),
        }
    }

    fn sample_file() -> Vec<u8> {
        let mut w = Writer::new(Vec::new(), &header()).unwrap();
        w.device(&Device {
            id: 1,
            ifindex: 2,
            netns: 3,
            ifname: vtrace_common::ifname_bytes(b"eth0"),
            name: "eth0".into(),
        })
        .unwrap();
        for i in 0..3u64 {
            w.hop(&Hop {
                ts_ns: 10 + i,
                skb: 0x100,
                fingerprint: 7,
                location: 0,
                device: 1,
                cpu: 0,
                len: 98,
                reason: 0,
                flags: 0,
                hook: Hook::NetDevQueue,
            })
            .unwrap();
        }
        w.trailer(&Trailer {
            duration_s: 1.5,
            counters: vec![1, 2, 3],
            drops: vec![DropRecord {
                iface: "eth0".into(),
                reason: "NO_SOCKET".into(),
                location: "f+0x1".into(),
                reason_code: 3,
                count: 9,
                arrival: true,
            }],
            ifaces: vec![IfaceCounters {
                iface: "eth0".into(),
                rx_dropped: 1,
                ..Default::default()
            }],
            notes: vec!["n".into()],
            drivers: vec![sample_driver()],
            ..Default::default()
        })
        .unwrap();
        w.into_inner()
    }

    fn sample_driver() -> DriverFunction {
        DriverFunction {
            iface: "eth0".into(),
            role: "napi_poll".into(),
            function: "virtnet_poll".into(),
            module: Some("virtio_net".into()),
            calls: 12,
            napi: Some(NapiRounds {
                packets: 40,
                budget_exhausted: 1,
            }),
            hook: Some("virtnet_poll".into()),
            tier: "refused: fentry: EPERM".into(),
        }
    }

    fn read_all(bytes: &[u8], known_size: bool) -> (Vec<Frame>, Result<(), FormatError>) {
        let size = known_size.then_some(bytes.len() as u64);
        let mut r = Reader::new(bytes, size);
        let mut frames = Vec::new();
        if let Err(e) = r.header() {
            return (frames, Err(e));
        }
        loop {
            match r.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => return (frames, Ok(())),
                Err(e) => return (frames, Err(e)),
            }
        }
    }

    #[test]
    fn round_trip() {
        let bytes = sample_file();
        let mut r = Reader::new(&bytes[..], None);
        assert_eq!(r.header().unwrap(), header());
        let (frames, end) = read_all(&bytes, true);
        end.unwrap();
        assert_eq!(frames.len(), 5);
        match &frames[4] {
            Frame::Trailer(t) => {
                assert_eq!(t.hop_events, 3);
                assert_eq!(t.duration_s, 1.5);
                assert_eq!(t.drops[0].count, 9);
                assert!(t.drops[0].arrival);
                assert_eq!(t.ifaces[0].rx_dropped, 1);
                assert_eq!(t.drivers, vec![sample_driver()]);
            }
            f => panic!("{f:?}"),
        }
    }

    /// Files written before the trailer gained drop devices and drivers end after the notes:
    /// they still read, with every drop at its own device and no drivers.
    #[test]
    fn a_trailer_without_the_later_fields_still_reads() {
        let mut w = Writer::new(Vec::new(), &header()).unwrap();
        w.trailer(&Trailer {
            duration_s: 2.0,
            notes: vec!["old".into()],
            ..Default::default()
        })
        .unwrap();
        let mut bytes = w.into_inner();
        // The trailer is the last frame: kind, len, payload, crc. Without drops or drivers the
        // later fields are two zero counts, the last 8 payload bytes: cut them, re-seal.
        let crc_at = bytes.len() - 4;
        bytes.drain(crc_at - 8..);
        let start = bytes.iter().rposition(|b| *b == 0x04).unwrap();
        let len = (bytes.len() - start - 5) as u32;
        bytes[start + 1..start + 5].copy_from_slice(&len.to_le_bytes());
        let crc = crc32(0, &bytes[start..]);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let (frames, end) = read_all(&bytes, true);
        end.unwrap();
        match frames.last() {
            Some(Frame::Trailer(t)) => {
                assert_eq!(t.notes, vec!["old".to_string()]);
                assert!(t.drivers.is_empty());
            }
            f => panic!("{f:?}"),
        }
    }

    /// Every cut and every flipped byte gives an error or a shorter, consistent read: no
    /// panic, and a cut file still yields every frame before the cut.
    #[test]
    fn every_cut_and_every_flip_is_an_error_not_a_panic() {
        let bytes = sample_file();
        let (full, _) = read_all(&bytes, true);
        for cut in 0..bytes.len() {
            for known in [true, false] {
                let (frames, end) = read_all(&bytes[..cut], known);
                assert!(frames.len() <= full.len());
                assert_eq!(frames[..], full[..frames.len()]);
                if frames.len() < full.len() {
                    // A cut at a frame boundary reads cleanly up to there, without the trailer.
                    if let Err(e) = end {
                        let s = e.to_string();
                        assert!(
                            s.starts_with("truncated at byte") || s.contains("empty"),
                            "cut {cut}: {s}"
                        );
                    }
                }
            }
        }
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut b = bytes.clone();
                b[i] ^= bit;
                let (frames, end) = read_all(&b, true);
                // The checksum or a check catches every single flip.
                assert!(end.is_err() || frames != full, "flip at {i} unnoticed");
            }
        }
    }

    #[test]
    fn clear_errors() {
        let e = |b: &[u8]| read_all(b, true).1.unwrap_err().to_string();
        assert_eq!(e(b""), "not a vtrace record file (empty file)");
        assert!(e(b"hello, world\n").starts_with("not a vtrace record file (starts with 68 65"));
        let mut newer = sample_file();
        newer[11] = (VERSION + 1) as u8;
        assert_eq!(
            e(&newer),
            format!("written by format version {}, this vtrace reads version {VERSION} (use a newer vtrace)", VERSION + 1)
        );
        assert_eq!(
            e(&MAGIC[..5]),
            "truncated at byte 5 (frame 1: in the magic and version)"
        );
        let mut bad_kind = sample_file();
        let first_device = 13 + 5 + header_len(&bad_kind) + 4;
        bad_kind[first_device] = 0x7f;
        assert!(
            e(&bad_kind).contains("unknown frame kind 0x7f"),
            "{}",
            e(&bad_kind)
        );
    }

    fn header_len(b: &[u8]) -> usize {
        u32::from_le_bytes([b[14], b[15], b[16], b[17]]) as usize
    }
}
