//! The lab topology: namespaces, veths, bridges, taps and the VMM forwarder.
//!
//! ```text
//!  native path (P = "vl" + id)
//!   netns P-na                                                      netns P-nb
//!   eth0 198.18.0.1 ── veth ── Pna ─┐                ┌─ Pnb ── veth ── eth0 198.18.0.2
//!                                   └── bridge Pbn ──┘
//!
//!  virtual path
//!   netns P-va                                                      netns P-vb
//!   eth0 198.18.1.1 ── veth ── Pva ─┐                ┌─ Pvb ── veth ── eth0 198.18.1.2
//!                          bridge Pbx                bridge Pby
//!                                   └─ tap Ptx ⇄ VMM ⇄ tap Pty ─┘
//! ```
//!
//! Host-side devices live in the namespace of the process calling [`Lab::up`] (the
//! host namespace). Every object is recorded as soon as it exists, and removed again
//! in reverse order when the [`Lab`] is dropped or when [`Lab::up`] fails half-way.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd::{ip, ip_quiet};
use crate::names::{self, lab_id_of, prefix, validate_id, validate_prefix};
use crate::netns::{self, write_sysctl};
use crate::vmm::{Tap, Vmm, VmmOptions, VmmStats};

/// Name of the lab interface inside every namespace.
pub const NS_DEV: &str = "eth0";
/// Prefix length of the lab subnets.
pub const PREFIX_LEN: u8 = 24;
/// Native path subnet 198.18.0.0/24: sender .1, receiver .2.
pub const NATIVE_SENDER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const NATIVE_RECEIVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Virtual path subnet 198.18.1.0/24: sender .1, receiver .2.
pub const VIRT_SENDER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const VIRT_RECEIVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);

/// Directory of owner files: `<id>.pid` holds the pid of the process owning lab `id`.
/// It reserves the id and lets the clean-up skip labs whose owner is still running.
const OWNER_DIR: &str = "/run/vtrace-lab";

/// The owner file of lab `id`.
pub fn owner_file(id: &str) -> PathBuf {
    PathBuf::from(OWNER_DIR).join(format!("{id}.pid"))
}

/// Whether `addr` is in the lab's address block 198.18.0.0/15 (RFC 2544 benchmarking).
pub fn is_lab_addr(addr: Ipv4Addr) -> bool {
    let o = addr.octets();
    o[0] == 198 && (o[1] & 0xfe) == 18
}

/// What to build.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Lab id, 5 characters of `[a-z0-9]`; names are `vl` + id + role.
    pub id: String,
    /// Build the native path (netns — veth — bridge — veth — netns).
    pub native: bool,
    /// Build the virtual path (through two taps and the VMM forwarder).
    pub virtual_path: bool,
    /// VMM forwarder behaviour (virtual path only).
    pub vmm: VmmOptions,
}

impl Default for LabOptions {
    /// Both paths, a default VMM and a fresh [`Lab::unique_id`].
    fn default() -> Self {
        LabOptions {
            id: names::unique_id(),
            native: true,
            virtual_path: true,
            vmm: VmmOptions::default(),
        }
    }
}

impl LabOptions {
    /// Same as [`Default::default`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the VMM options.
    pub fn with_vmm(mut self, vmm: VmmOptions) -> Self {
        self.vmm = vmm;
        self
    }

    /// Sets the lab id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }
}

/// Names and addresses of the native path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativePath {
    /// Namespace of the sender, `{P}-na`.
    pub sender_ns: String,
    /// Namespace of the receiver, `{P}-nb`.
    pub receiver_ns: String,
    /// Address of `eth0` in the sender namespace (198.18.0.1).
    pub sender_ip: Ipv4Addr,
    /// Address of `eth0` in the receiver namespace (198.18.0.2).
    pub receiver_ip: Ipv4Addr,
    /// MAC of `eth0` in the sender namespace.
    pub sender_mac: String,
    /// MAC of `eth0` in the receiver namespace.
    pub receiver_mac: String,
    /// Host end of the sender's veth, `{P}na`.
    pub sender_veth: String,
    /// Host end of the receiver's veth, `{P}nb`.
    pub receiver_veth: String,
    /// Bridge joining both host ends, `{P}bn`.
    pub bridge: String,
}

