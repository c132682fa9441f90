//! A one-shot guest on a distribution kernel: boots Debian's kernel (the one `linux-image-amd64`
//! depends on, as the VM lab's guest) under QEMU with some of its modules loaded and a program
//! of the caller's (with the shared libraries it links), runs a shell script, and returns what
//! the serial console printed.
//!
//! What it is for: kernels where bridge, veth or vhost-net are *modules* with their own BTF
//! (`/sys/kernel/btf/<module>`), as on every distribution, unlike the test machine's kernel,
//! which has no module support and refuses fentry. vtrace's fentry path for module functions
//! runs there for real.
//!
//! The guest has no network device; everything happens inside it. It is booted with TCG (no
//! KVM needed), `-no-reboot`, and powered off by its `/init` when the script ends. The Debian
//! packages are the VM lab's, cached in the same directory.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::run;
use crate::guest::{
    download, ensure_qemu, gzip_to, kernel_dependency, kernel_release, lock_dir, read, read_module,
    resolve_modules, unpack, CpioWriter, BUSYBOX_PACKAGE, INITRAMFS_DIRS, KERNEL_METAPACKAGE,
};

/// A `linux-image-*.deb` to boot instead of the one `linux-image-amd64` depends on (its
/// modules come from the same package).
pub const KERNEL_DEB_ENV: &str = "VTRACE_GUEST_KERNEL_DEB";

/// The line `/init` prints after the script, with its exit status.
pub const DONE_MARKER: &str = "VTRACE_GUEST_RUN_DONE";

/// What to run.
pub struct GuestRun<'a> {
    /// Modules to load, by name (their dependencies are loaded first).
    pub modules: &'a [&'a str],
    /// Modules (among `modules` or their dependencies) whose BTF is removed before they are
    /// packed (`objcopy --remove-section=.BTF`): as a kernel built without
    /// CONFIG_DEBUG_INFO_BTF_MODULES loads them, with no /sys/kernel/btf/<module>.
    pub without_btf: &'a [&'a str],
    /// Host programs to copy to `/bin/<name>` in the guest, with their shared libraries.
    pub programs: &'a [&'a Path],
    /// Run by busybox `sh` after the modules are loaded.
    pub script: &'a str,
    /// The whole boot, script included, must end within this.
    pub timeout: Duration,
}

