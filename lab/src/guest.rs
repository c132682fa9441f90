//! The lab with a real VM: a QEMU guest as the virtual router.
//!
//! ```text
//!  netns P-ra                                                               netns P-rb
//!  eth0 198.18.2.1 ── veth Pra ── bridge Pga ── tap Pqa ┐   ┌ tap Pqb ── bridge Pgb ── veth Prb ── eth0 198.18.3.2
//!  route 198.18.3.0/24 via .254                         │   │            route 198.18.2.0/24 via .254
//!                                           QEMU (virtio-net-pci × 2, userspace backend or vhost-net)
//!                                                       │   │
//!                                   guest eth 198.18.2.254 ⇄ ip_forward ⇄ guest eth 198.18.3.254
//! ```
//!
//! Like the virtual router of the reference paper (its Figure 4), the guest *routes*: two
//! subnets, the TTL is decremented on the way, and the host sees each packet leave through
//! one tap and, after QEMU's virtio-net backend, the guest kernel and the backend again,
//! come back through the other tap as a new skb. vtrace joins the two by content (its
//! fingerprint leaves out TTL and checksums).
//!
//! Two pieces:
//! * [`GuestImage::ensure`] builds, once, a kernel and an initramfs from Debian packages:
//!   the `linux-image-*-amd64` package `linux-image-amd64` depends on and `busybox-static`,
//!   fetched with `apt-get download` and unpacked with `dpkg-deb -x`. The initramfs (a
//!   gzip-compressed newc cpio written by this module) holds busybox, the virtio modules
//!   in dependency order (read from each module's `.modinfo`, what depmod builds
//!   `modules.dep` from; the package ships no `modules.dep`) and an `/init` that loads
//!   them, configures both NICs from the kernel command line, turns on IPv4 forwarding and
//!   prints a marker line on the serial console.
//! * [`VmLab::up`] builds the host side (namespaces, veths, bridges, taps), starts QEMU on
//!   the two taps, waits for the marker and sends a few warm-up pings through the guest.
//!   Dropping the [`VmLab`] (or a failure half-way through `up`) stops QEMU and removes
//!   every device and namespace it created.
//!
//! Acceleration: KVM is used when `/dev/kvm` opens *and* a probe boot under KVM reaches
//! `/init` within [`KVM_PROBE_TIMEOUT`]; otherwise TCG. Some hosts expose a `/dev/kvm` on
//! which stock kernels do not boot (paravirtualised "PVM" hosts), hence the probe. Its
//! result is cached per host kernel release in the image directory;
//! `VTRACE_GUEST_ACCEL=kvm|tcg` overrides it. vhost-net (`vhost=on`) is used under KVM when
//! `/dev/vhost-net` exists.
//!
//! All addresses are in 198.18.0.0/15; IPv6 is off in the namespaces, on the host devices
//! and in the guest (`ipv6.disable=1`); neighbour entries are static on both sides.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::cmd::{command_line, ip, run};
use crate::names::{self, prefix, validate_id};
use crate::ping::ping;
use crate::topology::{
    add_bridge, add_endpoint, attach_to_bridge, claim_id, disable_ipv6_host, Cleanup, Step,
};

/// Address of the sender (`eth0` in `P-ra`), side A subnet 198.18.2.0/24.
pub const VM_SENDER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
/// Address of the guest's first NIC (side A): the sender's gateway.
pub const VM_GUEST_IP_A: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 254);
/// Address of the receiver (`eth0` in `P-rb`), side B subnet 198.18.3.0/24.
pub const VM_RECEIVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 2);
/// Address of the guest's second NIC (side B): the receiver's gateway.
pub const VM_GUEST_IP_B: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 254);
/// Prefix length of both subnets.
pub const VM_PREFIX_LEN: u8 = 24;

/// The line `/init` prints once the router is configured.
pub const READY_MARKER: &str = "VTRACE_GUEST_READY";
/// The prefix of the line `/init` prints when it cannot set the router up.
pub const FAILED_MARKER: &str = "vtrace-guest: FAILED:";
/// The line `/init` prints first (the KVM probe waits for it).
const STARTED_MARKER: &str = "vtrace-guest: init started";
/// How long a KVM probe boot may take to reach `/init`. A guest under working KVM gets
/// there in about a second; under TCG it takes a few.
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// Modules the router needs; their dependencies are added and ordered by the builder.
const WANTED_MODULES: &[&str] = &["virtio_pci", "virtio_net"];
/// Bumped when the image layout changes in a way [`INIT_TEMPLATE`] does not show.
const IMAGE_FORMAT: u32 = 1;
/// The Debian metapackage whose dependency is the versioned kernel package.
pub(crate) const KERNEL_METAPACKAGE: &str = "linux-image-amd64";
/// The Debian package of the statically linked busybox.
pub(crate) const BUSYBOX_PACKAGE: &str = "busybox-static";
const QEMU: &str = "qemu-system-x86_64";
const QEMU_PACKAGE: &str = "qemu-system-x86";
/// Console lines kept in memory (for error messages and [`VmLab::console_tail`]).
const CONSOLE_KEEP: usize = 500;

/// `/init` of the guest. `@MODULES@` becomes the module names in load order.
const INIT_TEMPLATE: &str = r#"#!/bin/busybox sh
# /init of vtrace's lab guest: a virtual router between two virtio NICs.
# Generated by vtrace-lab (lab/src/guest.rs). Settings come from the kernel command line:
#   vtrace.nic=MAC,ADDR/LEN,PEER_IP,PEER_MAC   (one per NIC)
#   vtrace.probe=1                             (only report that init runs, then power off)
/bin/busybox mkdir -p /bin /proc /sys /dev /tmp /run
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
say() { echo "vtrace-guest: $*"; }
fail() {
    echo "vtrace-guest: FAILED: $*"
    while :; do sleep 3600; done
}
say "init started"
cmdline=$(cat /proc/cmdline)
case " $cmdline " in
*" vtrace.probe=1 "*)
    say "probe done"
    poweroff -f
    ;;
esac
for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || fail "insmod $m"
done
echo 1 > /proc/sys/net/ipv4/ip_forward || fail "cannot enable ip_forward"
ip link set lo up
nics=0
for arg in $cmdline; do
    case "$arg" in
    vtrace.nic=*) ;;
    *) continue ;;
    esac
    set -- $(echo "${arg#vtrace.nic=}" | tr ',' ' ')
    mac=$1
    addr=$2
    peer=$3
    peermac=$4
    [ -n "$peermac" ] || fail "bad $arg"
    dev=""
    tries=0
    while [ -z "$dev" ]; do
        for d in /sys/class/net/*; do
            [ "$(cat "$d/address")" = "$mac" ] && dev=${d##*/}
        done
        [ -n "$dev" ] && break
        tries=$((tries + 1))
        [ "$tries" -gt 200 ] && fail "no NIC with MAC $mac"
        sleep 0.05
    done
    ip addr add "$addr" dev "$dev" || fail "ip addr add $addr dev $dev"
    ip link set "$dev" up || fail "ip link set $dev up"
    arp -i "$dev" -s "$peer" "$peermac" || fail "arp -s $peer $peermac on $dev"
    say "$dev ($mac) $addr, neighbour $peer is $peermac"
    nics=$((nics + 1))