/// Names and addresses of the virtual path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualPath {
    /// Namespace of the sender, `{P}-va`.
    pub sender_ns: String,
    /// Namespace of the receiver, `{P}-vb`.
    pub receiver_ns: String,
    /// Address of `eth0` in the sender namespace (198.18.1.1).
    pub sender_ip: Ipv4Addr,
    /// Address of `eth0` in the receiver namespace (198.18.1.2).
    pub receiver_ip: Ipv4Addr,
    /// MAC of `eth0` in the sender namespace.
    pub sender_mac: String,
    /// MAC of `eth0` in the receiver namespace.
    pub receiver_mac: String,
    /// Host end of the sender's veth, `{P}va` (on `bridge_in`).
    pub sender_veth: String,
    /// Host end of the receiver's veth, `{P}vb` (on `bridge_out`).
    pub receiver_veth: String,
    /// Bridge of the sender side, `{P}bx`.
    pub bridge_in: String,
    /// Bridge of the receiver side, `{P}by`.
    pub bridge_out: String,
    /// Tap on `bridge_in`, `{P}tx`: the VMM reads the sender's frames from it.
    pub tap_in: String,
    /// Tap on `bridge_out`, `{P}ty`: the VMM writes the sender's frames to it.
    pub tap_out: String,
}

/// One thing created by [`Lab::up`], undone at teardown.
#[derive(Debug)]
pub(crate) enum Step {
    Netns(String),
    Link(String),
    OwnerFile(PathBuf),
}

/// Records what was created and removes it, newest first, when dropped. This is the
/// incremental guard of [`Lab::up`], later owned by the [`Lab`].
#[derive(Debug, Default)]
pub(crate) struct Cleanup {
    steps: Vec<Step>,
}

impl Cleanup {
    pub(crate) fn push(&mut self, step: Step) {
        self.steps.push(step);
    }

    /// Undoes every recorded step, newest first. Idempotent.
    pub(crate) fn run(&mut self) {
        while let Some(step) = self.steps.pop() {
            // Errors are ignored: teardown must go on, and must not panic.
            match step {
                // Deleting a veth's host end deletes its peer too, synchronously.
                // (Deleting the namespace alone would leave the host end around
                // until the kernel's asynchronous namespace clean-up runs.)
                Step::Link(dev) => ip_quiet(&["link", "del", "dev", &dev]),
                Step::Netns(ns) => ip_quiet(&["netns", "del", &ns]),
                Step::OwnerFile(p) => {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.run();
    }
}

/// A running lab. Dropping it stops the VMM and removes every namespace and device it
/// created.
pub struct Lab {
    id: String,
    prefix: String,
    native: Option<NativePath>,
    virt: Option<VirtualPath>,
    vmm: Option<Vmm>,
    /// Run by `Drop for Lab` once the VMM has stopped.
    cleanup: Cleanup,
}

impl fmt::Debug for Lab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lab")
            .field("id", &self.id)
            .field("native", &self.native)
            .field("virt", &self.virt)
            .field("vmm_running", &self.vmm.is_some())
            .finish()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Stop the forwarder first: its threads exit within the poll timeout, the tap
        // fds close and the kernel removes the taps. Then `cleanup` removes the rest.
        drop(self.vmm.take());
        self.cleanup.run();
    }
}

/// What a clean-up removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanReport {
    /// Network namespaces deleted.
    pub namespaces: Vec<String>,
    /// Host devices deleted.
    pub devices: Vec<String>,
    /// Lab ids left alone because their owner process is still running.
    pub skipped_live: Vec<String>,
}

impl Lab {
    /// Builds the lab described by `opts`. On failure everything already created is
    /// removed before the error is returned.
    pub fn up(opts: LabOptions) -> Result<Lab> {
        validate_id(&opts.id)?;
        if !opts.native && !opts.virtual_path {
            bail!("nothing to build: both the native and the virtual path are disabled");
        }
        let id = opts.id.clone();
        let p = prefix(&id);
        // Declared before `vmm` so that, on an early return, the VMM (and with it the
        // taps) goes first and the guard removes the rest afterwards.
        let mut cleanup = Cleanup::default();
        claim_id(&id, &mut cleanup)?;

        let native = if opts.native {
            Some(build_native(&id, &p, &mut cleanup).context("cannot build the native path")?)
        } else {
            None
        };
        let (virt, vmm) = if opts.virtual_path {
            let (v, vmm) = build_virtual(&id, &p, &opts.vmm, &mut cleanup)
                .context("cannot build the virtual path")?;
            (Some(v), Some(vmm))
        } else {
            (None, None)
        };
        Ok(Lab {
            id,
            prefix: p,
            native,
            virt,
            vmm,
            cleanup,
        })
    }