/// What the guest printed, and which kernel it ran.
pub struct GuestOutput {
    pub kernel_release: String,
    pub console: String,
    /// The script's exit status, from the done marker.
    pub status: Option<i32>,
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || echo "guest-run: insmod $m failed"
done
ip link set lo up
sh /script
echo "VTRACE_GUEST_RUN_DONE $?"
poweroff -f
"#;

/// A copy of module `ko` (decompressed) at `dest` without its `.BTF` section.
fn without_btf(ko: &Path, dest: &Path) -> Result<PathBuf> {
    fs::write(dest, read_module(ko)?)
        .with_context(|| format!("cannot write {}", dest.display()))?;
    run(Command::new("objcopy")
        .arg("--remove-section=.BTF")
        .arg(dest))
    .with_context(|| format!("removing the BTF of {}", ko.display()))?;
    Ok(dest.to_path_buf())
}

/// Boots the guest and runs `what.script` in it. Needs root only to install QEMU when missing;
/// downloads two Debian packages the first time (see `guest::GuestImage::ensure`).
pub fn run_in_guest(cache_dir: &Path, what: &GuestRun) -> Result<GuestOutput> {
    let qemu = ensure_qemu()?;
    fs::create_dir_all(cache_dir)
        .with_context(|| format!("cannot create {}", cache_dir.display()))?;
    let debs = cache_dir.join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("cannot create {}", debs.display()))?;
    let work = tempdir(cache_dir)?;
    let result = (|| -> Result<GuestOutput> {
        let (vmlinuz, release, initrd) = {
            // The .debs are shared with the VM lab's image builder: same lock.
            let _lock = lock_dir(cache_dir)?;
            let kernel_deb = match std::env::var_os(KERNEL_DEB_ENV) {
                // Another distribution kernel, for a run by hand (e.g. a backport).
                Some(path) => PathBuf::from(path),
                None => {
                    let meta = download(&debs, KERNEL_METAPACKAGE, false)?;
                    let depends = run(Command::new("dpkg-deb")
                        .args(["-f"])
                        .arg(&meta)
                        .arg("Depends"))?;
                    let kernel_package = kernel_dependency(&depends)
                        .with_context(|| format!("no linux-image-* dependency in {depends:?}"))?;
                    download(&debs, &kernel_package, false)?
                }
            };
            let busybox_deb = download(&debs, BUSYBOX_PACKAGE, false)?;
            let kroot = work.join("kernel");
            let broot = work.join("busybox");
            unpack(&kernel_deb, &kroot)?;
            unpack(&busybox_deb, &broot)?;
            let release = kernel_release(&kroot)?;
            let vmlinuz = kroot.join("boot").join(format!("vmlinuz-{release}"));
            let mut modules =
                resolve_modules(&kroot.join("lib/modules").join(&release), what.modules)?;
            for (name, path) in modules.iter_mut() {
                if what.without_btf.contains(&name.as_str()) {
                    *path = without_btf(path, &work.join(format!("{name}.ko")))?;
                }
            }
            let mut cpio = CpioWriter::with_busybox(&read(&broot.join("bin/busybox"))?);
            // Programs in /bin, their libraries at the paths the loader looks for them.
            let mut libs = std::collections::BTreeSet::new();
            for prog in what.programs {
                let name = prog
                    .file_name()
                    .with_context(|| format!("{} has no file name", prog.display()))?
                    .to_string_lossy()
                    .into_owned();
                cpio.file(&format!("bin/{name}"), 0o755, &read(prog)?);
                libs.extend(shared_libraries(prog)?);
            }
            let dirs: std::collections::BTreeSet<PathBuf> = libs
                .iter()
                .flat_map(|l| {
                    l.ancestors()
                        .skip(1)
                        .map(Path::to_path_buf)
                        .collect::<Vec<_>>()
                })
                .filter_map(|d| d.strip_prefix("/").ok().map(Path::to_path_buf))
                .filter(|d| {
                    !d.as_os_str().is_empty() && !INITRAMFS_DIRS.contains(&&*d.to_string_lossy())
                })
                .collect();
            // Sorted, a directory comes before everything below it.
            for d in &dirs {
                cpio.dir(&d.to_string_lossy());
            }
            for lib in &libs {
                let rel = lib.strip_prefix("/").unwrap_or(lib);
                cpio.file(&rel.to_string_lossy(), 0o755, &read(lib)?);
            }
            let names = cpio.modules(&modules)?;
            cpio.file(
                "init",
                0o755,
                INIT.replace("@MODULES@", &names.join(" ")).as_bytes(),
            );
            cpio.file("script", 0o644, what.script.as_bytes());
            let initrd = work.join("initrd.cpio.gz");
            gzip_to(&cpio.finish(), &initrd)?;
            (vmlinuz, release, initrd)
        };
        let console = boot(&qemu, &vmlinuz, &initrd, what.timeout)?;
        let status = console
            .lines()
            .find_map(|l| l.trim().strip_prefix(DONE_MARKER))
            .and_then(|s| s.trim().parse().ok());
        Ok(GuestOutput {
            kernel_release: release,
            console,
            status,
        })
    })();
    let _ = fs::remove_dir_all(&work);
    result
}

/// The shared libraries `prog` loads (and the dynamic loader), as `ldd` lists them.
fn shared_libraries(prog: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(prog)
        .output()
        .with_context(|| format!("running ldd {}", prog.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            let p = PathBuf::from(p);
            // Copy the file behind symlinks, under the name the loader asks for.
            if p.exists() {
                libs.push(p);
            }
        }
    }
    Ok(libs)
}

/// A work directory of its own for one run: `run-<pid>-<n>`, so that runs in parallel (tests
/// of one process, or of several) never share one. Directories a dead process left behind
/// (a killed run) are removed on the way.
fn tempdir(cache_dir: &Path) -> Result<PathBuf> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    if let Ok(entries) = fs::read_dir(cache_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("run-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = cache_dir.join(format!("run-{}-{n}", std::process::id()));
    fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    Ok(d)
}

/// Boots under TCG and returns the console output once QEMU exits (the guest powers off).
fn boot(qemu: &Path, kernel: &Path, initrd: &Path, timeout: Duration) -> Result<String> {
    let mut child = Command::new(qemu)
        .args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "1"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 quiet panic=-1 ipv6.disable=1",
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
            "-net",
            "none",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", qemu.display()))?;
    let mut stdout = child.stdout.take().context("qemu stdout")?;
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    });
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            let console = reader.join().unwrap_or_default();
            if !status.success() {
                bail!(
                    "QEMU exited with {status}; console:\n{}",
                    tail(&console, 30)
                );
            }
            return Ok(console);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let console = reader.join().unwrap_or_default();
            bail!(
                "the guest did not finish within {} s; console:\n{}",
                timeout.as_secs(),
                tail(&console, 30)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