done
[ "$nics" -ge 2 ] || fail "expected two vtrace.nic= entries on the kernel command line, got $nics"
say "routing between $nics NICs, ip_forward=$(cat /proc/sys/net/ipv4/ip_forward)"
echo VTRACE_GUEST_READY
while :; do sleep 3600; done
"#;

fn progress(msg: &str) {
    eprintln!("vtrace-guest: {msg}");
}

// ---------------------------------------------------------------------------------------
// The image
// ---------------------------------------------------------------------------------------

/// A bootable guest: kernel and initramfs, built by [`GuestImage::ensure`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// The cache directory the image lives in.
    pub cache_dir: PathBuf,
    /// The kernel (`vmlinuz`).
    pub kernel: PathBuf,
    /// The initramfs (`initrd.cpio.gz`).
    pub initrd: PathBuf,
    /// The Debian kernel package it came from, e.g. `linux-image-6.1.0-56-amd64`.
    pub kernel_package: String,
    /// The kernel release, e.g. `6.1.0-56-amd64`.
    pub kernel_release: String,
    /// Modules in the initramfs, in load order.
    pub modules: Vec<String>,
    /// Whether this call built the image (false: it was in the cache).
    pub built: bool,
}

impl GuestImage {
    /// The default cache: `$VTRACE_GUEST_DIR`, else `target/vtrace-guest` of the workspace.
    pub fn default_cache_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("VTRACE_GUEST_DIR") {
            return PathBuf::from(d);
        }
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new("."))
            .join("target")
            .join("vtrace-guest")
    }

    /// Returns the image in `cache_dir`, building it first if it is missing or was built
    /// by a different recipe. Installs QEMU (`qemu-system-x86`) if it is missing (needs
    /// root). Building downloads two Debian packages with `apt-get download` (about 70 MB)
    /// and takes some seconds; progress goes to stderr. Concurrent callers serialise on a
    /// lock file in `cache_dir`.
    pub fn ensure(cache_dir: impl AsRef<Path>) -> Result<GuestImage> {
        let cache_dir = cache_dir.as_ref().to_path_buf();
        ensure_qemu()?;
        fs::create_dir_all(&cache_dir)
            .with_context(|| format!("cannot create {}", cache_dir.display()))?;
        let _lock = lock_dir(&cache_dir)?;
        let image_dir = cache_dir.join("image");
        if let Some(img) = read_stamp(&cache_dir, &image_dir) {
            return Ok(img);
        }
        let started = Instant::now();
        progress(&format!(
            "building the guest image in {} (first time only)",
            image_dir.display()
        ));
        let img = build_image(&cache_dir, &image_dir)?;
        progress(&format!(
            "guest image ready ({}, {} modules) in {:.1} s",
            img.kernel_release,
            img.modules.len(),
            started.elapsed().as_secs_f64()
        ));
        Ok(img)
    }
}

/// An exclusive `flock` on `dir/.lock`, released when the file is closed.
pub(crate) fn lock_dir(dir: &Path) -> Result<File> {
    let p = dir.join(".lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .with_context(|| format!("cannot open {}", p.display()))?;
    // SAFETY: flock on a valid fd.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        progress(&format!(
            "waiting for another process building in {}",
            dir.display()
        ));
        // SAFETY: as above, blocking.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!(
                "cannot lock {}: {}",
                p.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(f)
}

/// FNV-1a, 64 bit: the recipe fingerprint in the stamp file.
fn fnv64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Identifies what the builder would produce, apart from the kernel package.
fn recipe() -> String {
    let text = format!(
        "{IMAGE_FORMAT}\n{}\n{INIT_TEMPLATE}",
        WANTED_MODULES.join(",")
    );
    format!("{:016x}", fnv64(text.as_bytes()))
}

/// The image described by `image_dir/stamp`, if it is complete and of the current recipe.
fn read_stamp(cache_dir: &Path, image_dir: &Path) -> Option<GuestImage> {
    let text = fs::read_to_string(image_dir.join("stamp")).ok()?;
    let fields: BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    if fields.get("recipe").copied() != Some(recipe().as_str()) {
        return None;
    }
    let img = GuestImage {
        cache_dir: cache_dir.to_path_buf(),
        kernel: image_dir.join("vmlinuz"),
        initrd: image_dir.join("initrd.cpio.gz"),
        kernel_package: fields.get("kernel_package")?.to_string(),
        kernel_release: fields.get("kernel_release")?.to_string(),
        modules: fields
            .get("modules")?
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        built: false,
    };
    (img.kernel.is_file() && img.initrd.is_file()).then_some(img)
}

fn build_image(cache_dir: &Path, image_dir: &Path) -> Result<GuestImage> {
    let debs = cache_dir.join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("cannot create {}", debs.display()))?;

    // The versioned kernel package is the metapackage's dependency.
    let meta = download(&debs, KERNEL_METAPACKAGE, true)?;
    let depends = run(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&meta)
        .arg("Depends"))?;
    let kernel_package = kernel_dependency(&depends).with_context(|| {
        format!("no linux-image-* dependency in {KERNEL_METAPACKAGE}'s Depends: {depends:?}")
    })?;
    let kernel_deb = download(&debs, &kernel_package, false)?;
    let busybox_deb = download(&debs, BUSYBOX_PACKAGE, false)?;

    let work = cache_dir.join("work");
    let _ = fs::remove_dir_all(&work);
    let result = (|| -> Result<GuestImage> {
        let kroot = work.join("kernel");
        let broot = work.join("busybox");
        progress(&format!(
            "unpacking {}",
            kernel_deb.file_name().unwrap_or_default().to_string_lossy()
        ));
        unpack(&kernel_deb, &kroot)?;
        unpack(&busybox_deb, &broot)?;

        let release = kernel_release(&kroot)?;
        let vmlinuz = kroot.join("boot").join(format!("vmlinuz-{release}"));
        if !vmlinuz.is_file() {
            bail!("{} is not in {}", vmlinuz.display(), kernel_deb.display());
        }
        let busybox = broot.join("bin/busybox");
        if !busybox.is_file() {
            bail!("bin/busybox is not in {}", busybox_deb.display());
        }
        let mod_root = kroot.join("lib/modules").join(&release);
        let modules = resolve_modules(&mod_root, WANTED_MODULES)?;
        progress(&format!(
            "modules in load order: {}",
            modules
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        ));

        let mut cpio = CpioWriter::with_busybox(&read(&busybox)?);
        let names = cpio.modules(&modules)?;
        let init = INIT_TEMPLATE.replace("@MODULES@", &names.join(" "));
        cpio.file("init", 0o755, init.as_bytes());
        let archive = cpio.finish();

        fs::create_dir_all(image_dir)
            .with_context(|| format!("cannot create {}", image_dir.display()))?;
        let _ = fs::remove_file(image_dir.join("stamp"));
        let kernel = image_dir.join("vmlinuz");
        fs::copy(&vmlinuz, &kernel)
            .with_context(|| format!("cannot copy {}", vmlinuz.display()))?;
        let initrd = image_dir.join("initrd.cpio.gz");
        gzip_to(&archive, &initrd)?;
        let stamp = format!(
            "recipe={}\nkernel_package={kernel_package}\nkernel_release={release}\nmodules={}\nbusybox={}\n",
            recipe(),
            names.join(","),
            busybox_deb.file_name().unwrap_or_default().to_string_lossy()
        );
        fs::write(image_dir.join("stamp"), stamp).context("cannot write the stamp file")?;
        Ok(GuestImage {
            cache_dir: cache_dir.to_path_buf(),
            kernel,
            initrd,
            kernel_package: kernel_package.clone(),
            kernel_release: release,
            modules: names,
            built: true,
        })
    })();
    // The unpacked trees (about 400 MB) are not needed once the image exists; the .debs
    // stay, so a new recipe rebuilds without downloading.
    let _ = fs::remove_dir_all(&work);
    result
}