    /// A fresh lab id (5 characters of `[a-z0-9]`), unique across the threads of this
    /// process and, in practice, across processes (pid + time + counter, skipping ids
    /// whose names exist on the host).
    pub fn unique_id() -> String {
        names::unique_id()
    }

    /// The lab id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The name prefix, `vl` + id.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The native path.
    ///
    /// # Panics
    /// If the lab was built without it (see [`Lab::try_native`]).
    pub fn native(&self) -> &NativePath {
        match &self.native {
            Some(n) => n,
            None => panic!("lab {} was built without its native path", self.id),
        }
    }

    /// The native path, if built.
    pub fn try_native(&self) -> Option<&NativePath> {
        self.native.as_ref()
    }

    /// The virtual path.
    ///
    /// # Panics
    /// If the lab was built without it (see [`Lab::try_virt`]).
    pub fn virt(&self) -> &VirtualPath {
        match &self.virt {
            Some(v) => v,
            None => panic!("lab {} was built without its virtual path", self.id),
        }
    }

    /// The virtual path, if built.
    pub fn try_virt(&self) -> Option<&VirtualPath> {
        self.virt.as_ref()
    }

    /// Counters of the VMM forwarder (all zero without a virtual path).
    pub fn vmm_stats(&self) -> VmmStats {
        self.vmm.as_ref().map(Vmm::stats).unwrap_or_default()
    }

    /// All network namespaces of this lab.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(n) = &self.native {
            v.extend([n.sender_ns.clone(), n.receiver_ns.clone()]);
        }
        if let Some(x) = &self.virt {
            v.extend([x.sender_ns.clone(), x.receiver_ns.clone()]);
        }
        v
    }

    /// All devices of this lab in the host namespace.
    pub fn host_devices(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(n) = &self.native {
            v.extend([
                n.sender_veth.clone(),
                n.receiver_veth.clone(),
                n.bridge.clone(),
            ]);
        }
        if let Some(x) = &self.virt {
            v.extend([
                x.sender_veth.clone(),
                x.receiver_veth.clone(),
                x.bridge_in.clone(),
                x.bridge_out.clone(),
                x.tap_in.clone(),
                x.tap_out.clone(),
            ]);
        }
        v
    }

    /// `ip netns exec NS PROGRAM` (add arguments to the returned command).
    pub fn in_ns(ns: &str, program: &str) -> Command {
        crate::cmd::in_ns(ns, program)
    }

    /// Removes the namespaces and host devices of every lab whose owner process is
    /// gone (crashed runs). Labs owned by a running process are left alone.
    pub fn clean_all_leftovers() -> Result<CleanReport> {
        Self::clean_leftovers(names::NAME_PREFIX, false)
    }

    /// Removes lab namespaces and host devices whose names start with `prefix` (which
    /// must be `vl` followed by up to 5 id characters) and have the exact shape of lab
    /// names. Labs whose owner process still runs are skipped unless `include_live`.
    pub fn clean_leftovers(prefix: &str, include_live: bool) -> Result<CleanReport> {
        clean_leftovers(prefix, include_live)
    }
}

/// Reserves `id` by creating its owner file exclusively.
pub(crate) fn claim_id(id: &str, cleanup: &mut Cleanup) -> Result<()> {
    std::fs::create_dir_all(OWNER_DIR).with_context(|| format!("cannot create {OWNER_DIR}"))?;
    let path = owner_file(id);
    let mut f = match OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let owner = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "lab id {id} is taken (owner file {} names pid {}); pick another id, or run `vtrace-lab clean` if that run is gone",
                path.display(),
                owner.trim()
            );
        }
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
    };
    cleanup.push(Step::OwnerFile(path.clone()));
    writeln!(f, "{}", std::process::id())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// A locally administered MAC (02:76:..): two bytes from the id so that labs differ,
/// then the path (0 native, 1 virtual) and the host (1 sender, 2 receiver).
fn lab_mac(id: &str, path: u8, host: u8) -> String {
    let h = id.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!(
        "02:76:{:02x}:{:02x}:{path:02x}:{host:02x}",
        (h >> 8) & 0xff,
        h & 0xff
    )
}

