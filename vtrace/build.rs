//! Builds the eBPF programs (`vtrace-ebpf`, target bpfel-unknown-none, nightly + build-std) and
//! puts the object in OUT_DIR, where `src/tracer.rs` embeds it. A plain `cargo build` thus builds
//! everything. The toolchain pieces come from `cargo xtask setup`.

use std::{
    env,
    path::{Path, PathBuf},
    process::{exit, Command},
};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest
        .parent()
        .expect("vtrace/ is inside the workspace")
        .to_path_buf();
    let ebpf = root.join("vtrace-ebpf");
    let out = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    for p in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        ".cargo/config.toml",
        "rust-toolchain.toml",
    ] {
        println!("cargo:rerun-if-changed={}", ebpf.join(p).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("vtrace-common/src").display()
    );

    if let Err(missing) = toolchain_ready() {
        println!(
            "cargo:warning=vtrace: the eBPF toolchain is not set up ({missing}): run `cargo xtask setup`"
        );
        eprintln!("vtrace: the eBPF toolchain is not set up ({missing}): run `cargo xtask setup`");
        exit(1);
    }

    let target_dir = root.join("target").join("ebpf");
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--release",
        "--manifest-path",
    ])
    .arg(ebpf.join("Cargo.toml"))
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(&ebpf);
    // The outer cargo's settings are for the host target and the stable toolchain: none of them
    // may leak into the nested build.
    for (k, _) in env::vars() {
        if (k.starts_with("CARGO_") && k != "CARGO_HOME")
            || k.starts_with("RUSTC")
            || k == "RUSTFLAGS"
            || k == "RUSTUP_TOOLCHAIN"
            || k == "RUSTDOC"
        {
            cmd.env_remove(&k);
        }
    }
    cmd.env("PATH", path_with_cargo_bin());
    let status = cmd.status().unwrap_or_else(|e| {
        eprintln!(
            "vtrace: cannot run rustup to build the eBPF programs: {e}: run `cargo xtask setup`"
        );
        exit(1);
    });
    if !status.success() {
        eprintln!("vtrace: building the eBPF programs (vtrace-ebpf) failed; see the errors above");
        exit(1);
    }
    let obj = target_dir.join("bpfel-unknown-none/release/vtrace");
    std::fs::copy(&obj, out.join("vtrace.bpf.o")).unwrap_or_else(|e| {
        eprintln!("vtrace: cannot copy {}: {e}", obj.display());
        exit(1);
    });
}

/// The nightly toolchain with rust-src, and a bpf-linker that runs.
fn toolchain_ready() -> Result<(), &'static str> {
    let ok = |c: &mut Command| {
        c.env("PATH", path_with_cargo_bin())
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if !ok(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        return Err("no nightly toolchain");
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if !Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/core")
        .exists()
    {
        return Err("no rust-src for nightly");
    }
    if !ok(Command::new("bpf-linker").arg("--version")) {
        return Err("bpf-linker missing or broken");
    }
    Ok(())
}

fn path_with_cargo_bin() -> String {
    let home = env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo")
        });
    format!(
        "{}:{}",
        home.join("bin").display(),
        env::var("PATH").unwrap_or_default()
    )
}