pub(crate) fn read(p: &Path) -> Result<Vec<u8>> {
    fs::read(p).with_context(|| format!("cannot read {}", p.display()))
}

/// A module file's contents, decompressed if the package ships it compressed.
pub(crate) fn read_module(p: &Path) -> Result<Vec<u8>> {
    let name = p.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else if name.ends_with(".ko.gz") {
        "gzip"
    } else {
        return read(p);
    };
    let out = crate::cmd::output(Command::new(tool).arg("-dc").arg(p))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed ({})", p.display(), out.status);
    }
    Ok(out.stdout)
}

/// Compresses `data` into `dest` with `gzip -n` (no name or time stamp in the header).
pub(crate) fn gzip_to(data: &[u8], dest: &Path) -> Result<()> {
    let out = File::create(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let mut child = Command::new("gzip")
        .args(["-n", "-6", "-c"])
        .stdin(Stdio::piped())
        .stdout(out)
        .spawn()
        .context("cannot run gzip")?;
    let mut stdin = child.stdin.take().context("gzip stdin")?;
    let write = stdin.write_all(data);
    drop(stdin);
    let status = child.wait().context("waiting for gzip")?;
    write.context("writing to gzip")?;
    if !status.success() {
        bail!("gzip failed ({status})");
    }
    Ok(())
}

/// Runs apt-get with a wait for the dpkg lock (another apt may be running) and returns
/// whether it succeeded, with its combined output.
fn apt_get(args: &[&str], dir: Option<&Path>) -> Result<(bool, String)> {
    let mut cmd = Command::new("apt-get");
    cmd.args(["-q", "-o", "DPkg::Lock::Timeout=600"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = crate::cmd::output(&mut cmd)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// `apt-get update`, once per process.
fn apt_update() -> Result<()> {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return Ok(());
    }
    progress("apt-get update");
    let (ok, text) = apt_get(&["update"], None)?;
    if !ok {
        bail!("`apt-get update` failed: {}", tail_lines(&text, 5));
    }
    *done = true;
    Ok(())
}

/// The newest `<package>_*.deb` in `dir`.
fn find_deb(dir: &Path, package: &str) -> Option<PathBuf> {
    let want = format!("{package}_");
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&want) && n.ends_with(".deb")
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

/// `apt-get download PACKAGE` into `dir` (running `apt-get update` and retrying once if
/// that fails); an existing `.deb` of the package is reused unless `fresh`.
pub(crate) fn download(dir: &Path, package: &str, fresh: bool) -> Result<PathBuf> {
    if !fresh {
        if let Some(p) = find_deb(dir, package) {
            return Ok(p);
        }
    }
    if fresh {
        if let Some(p) = find_deb(dir, package) {
            let _ = fs::remove_file(p);
        }
    }
    progress(&format!("apt-get download {package}"));
    let (mut ok, mut text) = apt_get(&["download", package], Some(dir))?;
    if !ok {
        apt_update()?;
        (ok, text) = apt_get(&["download", package], Some(dir))?;
    }
    if !ok {
        bail!(
            "`apt-get download {package}` failed (the guest image is built from Debian's packages; is a Debian mirror reachable?): {}",
            tail_lines(&text, 5)
        );
    }
    find_deb(dir, package).with_context(|| {
        format!(
            "apt-get download {package} left no .deb in {}",
            dir.display()
        )
    })
}

/// The package name in a `Depends:` field naming `linux-image-<release>` (the first one).
pub(crate) fn kernel_dependency(depends: &str) -> Option<String> {
    depends
        .split([',', '|'])
        .map(|d| d.split_whitespace().next().unwrap_or(""))
        .find(|n| n.starts_with("linux-image-") && *n != KERNEL_METAPACKAGE)
        .map(String::from)
}

pub(crate) fn unpack(deb: &Path, dest: &Path) -> Result<()> {
    fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest))?;
    Ok(())
}

/// The one directory under `lib/modules` of an unpacked kernel package.
pub(crate) fn kernel_release(root: &Path) -> Result<String> {
    let dir = root.join("lib/modules");
    let mut releases: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    releases.sort();
    match releases.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no kernel release under {}", dir.display()),
        many => bail!("several kernel releases under {}: {many:?}", dir.display()),
    }
}

/// A module's name as the kernel spells it: file name without `.ko[.xz|.zst|.gz]`, `-`
/// as `_`.
fn module_name(file_name: &str) -> Option<String> {
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|suffix| file_name.strip_suffix(suffix))?;
    Some(stem.replace('-', "_"))
}

/// Every module file under `dir`, by module name.
fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let e = e?;
        let p = e.path();
        if e.file_type()?.is_dir() {
            index_modules(&p, index)?;
        } else if let Some(name) = module_name(&e.file_name().to_string_lossy()) {
            index.entry(name).or_insert(p);
        }
    }
    Ok(())
}

/// `wanted` and their dependencies, each after everything it depends on, with their
/// files. Built-in modules (listed in `modules.builtin`) are left out.
pub(crate) fn resolve_modules(mod_root: &Path, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let mut index = BTreeMap::new();
    index_modules(&mod_root.join("kernel"), &mut index)?;
    let builtin: HashSet<String> = fs::read_to_string(mod_root.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next().and_then(module_name))
        .collect();
    let deps_of = |name: &str| -> Result<Vec<String>> {
        let path = index.get(name).context("not indexed")?;
        let data = read_module(path)?;
        modinfo_depends(&data).with_context(|| format!("cannot read {}", path.display()))
    };
    let order = dependency_order(wanted, |name| {
        if index.contains_key(name) {
            deps_of(name).map(Some)
        } else if builtin.contains(name) {
            Ok(None)
        } else {
            bail!(
                "module {name} is neither in {} nor built in",
                mod_root.display()
            )
        }
    })?;
    Ok(order
        .into_iter()
        .map(|n| {
            let p = index[&n].clone();
            (n, p)
        })
        .collect())
}

/// Orders `wanted` and their dependencies so that each module comes after its
/// dependencies. `deps(name)` gives a module's direct dependencies, or `None` for a
/// module that needs no loading (built in).
fn dependency_order(
    wanted: &[&str],
    mut deps: impl FnMut(&str) -> Result<Option<Vec<String>>>,
) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        deps: &mut dyn FnMut(&str) -> Result<Option<Vec<String>>>,
        done: &mut HashSet<String>,
        active: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if active.iter().any(|a| a == name) {
            bail!("module dependency cycle: {} -> {name}", active.join(" -> "));
        }
        active.push(name.to_string());
        if let Some(ds) = deps(name)? {
            for d in ds {
                visit(&d, deps, done, active, out)?;
            }
            out.push(name.to_string());
        }
        active.pop();
        done.insert(name.to_string());
        Ok(())
    }
    let (mut done, mut active, mut out) = (HashSet::new(), Vec::new(), Vec::new());
    for w in wanted {
        visit(w, &mut deps, &mut done, &mut active, &mut out)?;
    }
    Ok(out)
}