/// Disables IPv6 on host device `dev` (before it goes up, so it never sends router
/// solicitations, DAD or MLD).
pub(crate) fn disable_ipv6_host(dev: &str) -> Result<()> {
    write_sysctl(&format!("net/ipv6/conf/{dev}/disable_ipv6"), "1")
}

/// `ip netns add`, retried: concurrent first-time `ip netns add` calls can race while
/// setting up the shared `/run/netns` mount. An existing namespace is a collision.
fn netns_add(ns: &str) -> Result<()> {
    if netns::path(ns).exists() {
        bail!("network namespace {ns} already exists");
    }
    let mut result = ip(&["netns", "add", ns]);
    for _ in 0..2 {
        if result.is_ok() || netns::path(ns).exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        result = ip(&["netns", "add", ns]);
    }
    result.map(drop)
}

/// Creates namespace `ns` with IPv6 off and `lo` up.
pub(crate) fn add_netns(ns: &str, cleanup: &mut Cleanup) -> Result<()> {
    netns_add(ns)?;
    cleanup.push(Step::Netns(ns.to_string()));
    netns::run_in(ns, || {
        write_sysctl("net/ipv6/conf/all/disable_ipv6", "1")?;
        // `default` applies to devices created later, i.e. the eth0 moved in next.
        write_sysctl("net/ipv6/conf/default/disable_ipv6", "1")
    })?;
    ip(&["-n", ns, "link", "set", "dev", "lo", "up"])?;
    Ok(())
}

/// Creates a bridge with STP off (no BPDUs) and no forwarding delay (ports forward at
/// once), IPv6 off, up. Multicast snooping is off too: with it, the bridge joins the
/// multicast-router-discovery group 224.0.0.106 and sends IGMP reports into the lab.
pub(crate) fn add_bridge(name: &str, cleanup: &mut Cleanup) -> Result<()> {
    ip(&[
        "link",
        "add",
        "name",
        name,
        "type",
        "bridge",
        "stp_state",
        "0",
        "forward_delay",
        "0",
        "mcast_snooping",
        "0",
    ])?;
    cleanup.push(Step::Link(name.to_string()));
    disable_ipv6_host(name)?;
    ip(&["link", "set", "dev", name, "up"])?;
    Ok(())
}

/// Enslaves host device `dev` to `bridge` and brings it up.
pub(crate) fn attach_to_bridge(dev: &str, bridge: &str) -> Result<()> {
    ip(&["link", "set", "dev", dev, "master", bridge])?;
    ip(&["link", "set", "dev", dev, "up"])?;
    Ok(())
}

/// One end host: namespace `ns` whose `eth0` (address `addr`, MAC `mac`) is a veth
/// whose host end `host_end` sits on `bridge`.
pub(crate) fn add_endpoint(
    ns: &str,
    host_end: &str,
    mac: &str,
    addr: Ipv4Addr,
    bridge: &str,
    prefix_len: u8,
    cleanup: &mut Cleanup,
) -> Result<()> {
    add_netns(ns, cleanup)?;
    ip(&[
        "link", "add", "name", host_end, "type", "veth", "peer", "name", NS_DEV, "address", mac,
        "netns", ns,
    ])?;
    cleanup.push(Step::Link(host_end.to_string()));
    disable_ipv6_host(host_end)?;
    attach_to_bridge(host_end, bridge)?;
    let cidr = format!("{addr}/{prefix_len}");
    ip(&["-n", ns, "addr", "add", &cidr, "dev", NS_DEV])?;
    ip(&["-n", ns, "link", "set", "dev", NS_DEV, "up"])?;
    Ok(())
}

/// Static neighbour entries in both namespaces, so no ARP crosses the lab.
fn add_static_neighbours(a: (&str, Ipv4Addr, &str), b: (&str, Ipv4Addr, &str)) -> Result<()> {
    for ((ns, _, _), (_, peer_ip, peer_mac)) in [(a, b), (b, a)] {
        let peer = peer_ip.to_string();
        ip(&[
            "-n",
            ns,
            "neigh",
            "replace",
            &peer,
            "lladdr",
            peer_mac,
            "dev",
            NS_DEV,
            "nud",
            "permanent",
        ])?;
    }
    Ok(())
}

