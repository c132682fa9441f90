//! `cargo xtask setup`: everything building and testing vtrace needs, installed by the project
//! itself on a fresh machine. Each step checks first and does nothing when already done.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// Debian packages the lab and the tests use: `ip` (namespaces, veth, bridges), `ping`,
/// `nft` (a drop rule in the drops tests), `bpftool` (checks that nothing stays loaded),
/// `ethtool` (turns on veth GRO, which gives a veth a NAPI poll, in the driver discovery test),
/// `prometheus` (scrapes `vtrace serve` in its test).
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "/usr/sbin/ip"),
    ("iputils-ping", "/usr/bin/ping"),
    ("nftables", "/usr/sbin/nft"),
    ("bpftool", "/usr/sbin/bpftool"),
    ("ethtool", "/usr/sbin/ethtool"),
    ("prometheus", "/usr/bin/prometheus"),
];

/// The bpf-linker release known to build against LLVM 22 with stable cargo's resolver.
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    packages()?;
    nightly()?;
    rust_src()?;
    bpf_linker()?;
    Ok(())
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, bin)| !Path::new(bin).exists())
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    crate::require_root(&format!("installing Debian packages {}", missing.join(" ")))?;
    eprintln!("xtask setup: installing {}", missing.join(" "));
    let quiet = |c: &mut Command| -> Result<()> {
        let out = c
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .context("running apt-get")?;
        if !out.status.success() {
            bail!(
                "{:?} failed: {}",
                c,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    quiet(Command::new("apt-get").args(["update", "-q"]))?;
    quiet(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )?;
    Ok(())
}

fn rustup(args: &[&str]) -> Command {
    let mut c = Command::new("rustup");
    c.args(args)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC");
    c
}

fn nightly() -> Result<()> {
    if rustup(&["run", "nightly", "rustc", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        return Ok(());
    }
    eprintln!("xtask setup: installing the nightly toolchain (the eBPF crate needs -Z build-std)");
    let st = rustup(&[
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ])
    .status()?;
    if !st.success() {
        bail!("cannot install the nightly toolchain: install it with `rustup toolchain install nightly --component rust-src`");
    }
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = rustup(&["run", "nightly", "rustc", "--print", "sysroot"]).output()?;
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn rust_src() -> Result<()> {
    if nightly_sysroot()?
        .join("lib/rustlib/src/rust/library/core")
        .exists()
    {
        return Ok(());
    }
    eprintln!("xtask setup: adding rust-src to the nightly toolchain");
    let st = rustup(&["component", "add", "rust-src", "--toolchain", "nightly"]).status()?;
    if !st.success() {
        bail!("`rustup component add rust-src --toolchain nightly` failed");
    }
    Ok(())
}

fn cargo_home() -> PathBuf {
    std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo")
        })
}

/// The LLVM major version the nightly compiler was built with (`LLVM version: 22.1.4`).
pub fn llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.trim().split('.').next())
        .and_then(|m| m.parse().ok())
}

fn bpf_linker_works() -> bool {
    let path = format!(
        "{}:{}",
        cargo_home().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bpf-linker")
        .arg("--version")
        .env("PATH", path)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// bpf-linker has no prebuilt binary reachable here; it builds from crates.io against the
/// nightly toolchain's own libLLVM, so its LLVM matches the bitcode rustc emits.
fn bpf_linker() -> Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    let vv = rustup(&["run", "nightly", "rustc", "-vV"]).output()?;
    let vv = String::from_utf8_lossy(&vv.stdout).to_string();
    let major =
        llvm_major(&vv).context("cannot read the LLVM version from `rustc +nightly -vV`")?;
    let lib_dir = nightly_sysroot()?.join("lib");
    let libllvm = fs::read_dir(&lib_dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so"))
        })
        .with_context(|| format!("no libLLVM in {}", lib_dir.display()))?;
    // A prefix whose lib/ holds libLLVM.so (for the build) and the library under its own
    // soname (for the runtime search path the build records).
    let prefix = cargo_home().join(format!("vtrace-llvm-{major}"));
    let plib = prefix.join("lib");
    fs::create_dir_all(&plib)?;
    for name in [
        "libLLVM.so".to_string(),
        libllvm
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string(),
    ] {
        let link = plib.join(&name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!("xtask setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly toolchain's LLVM {major} (about a minute)");
    let st = rustup(&[
        "run",
        "nightly",
        "cargo",
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
    ])
    .arg(format!("llvm-{major}"))
    .env("LLVM_PREFIX", &prefix)
    .status()
    .context("running cargo install bpf-linker")?;
    if !st.success() || !bpf_linker_works() {
        bail!("building bpf-linker failed (see above)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_llvm_major() {
        let vv =
            "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv), Some(22));
        assert_eq!(llvm_major("rustc 1.0"), None);
    }
}