/// The `depends=` list of a kernel module (ELF64 little endian, section `.modinfo`).
fn modinfo_depends(elf: &[u8]) -> Result<Vec<String>> {
    let u16_at = |o: usize| -> Option<u64> {
        elf.get(o..o + 2)
            .map(|b| u64::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let u32_at = |o: usize| -> Option<u64> {
        elf.get(o..o + 4)
            .map(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
    };
    let u64_at = |o: usize| -> Option<u64> {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        bail!("not a 64-bit little-endian ELF file");
    }
    let bad = || anyhow!("truncated ELF section table");
    let shoff = u64_at(0x28).ok_or_else(bad)? as usize;
    let shentsize = u16_at(0x3a).ok_or_else(bad)? as usize;
    let shnum = u16_at(0x3c).ok_or_else(bad)? as usize;
    let shstrndx = u16_at(0x3e).ok_or_else(bad)? as usize;
    let section = |i: usize| -> Option<(usize, &[u8])> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = u32_at(h)? as usize;
        let off = u64_at(h + 0x18)? as usize;
        let size = u64_at(h + 0x20)? as usize;
        Some((name, elf.get(off..off.checked_add(size)?)?))
    };
    let (_, names) = section(shstrndx).ok_or_else(bad)?;
    for i in 0..shnum {
        let (name_off, data) = section(i).ok_or_else(bad)?;
        let name = names
            .get(name_off..)
            .and_then(|n| n.split(|&b| b == 0).next())
            .unwrap_or_default();
        if name != b".modinfo" {
            continue;
        }
        for entry in data.split(|&b| b == 0) {
            if let Some(list) = entry.strip_prefix(b"depends=") {
                return Ok(String::from_utf8_lossy(list)
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.replace('-', "_"))
                    .collect());
            }
        }
        return Ok(Vec::new());
    }
    bail!("no .modinfo section")
}

/// Writes a cpio archive in the "newc" format the kernel unpacks as initramfs.
#[derive(Default)]
pub(crate) struct CpioWriter {
    out: Vec<u8>,
    ino: u32,
}

/// The directories every initramfs of the lab's guests starts with.
pub(crate) const INITRAMFS_DIRS: [&str; 8] = [
    "bin",
    "dev",
    "proc",
    "sys",
    "tmp",
    "run",
    "lib",
    "lib/modules",
];

impl CpioWriter {
    /// An initramfs skeleton: `INITRAMFS_DIRS`, the console and null devices, and busybox.
    pub(crate) fn with_busybox(busybox: &[u8]) -> CpioWriter {
        let mut cpio = CpioWriter::default();
        for dir in INITRAMFS_DIRS {
            cpio.dir(dir);
        }
        cpio.char_dev("dev/console", 0o600, 5, 1);
        cpio.char_dev("dev/null", 0o666, 1, 3);
        cpio.file("bin/busybox", 0o755, busybox);
        cpio
    }

    /// The modules (name, file) as `lib/modules/<name>.ko`, decompressed; their names in order.
    pub(crate) fn modules(&mut self, modules: &[(String, PathBuf)]) -> Result<Vec<String>> {
        for (name, path) in modules {
            self.file(
                &format!("lib/modules/{name}.ko"),
                0o644,
                &read_module(path)?,
            );
        }
        Ok(modules.iter().map(|(n, _)| n.clone()).collect())
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, so the archive only depends on its contents
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub(crate) fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    pub(crate) fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    pub(crate) fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, 0o020000 | perm, (major, minor), &[]);
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

/// Finds `prog` in `$PATH` (and the sbin directories root's PATH has).
fn find_program(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/bin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// Installs `qemu-system-x86` if `qemu-system-x86_64` is missing (root only).
pub(crate) fn ensure_qemu() -> Result<PathBuf> {
    if let Some(p) = find_program(QEMU) {
        return Ok(p);
    }
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{QEMU} is not installed: run `apt-get install {QEMU_PACKAGE}` as root, or run this as root so it is installed");
    }
    progress(&format!(
        "installing {QEMU_PACKAGE} (apt-get install --no-install-recommends)"
    ));
    let install = || {
        apt_get(
            &["install", "-y", "--no-install-recommends", QEMU_PACKAGE],
            None,
        )
    };
    let (mut ok, mut text) = install()?;
    if !ok {
        apt_update()?;
        (ok, text) = install()?;
    }
    if !ok {
        bail!(
            "cannot install {QEMU_PACKAGE} with apt-get: {}",
            tail_lines(&text, 5)
        );
    }
    find_program(QEMU)
        .with_context(|| format!("{QEMU_PACKAGE} is installed but {QEMU} is not in PATH"))
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

// ---------------------------------------------------------------------------------------
// QEMU
// ---------------------------------------------------------------------------------------

/// How QEMU runs the guest's CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM if it boots the guest here (probed once per host kernel release), else TCG.
    Auto,
    /// Hardware virtualisation (`-accel kvm -cpu host`).
    Kvm,
    /// QEMU's binary translator: slower, runs anywhere.
    Tcg,
}

impl Accel {
    /// `kvm`, `tcg` or `auto`.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// Parses `kvm`, `tcg` or `auto`.
    pub fn parse(s: &str) -> Result<Accel> {
        match s.trim() {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => bail!("unknown accelerator {other:?}: expected kvm, tcg or auto"),
        }
    }
}

/// What the console reader saw.
#[derive(Default)]
struct ConsoleState {
    lines: VecDeque<String>,
    /// Lines seen in total (a waiter's cursor may lag `lines`).
    seen: usize,
    /// Set by the guardian once QEMU has exited.
    exited: Option<ExitStatus>,
}

#[derive(Default)]
struct Console {
    state: Mutex<ConsoleState>,
    changed: Condvar,
}

impl Console {
    fn push(&self, line: String) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.lines.push_back(line);
        if s.lines.len() > CONSOLE_KEEP {
            s.lines.pop_front();
        }
        s.seen += 1;
        self.changed.notify_all();
    }

    fn set_exited(&self, status: ExitStatus) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.exited = Some(status);
        self.changed.notify_all();
    }

    fn tail(&self, n: usize) -> Vec<String> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.lines
            .iter()
            .skip(s.lines.len().saturating_sub(n))
            .cloned()
            .collect()
    }
}

/// How a wait for a console line ended.
#[derive(Debug, PartialEq)]
enum Seen {
    /// A line matching the wanted predicate.
    Line(String),
    /// A line starting with [`FAILED_MARKER`].
    Failed(String),
    /// QEMU exited.
    Exited(Option<ExitStatus>),
    TimedOut,
}

/// A running QEMU. A guardian thread spawns it (with `PR_SET_PDEATHSIG`, so QEMU dies
/// with that thread even if this process is killed) and, when told to stop or dropped,
/// terminates it and reaps it.
struct Qemu {
    pid: u32,
    console: Arc<Console>,
    stop: Option<mpsc::Sender<()>>,
    guardian: Option<JoinHandle<()>>,
    readers: Vec<JoinHandle<()>>,
}