fn build_native(id: &str, p: &str, cleanup: &mut Cleanup) -> Result<NativePath> {
    let n = NativePath {
        sender_ns: format!("{p}-na"),
        receiver_ns: format!("{p}-nb"),
        sender_ip: NATIVE_SENDER_IP,
        receiver_ip: NATIVE_RECEIVER_IP,
        sender_mac: lab_mac(id, 0, 1),
        receiver_mac: lab_mac(id, 0, 2),
        sender_veth: format!("{p}na"),
        receiver_veth: format!("{p}nb"),
        bridge: format!("{p}bn"),
    };
    add_bridge(&n.bridge, cleanup)?;
    add_endpoint(
        &n.sender_ns,
        &n.sender_veth,
        &n.sender_mac,
        n.sender_ip,
        &n.bridge,
        PREFIX_LEN,
        cleanup,
    )?;
    add_endpoint(
        &n.receiver_ns,
        &n.receiver_veth,
        &n.receiver_mac,
        n.receiver_ip,
        &n.bridge,
        PREFIX_LEN,
        cleanup,
    )?;
    add_static_neighbours(
        (&n.sender_ns, n.sender_ip, &n.sender_mac),
        (&n.receiver_ns, n.receiver_ip, &n.receiver_mac),
    )?;
    Ok(n)
}

fn build_virtual(
    id: &str,
    p: &str,
    opts: &VmmOptions,
    cleanup: &mut Cleanup,
) -> Result<(VirtualPath, Vmm)> {
    let v = VirtualPath {
        sender_ns: format!("{p}-va"),
        receiver_ns: format!("{p}-vb"),
        sender_ip: VIRT_SENDER_IP,
        receiver_ip: VIRT_RECEIVER_IP,
        sender_mac: lab_mac(id, 1, 1),
        receiver_mac: lab_mac(id, 1, 2),
        sender_veth: format!("{p}va"),
        receiver_veth: format!("{p}vb"),
        bridge_in: format!("{p}bx"),
        bridge_out: format!("{p}by"),
        tap_in: format!("{p}tx"),
        tap_out: format!("{p}ty"),
    };
    add_bridge(&v.bridge_in, cleanup)?;
    add_bridge(&v.bridge_out, cleanup)?;
    add_endpoint(
        &v.sender_ns,
        &v.sender_veth,
        &v.sender_mac,
        v.sender_ip,
        &v.bridge_in,
        PREFIX_LEN,
        cleanup,
    )?;
    add_endpoint(
        &v.receiver_ns,
        &v.receiver_veth,
        &v.receiver_mac,
        v.receiver_ip,
        &v.bridge_out,
        PREFIX_LEN,
        cleanup,
    )?;
    add_static_neighbours(
        (&v.sender_ns, v.sender_ip, &v.sender_mac),
        (&v.receiver_ns, v.receiver_ip, &v.receiver_mac),
    )?;
    // The taps belong to their fds: on any error below they are dropped (closed) and
    // the kernel removes them, so they are not recorded in `cleanup`.
    let tap_in = Tap::create(&v.tap_in)?;
    let tap_out = Tap::create(&v.tap_out)?;
    for (tap, bridge) in [(&v.tap_in, &v.bridge_in), (&v.tap_out, &v.bridge_out)] {
        if let Some(len) = opts.tap_queue_len {
            // The tun driver resizes the tap's ring when txqueuelen changes.
            ip(&["link", "set", "dev", tap, "txqueuelen", &len.to_string()])?;
        }
        disable_ipv6_host(tap)?;
        attach_to_bridge(tap, bridge)?;
    }
    let vmm = Vmm::start(tap_in, tap_out, opts)?;
    Ok((v, vmm))
}

/// Lab-shaped names among `ip -o link` / `ip netns list` style lines.
fn first_names(out: &str, name_field: usize) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.split_whitespace().nth(name_field))
        .map(|n| {
            let n = n.trim_end_matches(':');
            n.split('@').next().unwrap_or(n).to_string()
        })
        .collect()
}

/// Whether an `ip -o -d link` line describes a device of a kind the lab creates.
fn is_lab_kind(detail_line: &str) -> bool {
    detail_line
        .split_whitespace()
        .any(|t| matches!(t, "veth" | "bridge" | "tun"))
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Ids of labs whose owner file names a running process.
fn live_ids() -> BTreeSet<String> {
    let mut live = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir(OWNER_DIR) else {
        return live;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".pid") else {
            continue;
        };
        let pid = std::fs::read_to_string(e.path())
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if matches!(pid, Some(pid) if pid > 0 && pid_alive(pid)) {
            live.insert(id.to_string());
        }
    }
    live
}

