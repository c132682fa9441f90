//! Entering network namespaces from threads.
//!
//! `setns(fd, CLONE_NEWNET)` changes the network namespace of the *calling thread*
//! only (the kernel keeps namespaces per task, and a thread is a task). Unlike user or
//! mount namespaces, joining a network namespace is allowed in a multi-threaded
//! process. Sockets remember the namespace they were created in, and files under
//! `/proc/sys/net` resolve to the namespace of the task that opens them, so a thread
//! that entered a namespace can create sockets and write sysctls there while the rest
//! of the process stays in the host namespace. To avoid leaking the namespace into
//! unrelated work, only ever call [`enter`] on a dedicated thread that ends afterwards
//! ([`run_in`] does exactly that).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};

/// Where `ip netns add NAME` bind-mounts the namespace.
pub fn path(ns: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(ns)
}

/// Moves the calling thread into network namespace `ns` (created by `ip netns add`).
pub fn enter(ns: &str) -> Result<()> {
    let p = path(ns);
    let f =
        File::open(&p).with_context(|| format!("cannot open network namespace {}", p.display()))?;
    // SAFETY: plain syscall on a valid fd; CLONE_NEWNET restricts it to a net namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(anyhow!(
            "setns into network namespace {ns} failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside network namespace `ns` and returns its result.
pub fn run_in<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let ns_owned = ns.to_string();
    let handle = std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || {
            enter(&ns_owned)?;
            f()
        })
        .context("cannot spawn thread")?;
    handle
        .join()
        .map_err(|_| anyhow!("thread working in network namespace {ns} panicked"))?
}

/// Writes `value` to the sysctl file `rel` (relative to `/proc/sys`) in the calling
/// thread's network namespace. A missing file (e.g. IPv6 compiled out) is not an error.
pub fn write_sysctl(rel: &str, value: &str) -> Result<()> {
    let p = PathBuf::from("/proc/sys").join(rel);
    match std::fs::write(&p, value) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow!("cannot write {value} to {}: {e}", p.display())),
    }
}