impl Qemu {
    fn spawn(program: &Path, args: &[String]) -> Result<Qemu> {
        let console = Arc::new(Console::default());
        let (started_tx, started_rx) = mpsc::channel::<Result<(u32, Vec<JoinHandle<()>>)>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at the terminal reaches this process, which
            // tears the lab down in order, and not QEMU directly.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The caller may block termination signals to handle them synchronously
                // (`vtrace-lab vm up` does); QEMU must get SIGTERM when the lab stops it.
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                Ok(())
            });
        }
        let line = command_line(&cmd);
        let guardian_console = console.clone();
        let guardian = std::thread::Builder::new()
            .name("qemu-guardian".into())
            .spawn(move || {
                let mut child = match cmd.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = started_tx.send(Err(anyhow!("cannot start `{line}`: {e}")));
                        return;
                    }
                };
                let mut readers = Vec::new();
                if let Some(out) = child.stdout.take() {
                    let c = guardian_console.clone();
                    readers.push(spawn_reader("qemu-console", out, c, ""));
                }
                if let Some(err) = child.stderr.take() {
                    let c = guardian_console.clone();
                    readers.push(spawn_reader("qemu-stderr", err, c, "qemu: "));
                }
                let _ = started_tx.send(Ok((child.id(), readers)));
                // Until told to stop (or the owner is gone), watch for QEMU exiting.
                while let Err(mpsc::RecvTimeoutError::Timeout) =
                    stop_rx.recv_timeout(Duration::from_millis(100))
                {
                    if let Ok(Some(status)) = child.try_wait() {
                        guardian_console.set_exited(status);
                        return;
                    }
                }
                terminate(&mut child);
                if let Ok(status) = child.wait() {
                    guardian_console.set_exited(status);
                }
            })
            .context("cannot spawn the QEMU guardian thread")?;
        match started_rx.recv() {
            Ok(Ok((pid, readers))) => Ok(Qemu {
                pid,
                console,
                stop: Some(stop_tx),
                guardian: Some(guardian),
                readers,
            }),
            Ok(Err(e)) => {
                let _ = guardian.join();
                Err(e)
            }
            Err(_) => {
                let _ = guardian.join();
                bail!("the QEMU guardian thread ended before starting QEMU")
            }
        }
    }

    /// Waits up to `timeout` for a console line satisfying `want`, a failure line from
    /// `/init`, or QEMU's exit. Lines printed before the call that are still buffered
    /// count too: the marker can arrive between spawning and waiting.
    fn wait_for(&self, want: impl Fn(&str) -> bool, timeout: Duration) -> Seen {
        let deadline = Instant::now() + timeout;
        let mut s = self.console.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut cursor = s.seen - s.lines.len();
        loop {
            let first = s.seen - s.lines.len();
            for i in cursor.max(first)..s.seen {
                let l = &s.lines[i - first];
                if l.contains(FAILED_MARKER) {
                    return Seen::Failed(l.clone());
                }
                if want(l) {
                    return Seen::Line(l.clone());
                }
            }
            cursor = s.seen;
            if s.exited.is_some() {
                return Seen::Exited(s.exited);
            }
            let now = Instant::now();
            if now >= deadline {
                return Seen::TimedOut;
            }
            s = self
                .console
                .changed
                .wait_timeout(s, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Terminates QEMU and waits for it. Idempotent.
    fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(g) = self.guardian.take() {
            let _ = g.join();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.stop();
    }
}

/// SIGTERM, then SIGKILL if QEMU is still there after 2 s.
fn terminate(child: &mut std::process::Child) {
    // SAFETY: signalling our own child, which has not been reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
}

/// Reads `src` line by line into `console`, without terminal escape sequences.
fn spawn_reader(
    name: &str,
    src: impl Read + Send + 'static,
    console: Arc<Console>,
    tag: &'static str,
) -> JoinHandle<()> {
    let body = move || {
        let mut r = BufReader::new(src);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = clean_console_line(&buf);
                    if !line.is_empty() {
                        console.push(format!("{tag}{line}"));
                    }
                }
            }
        }
    };
    std::thread::Builder::new()
        .name(name.into())
        .spawn(body)
        .expect("cannot spawn a console reader thread")
}

/// A console line as text: escape sequences (CSI and two-byte) and control characters
/// removed, trailing white space trimmed.
fn clean_console_line(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // Parameters and intermediates, then one final byte in @..~.
                for f in chars.by_ref() {
                    if ('@'..='~').contains(&f) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if c == '\t' || !c.is_control() {
            out.push(c);
        }
    }
    out.trim_end().to_string()
}