fn clean_leftovers(pfx: &str, include_live: bool) -> Result<CleanReport> {
    validate_prefix(pfx)?;
    let live = if include_live {
        BTreeSet::new()
    } else {
        live_ids()
    };
    let mut report = CleanReport::default();
    // Only objects of a lab that claimed its id (an owner file, live or stale): a host device
    // that merely looks like a lab name (a bridge `vlan100`) is never touched.
    let selected = |name: &str| -> Option<String> {
        let id = lab_id_of(name)?;
        (name.starts_with(pfx) && owner_file(id).exists()).then(|| id.to_string())
    };
    let mut skipped = BTreeSet::new();

    // Host devices: only the kinds a lab creates, ports before bridges.
    let links = ip(&["-o", "-d", "link", "show"])?;
    let mut devices: Vec<(bool, String)> = Vec::new();
    for line in links.lines() {
        let Some(name) = first_names(line, 1).pop() else {
            continue;
        };
        let Some(id) = selected(&name) else { continue };
        if live.contains(&id) {
            skipped.insert(id);
            continue;
        }
        if is_lab_kind(line) {
            let is_bridge = line.split_whitespace().any(|t| t == "bridge");
            devices.push((is_bridge, name));
        }
    }
    devices.sort();
    for (_, dev) in devices {
        if ip(&["link", "del", "dev", &dev]).is_ok() {
            report.devices.push(dev);
        }
    }

    for ns in first_names(&ip(&["netns", "list"])?, 0) {
        let Some(id) = selected(&ns) else { continue };
        if live.contains(&id) {
            skipped.insert(id);
            continue;
        }
        ip(&["netns", "del", &ns])?;
        report.namespaces.push(ns);
    }

    // Owner files of dead runs.
    if let Ok(entries) = std::fs::read_dir(OWNER_DIR) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".pid") else {
                continue;
            };
            if names::validate_id(id).is_ok() && prefix(id).starts_with(pfx) && !live.contains(id) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    report.skipped_live = skipped.into_iter().collect();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_addresses() {
        assert!(is_lab_addr(Ipv4Addr::new(198, 18, 0, 1)));
        assert!(is_lab_addr(Ipv4Addr::new(198, 19, 255, 255)));
        assert!(!is_lab_addr(Ipv4Addr::new(198, 20, 0, 1)));
        assert!(!is_lab_addr(Ipv4Addr::new(198, 17, 0, 1)));
        assert!(!is_lab_addr(Ipv4Addr::new(10, 0, 0, 1)));
        for ip in [
            NATIVE_SENDER_IP,
            NATIVE_RECEIVER_IP,
            VIRT_SENDER_IP,
            VIRT_RECEIVER_IP,
        ] {
            assert!(is_lab_addr(ip));
        }
    }

    #[test]
    fn macs_are_locally_administered_and_distinct() {
        let a = lab_mac("abcde", 0, 1);
        assert!(a.starts_with("02:76:"), "{a}");
        assert_eq!(a.len(), 17);
        assert_ne!(a, lab_mac("abcde", 0, 2));
        assert_ne!(a, lab_mac("abcde", 1, 1));
        assert_ne!(a, lab_mac("abcdf", 0, 1));
    }

    #[test]
    fn link_lines_are_parsed() {
        let out = "5: vlabcdena@if2: <BROADCAST,MULTICAST> mtu 1500 \\    link/ether 76:2b brd ff link-netns vlabcde-na promiscuity 0 \\    veth addrgenmode eui64\n\
                   6: vlabcdebn: <BROADCAST> mtu 1500 \\    bridge forward_delay 0\n";
        assert_eq!(first_names(out, 1), vec!["vlabcdena", "vlabcdebn"]);
        let lines: Vec<_> = out.lines().collect();
        assert!(is_lab_kind(lines[0]) && is_lab_kind(lines[1]));
        assert!(!is_lab_kind(
            "7: vlabcdety: <BROADCAST> \\    dummy addrgenmode eui64"
        ));
        assert_eq!(
            first_names("vlabcde-na (id: 0)\nvlabcde-nb\n", 0),
            vec!["vlabcde-na", "vlabcde-nb"]
        );
    }

    #[test]
    fn default_options_have_a_fresh_valid_id() {
        let a = LabOptions::default();
        let b = LabOptions::new();
        assert!(validate_id(&a.id).is_ok());
        assert_ne!(a.id, b.id);
        assert!(a.native && a.virtual_path);
    }
}
