//! What vtrace needs from the system before it touches the kernel: capabilities, and tracefs
//! and bpffs where a feature needs them.

use std::path::Path;

use anyhow::{bail, Result};

/// Capability numbers (include/uapi/linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The effective capability set of this process, from /proc/self/status.
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string()))
        })
        .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
        .unwrap_or(0)
}

/// Which of the capabilities vtrace needs are missing from `caps`. CAP_SYS_ADMIN stands in
/// for CAP_BPF and CAP_PERFMON (kernels before 5.8 know only it).
pub fn missing_caps(caps: u64) -> Vec<&'static str> {
    let has = |c: u32| caps & (1u64 << c) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

/// Fails with one line naming what is missing and how to grant it.
pub fn require() -> Result<()> {
    let missing = missing_caps(effective_caps());
    if !missing.is_empty() {
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "vtrace".into());
        bail!(
            "missing {}: run vtrace as root (sudo), or grant them with `sudo setcap cap_bpf,cap_perfmon,cap_net_admin+ep {exe}`",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Mounts tracefs at /sys/kernel/tracing if it is not mounted (kprobes and classic
/// tracepoints go through it).
pub fn ensure_tracefs() -> Result<()> {
    ensure_mount("/sys/kernel/tracing", "tracefs", "tracefs")
}

fn ensure_mount(target: &str, fstype: &str, source: &str) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(target))
    {
        return Ok(());
    }
    if !Path::new(target).exists() {
        bail!("{target} does not exist: this kernel lacks {fstype}");
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL in constant strings");
    let (src, tgt, fs) = (c(source), c(target), c(fstype));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        bail!(
            "{fstype} is not mounted and mounting it failed ({}): run `mount -t {fstype} {source} {target}` as root",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_is_missing() {
        assert_eq!(
            missing_caps(0),
            vec!["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]
        );
        let root = u64::MAX >> 23;
        assert!(missing_caps(root).is_empty());
        // CAP_SYS_ADMIN covers BPF and PERFMON, not NET_ADMIN.
        assert_eq!(missing_caps(1 << CAP_SYS_ADMIN), vec!["CAP_NET_ADMIN"]);
        assert!(
            missing_caps((1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN)).is_empty()
        );
    }
}