fn host_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn kvm_device_usable() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The common part of every QEMU command line for `image`.
fn base_args(image: &GuestImage, accel: Accel, memory_mib: u32, append: &str) -> Vec<String> {
    let mut a: Vec<String> = ["-machine", "q35", "-accel", accel.name()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if accel == Accel::Kvm {
        a.extend(["-cpu".into(), "host".into()]);
    }
    a.extend(
        [
            "-smp",
            "1",
            "-m",
            &memory_mib.to_string(),
            "-nographic",
            "-no-reboot",
            "-kernel",
            &image.kernel.to_string_lossy(),
            "-initrd",
            &image.initrd.to_string_lossy(),
            "-append",
            append,
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    a
}

/// The guest kernel's command line, before the `vtrace.*` settings.
const BASE_APPEND: &str = "console=ttyS0 quiet ipv6.disable=1 panic=-1";

/// Boots `image` under KVM without NICs and reports whether `/init` started in time.
fn probe_kvm(qemu: &Path, image: &GuestImage) -> Result<bool> {
    let mut args = base_args(
        image,
        Accel::Kvm,
        256,
        &format!("{BASE_APPEND} vtrace.probe=1"),
    );
    args.extend(["-nic".into(), "none".into()]);
    let mut q = Qemu::spawn(qemu, &args)?;
    let seen = q.wait_for(|l| l.contains(STARTED_MARKER), KVM_PROBE_TIMEOUT);
    q.stop();
    Ok(matches!(seen, Seen::Line(_)))
}

/// Resolves [`Accel::Auto`]: `$VTRACE_GUEST_ACCEL`, else TCG without a usable /dev/kvm,
/// else the cached or fresh result of a KVM probe boot.
fn choose_accel(requested: Accel, qemu: &Path, image: &GuestImage) -> Result<Accel> {
    let requested = match (requested, std::env::var("VTRACE_GUEST_ACCEL")) {
        (Accel::Auto, Ok(v)) if !v.trim().is_empty() => {
            Accel::parse(&v).context("in $VTRACE_GUEST_ACCEL")?
        }
        (r, _) => r,
    };
    if requested != Accel::Auto {
        return Ok(requested);
    }
    if !kvm_device_usable() {
        return Ok(Accel::Tcg);
    }
    let cache = image
        .cache_dir
        .join(format!("accel-probe-{}", host_release()));
    if let Ok(text) = fs::read_to_string(&cache) {
        if let Ok(a @ (Accel::Kvm | Accel::Tcg)) = Accel::parse(&text) {
            return Ok(a);
        }
    }
    progress(&format!(
        "probing whether KVM boots the guest here (up to {} s, once per host kernel)",
        KVM_PROBE_TIMEOUT.as_secs()
    ));
    let accel = if probe_kvm(qemu, image)? {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    progress(&format!(
        "KVM probe: using {} (cached in {})",
        accel.name(),
        cache.display()
    ));
    let _ = fs::write(&cache, accel.name());
    Ok(accel)
}

// ---------------------------------------------------------------------------------------
// The lab
// ---------------------------------------------------------------------------------------

/// What [`VmLab::up`] builds.
#[derive(Debug, Clone)]
pub struct VmLabOptions {
    /// Lab id, 5 characters of `[a-z0-9]`; names are `vl` + id + role.
    pub id: String,
    /// Where the guest image is built and cached ([`GuestImage::default_cache_dir`]).
    pub cache_dir: PathBuf,
    /// CPU acceleration.
    pub accel: Accel,
    /// How long the guest may take from QEMU's start to the ready marker.
    pub boot_timeout: Duration,
    /// Guest memory.
    pub memory_mib: u32,
    /// Pings sent through the guest once it is ready (at least one must come back);
    /// 0 skips the check. They also warm up QEMU's translation caches under TCG.
    pub warmup_pings: u32,
}

impl Default for VmLabOptions {
    fn default() -> Self {
        VmLabOptions {
            id: names::unique_id(),
            cache_dir: GuestImage::default_cache_dir(),
            accel: Accel::Auto,
            boot_timeout: Duration::from_secs(120),
            memory_mib: 256,
            warmup_pings: 5,
        }
    }
}

impl VmLabOptions {
    /// Same as [`Default::default`].
    pub fn new() -> Self {
        Self::default()
    }
}

/// Names and addresses of the path through the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterPath {
    /// Namespace of the sender, `{P}-ra`.
    pub sender_ns: String,
    /// Namespace of the receiver, `{P}-rb`.
    pub receiver_ns: String,
    /// Address of `eth0` in the sender namespace (198.18.2.1).
    pub sender_ip: Ipv4Addr,
    /// Address of `eth0` in the receiver namespace (198.18.3.2).
    pub receiver_ip: Ipv4Addr,
    /// MAC of `eth0` in the sender namespace.
    pub sender_mac: String,
    /// MAC of `eth0` in the receiver namespace.
    pub receiver_mac: String,
    /// Host end of the sender's veth, `{P}ra` (on `bridge_a`).
    pub sender_veth: String,
    /// Host end of the receiver's veth, `{P}rb` (on `bridge_b`).
    pub receiver_veth: String,
    /// Bridge of the sender side, `{P}ga`.
    pub bridge_a: String,
    /// Bridge of the receiver side, `{P}gb`.
    pub bridge_b: String,
    /// Tap of the guest's first NIC, `{P}qa` (on `bridge_a`).
    pub tap_a: String,
    /// Tap of the guest's second NIC, `{P}qb` (on `bridge_b`).
    pub tap_b: String,
    /// The guest's address on side A (198.18.2.254), the sender's gateway.
    pub guest_ip_a: Ipv4Addr,
    /// The guest's address on side B (198.18.3.254), the receiver's gateway.
    pub guest_ip_b: Ipv4Addr,
    /// MAC of the guest's first NIC.
    pub guest_mac_a: String,
    /// MAC of the guest's second NIC.
    pub guest_mac_b: String,
}

/// Everything [`VmLab::up`] created: QEMU, then the devices, namespaces and owner file
/// recorded by the lab's own clean-up guard. Dropping it stops QEMU first, then undoes the rest
/// newest first.
#[derive(Default)]
struct Resources {
    qemu: Option<Qemu>,
    cleanup: Cleanup,
}

impl Resources {
    fn run(&mut self) {
        if let Some(mut q) = self.qemu.take() {
            q.stop();
        }
        self.cleanup.run();
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        self.run();
    }
}

/// A running lab whose router is a QEMU guest. Dropping it stops QEMU and removes every
/// namespace and device it created.
pub struct VmLab {
    id: String,
    prefix: String,
    path: RouterPath,
    image: GuestImage,
    accel: Accel,
    vhost: bool,
    boot_time: Duration,
    qemu_pid: u32,
    res: Resources,
}

impl std::fmt::Debug for VmLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmLab")
            .field("id", &self.id)
            .field("path", &self.path)
            .field("accel", &self.accel)
            .field("vhost", &self.vhost)
            .field("qemu_pid", &self.qemu_pid)
            .finish()
    }
}

impl VmLab {
    /// Builds (or takes from the cache) the guest image, builds the host side, boots the
    /// guest and waits until it routes. On failure everything already created is removed
    /// and the error carries the tail of the guest's console.
    pub fn up(opts: VmLabOptions) -> Result<VmLab> {
        validate_id(&opts.id)?;
        let qemu = ensure_qemu()?;
        let image = GuestImage::ensure(&opts.cache_dir)?;
        let accel = choose_accel(opts.accel, &qemu, &image)?;
        let vhost = accel == Accel::Kvm && Path::new("/dev/vhost-net").exists();

        let id = opts.id.clone();
        let p = prefix(&id);
        let mut res = Resources::default();
        claim_id(&id, &mut res.cleanup)?;
        let path = router_path(&id, &p);
        build_host_side(&path, &mut res).context("cannot build the host side of the VM lab")?;

        let append = format!(
            "{BASE_APPEND} vtrace.nic={},{}/{VM_PREFIX_LEN},{},{} vtrace.nic={},{}/{VM_PREFIX_LEN},{},{}",
            path.guest_mac_a,
            path.guest_ip_a,
            path.sender_ip,
            path.sender_mac,
            path.guest_mac_b,
            path.guest_ip_b,
            path.receiver_ip,
            path.receiver_mac
        );
        let mut args = base_args(&image, accel, opts.memory_mib, &append);
        args.extend(["-name".into(), format!("vtrace-{p}")]);
        for (nic, tap, mac) in [
            ("na", &path.tap_a, &path.guest_mac_a),
            ("nb", &path.tap_b, &path.guest_mac_b),
        ] {
            let vhost_opt = if vhost { ",vhost=on" } else { "" };
            args.extend([
                "-netdev".into(),
                format!("tap,id={nic},ifname={tap},script=no,downscript=no{vhost_opt}"),
                "-device".into(),
                // No option ROM: nothing boots from the network, and SeaBIOS is faster.
                format!("virtio-net-pci,netdev={nic},mac={mac},romfile="),
            ]);
        }
        progress(&format!(
            "booting the guest ({}{}, {} MiB) on taps {} and {}",
            accel.name(),
            if vhost { ", vhost-net" } else { "" },
            opts.memory_mib,
            path.tap_a,
            path.tap_b
        ));
        let started = Instant::now();
        let q = res.qemu.insert(Qemu::spawn(&qemu, &args)?);
        let qemu_pid = q.pid;
        let seen = q.wait_for(|l| l.contains(READY_MARKER), opts.boot_timeout);
        let boot_time = started.elapsed();
        let tail = || q.console.tail(25).join("\n  ");
        match seen {
            Seen::Line(_) => {}
            Seen::Failed(l) => bail!("the guest's /init failed: {l}; console tail:\n  {}", tail()),
            Seen::Exited(st) => bail!(
                "QEMU exited ({}) before the guest was ready; console tail:\n  {}",
                st.map_or("status unknown".to_string(), |s| s.to_string()),
                tail()
            ),
            Seen::TimedOut => bail!(
                "the guest did not report {READY_MARKER} within {} s (accel {}); console tail:\n  {}",
                opts.boot_timeout.as_secs(),
                accel.name(),
                tail()
            ),
        }
        progress(&format!("guest ready in {:.1} s", boot_time.as_secs_f64()));
        let lab = VmLab {
            id,
            prefix: p,
            path,
            image,
            accel,
            vhost,
            boot_time,
            qemu_pid,
            res,
        };
        if opts.warmup_pings > 0 {
            let stats = ping(
                &lab.path.sender_ns,
                lab.path.receiver_ip,
                opts.warmup_pings,
                Duration::from_millis(50),
            )?;
            if stats.received == 0 {
                bail!(
                    "the guest booted but does not route: {} pings from {} to {} unanswered; console tail:\n  {}",
                    stats.transmitted,
                    lab.path.sender_ip,
                    lab.path.receiver_ip,
                    lab.console_tail(25).join("\n  ")
                );
            }
        }
        Ok(lab)
    }

    /// The lab id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The name prefix, `vl` + id.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Names and addresses of the path through the guest.
    pub fn path(&self) -> &RouterPath {
        &self.path
    }

    /// The image the guest booted.
    pub fn image(&self) -> &GuestImage {
        &self.image
    }

    /// The accelerator QEMU runs with (never [`Accel::Auto`]).
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// Whether the NICs use vhost-net (else QEMU's userspace virtio-net backend).
    pub fn vhost(&self) -> bool {
        self.vhost
    }

    /// From QEMU's start to the guest's ready marker.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// QEMU's process id.
    pub fn qemu_pid(&self) -> u32 {
        self.qemu_pid
    }

    /// The last `n` lines of the guest's serial console (and QEMU's stderr, prefixed
    /// `qemu: `).
    pub fn console_tail(&self, n: usize) -> Vec<String> {
        self.res
            .qemu
            .as_ref()
            .map(|q| q.console.tail(n))
            .unwrap_or_default()
    }

    /// The lab's network namespaces.
    pub fn namespaces(&self) -> Vec<String> {
        vec![self.path.sender_ns.clone(), self.path.receiver_ns.clone()]
    }

    /// The lab's devices in the host namespace.
    pub fn host_devices(&self) -> Vec<String> {
        let p = &self.path;
        [
            &p.sender_veth,
            &p.receiver_veth,
            &p.bridge_a,
            &p.bridge_b,
            &p.tap_a,
            &p.tap_b,
        ]
        .into_iter()
        .cloned()
        .collect()
    }
}

/// A locally administered MAC: 02:76, two bytes from the id, the subnet's third octet
/// (2 or 3) and the host's last octet.
fn vm_mac(id: &str, subnet: u8, host: u8) -> String {
    let h = id.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!(
        "02:76:{:02x}:{:02x}:{subnet:02x}:{host:02x}",
        (h >> 8) & 0xff,
        h & 0xff
    )
}

fn router_path(id: &str, p: &str) -> RouterPath {
    let mac = |ip: Ipv4Addr| {
        let o = ip.octets();
        vm_mac(id, o[2], o[3])
    };
    RouterPath {
        sender_ns: format!("{p}-ra"),
        receiver_ns: format!("{p}-rb"),
        sender_ip: VM_SENDER_IP,
        receiver_ip: VM_RECEIVER_IP,
        sender_mac: mac(VM_SENDER_IP),
        receiver_mac: mac(VM_RECEIVER_IP),
        sender_veth: format!("{p}ra"),
        receiver_veth: format!("{p}rb"),
        bridge_a: format!("{p}ga"),
        bridge_b: format!("{p}gb"),
        tap_a: format!("{p}qa"),
        tap_b: format!("{p}qb"),
        guest_ip_a: VM_GUEST_IP_A,
        guest_ip_b: VM_GUEST_IP_B,
        guest_mac_a: mac(VM_GUEST_IP_A),
        guest_mac_b: mac(VM_GUEST_IP_B),
    }
}

/// An end host: namespace `ns`, `eth0` (a veth whose host end is on `bridge`) with `addr`,
/// a route to the other subnet via `gateway`, whose MAC is entered statically.
#[allow(clippy::too_many_arguments)]
fn add_routed_endpoint(
    ns: &str,
    host_end: &str,
    mac: &str,
    addr: Ipv4Addr,
    bridge: &str,
    other_subnet: &str,
    gateway: Ipv4Addr,
    gateway_mac: &str,
    res: &mut Resources,
) -> Result<()> {
    add_endpoint(
        ns,
        host_end,
        mac,
        addr,
        bridge,
        VM_PREFIX_LEN,
        &mut res.cleanup,
    )?;
    let gw = gateway.to_string();
    ip(&[
        "-n",
        ns,
        "neigh",
        "replace",
        &gw,
        "lladdr",
        gateway_mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        other_subnet,
        "via",
        &gw,
        "dev",
        "eth0",
    ])?;
    Ok(())
}

/// A persistent tap (QEMU attaches to it by name) on `bridge`.
fn add_tap(name: &str, bridge: &str, res: &mut Resources) -> Result<()> {
    ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
    res.cleanup.push(Step::Link(name.to_string()));
    disable_ipv6_host(name)?;
    attach_to_bridge(name, bridge)
}

fn build_host_side(p: &RouterPath, res: &mut Resources) -> Result<()> {
    add_bridge(&p.bridge_a, &mut res.cleanup)?;
    add_bridge(&p.bridge_b, &mut res.cleanup)?;
    let subnet = |ip: Ipv4Addr| {
        let o = ip.octets();
        format!("{}.{}.{}.0/{VM_PREFIX_LEN}", o[0], o[1], o[2])
    };
    add_routed_endpoint(
        &p.sender_ns,
        &p.sender_veth,
        &p.sender_mac,
        p.sender_ip,
        &p.bridge_a,
        &subnet(p.receiver_ip),
        p.guest_ip_a,
        &p.guest_mac_a,
        res,
    )?;
    add_routed_endpoint(
        &p.receiver_ns,
        &p.receiver_veth,
        &p.receiver_mac,
        p.receiver_ip,
        &p.bridge_b,
        &subnet(p.sender_ip),
        p.guest_ip_b,
        &p.guest_mac_b,
        res,
    )?;
    add_tap(&p.tap_a, &p.bridge_a, res)?;
    add_tap(&p.tap_b, &p.bridge_b, res)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::is_lab_addr;

    #[test]
    fn addresses_are_lab_addresses_on_two_subnets() {
        for a in [VM_SENDER_IP, VM_GUEST_IP_A, VM_RECEIVER_IP, VM_GUEST_IP_B] {
            assert!(is_lab_addr(a), "{a}");
        }
        assert_eq!(VM_SENDER_IP.octets()[..3], VM_GUEST_IP_A.octets()[..3]);
        assert_eq!(VM_RECEIVER_IP.octets()[..3], VM_GUEST_IP_B.octets()[..3]);
        assert_ne!(VM_SENDER_IP.octets()[..3], VM_RECEIVER_IP.octets()[..3]);
    }

    #[test]
    fn names_are_lab_names_and_fit() {
        let p = router_path("ab1c9", "vlab1c9");
        for n in [
            &p.sender_ns,
            &p.receiver_ns,
            &p.sender_veth,
            &p.receiver_veth,
            &p.bridge_a,
            &p.bridge_b,
            &p.tap_a,
            &p.tap_b,
        ] {
            assert_eq!(names::lab_id_of(n), Some("ab1c9"), "{n}");
            assert!(n.len() <= names::MAX_IFNAME, "{n}");
        }
        let macs = [
            &p.sender_mac,
            &p.receiver_mac,
            &p.guest_mac_a,
            &p.guest_mac_b,
        ];
        let distinct: HashSet<_> = macs.iter().collect();
        assert_eq!(distinct.len(), 4);
        assert!(macs
            .iter()
            .all(|m| m.starts_with("02:76:") && m.len() == 17));
    }

    #[test]
    fn kernel_dependency_is_found() {
        assert_eq!(
            kernel_dependency("linux-image-6.1.0-56-amd64 (= 6.1.192-2)").as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(
            kernel_dependency("foo, linux-image-6.12.9-amd64 (= 6.12.9-1) | bar").as_deref(),
            Some("linux-image-6.12.9-amd64")
        );
        assert_eq!(kernel_dependency("initramfs-tools"), None);
    }

    #[test]
    fn module_names_are_normalised() {
        assert_eq!(module_name("virtio_net.ko").as_deref(), Some("virtio_net"));
        assert_eq!(module_name("nf-nat.ko.xz").as_deref(), Some("nf_nat"));
        assert_eq!(module_name("x.ko.zst").as_deref(), Some("x"));
        assert_eq!(module_name("modules.dep"), None);
    }

    #[test]
    fn dependencies_come_first() {
        let graph: BTreeMap<&str, Vec<&str>> = [
            ("virtio_net", vec!["virtio_ring", "virtio", "net_failover"]),
            ("net_failover", vec!["failover"]),
            ("failover", vec![]),
            ("virtio", vec!["virtio_ring"]),
            ("virtio_ring", vec![]),
            ("virtio_pci", vec!["virtio_ring", "virtio", "builtin_thing"]),
        ]
        .into_iter()
        .collect();
        let order = dependency_order(&["virtio_pci", "virtio_net"], |n| {
            Ok(graph
                .get(n)
                .map(|d| d.iter().map(|s| s.to_string()).collect()))
        })
        .expect("orders");
        assert_eq!(
            order,
            [
                "virtio_ring",
                "virtio",
                "virtio_pci",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
        let cyclic = dependency_order(&["a"], |n| {
            Ok(Some(vec![if n == "a" { "b" } else { "a" }.to_string()]))
        });
        assert!(format!("{:#}", cyclic.expect_err("cycle")).contains("cycle"));
    }

    /// A minimal ELF64 with a section-name table and a `.modinfo` section.
    fn fake_module(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        let strtab_off = elf.len();
        elf.extend_from_slice(shstrtab);
        let modinfo_off = elf.len();
        elf.extend_from_slice(modinfo);
        while !elf.len().is_multiple_of(8) {
            elf.push(0);
        }
        let shoff = elf.len();
        let mut section = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        section(0, 0, 0);
        section(1, strtab_off, shstrtab.len());
        section(11, modinfo_off, modinfo.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        elf
    }

    #[test]
    fn modinfo_depends_are_read() {
        let m =
            fake_module(b"license=GPL\0depends=virtio_ring,virtio,net-failover\0vermagic=6.1\0");
        assert_eq!(
            modinfo_depends(&m).expect("parses"),
            ["virtio_ring", "virtio", "net_failover"]
        );
        let none = fake_module(b"license=GPL\0depends=\0");
        assert!(modinfo_depends(&none).expect("parses").is_empty());
        assert!(modinfo_depends(b"not an elf").is_err());
        assert!(modinfo_depends(&fake_module(b"")[..70]).is_err());
    }

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut w = CpioWriter::default();
        w.dir("bin");
        w.file("init", 0o755, b"#!/bin/sh\n");
        w.char_dev("dev/console", 0o600, 5, 1);
        let a = w.finish();
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        // Walk the entries back: magic, fields, name, data, each 4-aligned.
        let mut off = 0;
        let mut seen = Vec::new();
        loop {
            let hdr = &a[off..off + 110];
            assert_eq!(&hdr[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(
                    std::str::from_utf8(&hdr[6 + 8 * i..14 + 8 * i]).unwrap(),
                    16,
                )
                .unwrap() as usize
            };
            let (mode, size, namesize) = (field(1), field(6), field(11));
            let name = std::str::from_utf8(&a[off + 110..off + 110 + namesize - 1]).unwrap();
            seen.push((name.to_string(), mode, field(9), field(10)));
            off = (off + 110 + namesize).div_ceil(4) * 4;
            off = (off + size).div_ceil(4) * 4;
            if name == "TRAILER!!!" {
                break;
            }
        }
        assert_eq!(off, a.len());
        assert_eq!(seen[0], ("bin".into(), 0o040755, 0, 0));
        assert_eq!(seen[1], ("init".into(), 0o100755, 0, 0));
        assert_eq!(seen[2], ("dev/console".into(), 0o020600, 5, 1));
    }

    #[test]
    fn console_lines_lose_escapes() {
        assert_eq!(
            clean_console_line(b"\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16)\r\n"),
            "SeaBIOS (version 1.16)"
        );
        assert_eq!(clean_console_line(b"VTRACE_GUEST_READY\r\n"), READY_MARKER);
    }

    #[test]
    fn init_script_carries_the_markers() {
        assert!(INIT_TEMPLATE.contains(READY_MARKER));
        assert!(INIT_TEMPLATE.contains("FAILED: "));
        assert!(FAILED_MARKER.starts_with("vtrace-guest: FAILED"));
        assert!(INIT_TEMPLATE.contains(STARTED_MARKER.trim_start_matches("vtrace-guest: ")));
        assert!(INIT_TEMPLATE.contains("@MODULES@"));
        assert!(INIT_TEMPLATE.contains("ip_forward"));
    }

    #[test]
    fn accel_names_round_trip() {
        for a in [Accel::Auto, Accel::Kvm, Accel::Tcg] {
            assert_eq!(Accel::parse(a.name()).unwrap(), a);
        }
        assert!(Accel::parse("hvf").is_err());
    }

    #[test]
    fn wait_sees_lines_printed_before_the_wait() {
        let console = Arc::new(Console::default());
        console.push("early".into());
        console.push(READY_MARKER.into());
        let q = Qemu {
            pid: 0,
            console: console.clone(),
            stop: None,
            guardian: None,
            readers: Vec::new(),
        };
        assert_eq!(
            q.wait_for(|l| l.contains(READY_MARKER), Duration::from_millis(10)),
            Seen::Line(READY_MARKER.into())
        );
        console.push(format!("{FAILED_MARKER} no NIC"));
        assert!(matches!(
            q.wait_for(|l| l == "never", Duration::from_millis(10)),
            Seen::Failed(_)
        ));
        let fresh = Qemu {
            pid: 0,
            console: Arc::new(Console::default()),
            stop: None,
            guardian: None,
            readers: Vec::new(),
        };
        assert_eq!(
            fresh.wait_for(|_| true, Duration::from_millis(20)),
            Seen::TimedOut
        );
    }
}
