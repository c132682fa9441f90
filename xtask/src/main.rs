//! The jobs cargo cannot do by itself: `setup` (toolchain and packages), `test` (the whole
//! suite, privileged), `demo` (the lab, traffic, vtrace's findings), `clean` (lab leftovers).
//! Run as `cargo xtask <job>`.

mod bench;
mod demo;
mod setup;
mod vm_demo;

use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "vtrace's project jobs (run as root)")]
struct Cli {
    #[command(subcommand)]
    job: Job,
}

#[derive(Subcommand)]
enum Job {
    /// Install what building and testing need: Debian packages, nightly rust-src, bpf-linker.
    Setup,
    /// Set up, build everything, and run every test (unit and lab tests; needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, build, bring up the lab, send traffic, trace it and print what vtrace finds.
    Demo {
        /// Seconds of traffic per measurement.
        #[arg(long, default_value = "5")]
        seconds: u64,
        /// Route through a real VM instead: a QEMU guest (built once from Debian's kernel and
        /// busybox, cached in target/vtrace-guest) against the native path, then a 64-byte
        /// flood through it; the paper's Tables III and II side by side.
        #[arg(long)]
        vm: bool,
    },
    /// Measure vtrace's cost on the lab: 64-byte pps with and without vtrace (alternating
    /// pairs), ns per hook invocation, user-space CPU and memory, lost events.
    Bench {
        /// Off/on pairs per path (the median ratio is reported).
        #[arg(long, default_value = "5")]
        pairs: usize,
        /// Seconds of flood per measurement.
        #[arg(long, default_value = "3")]
        seconds: u64,
    },
    /// Remove namespaces and devices left by lab runs that died.
    Clean,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.job {
        Job::Setup => setup::run(),
        Job::Test { args } => test(&args),
        Job::Demo { seconds, vm } => setup::run().and_then(|_| {
            if vm {
                vm_demo::run(seconds)
            } else {
                demo::run(seconds)
            }
        }),
        Job::Bench { pairs, seconds } => setup::run().and_then(|_| bench::run(pairs, seconds)),
        Job::Clean => clean(),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn test(extra: &[String]) -> Result<()> {
    setup::run()?;
    require_root("the tests build network namespaces and load eBPF programs")?;
    let _ = clean();
    // Lab tests measure latency: run them one at a time so a flood in one test does not
    // distort another's numbers. Each still makes its own uniquely named lab.
    let status = Command::new(cargo())
        .args(["test", "--workspace", "--release"])
        .args(
            extra
                .iter()
                .filter(|a| !a.starts_with("--test-threads"))
                .take_while(|a| *a != "--"),
        )
        .args(["--", "--test-threads=1"])
        .args(extra.iter().skip_while(|a| *a != "--").skip(1))
        .status()
        .context("running cargo test")?;
    let _ = clean();
    if !status.success() {
        bail!("tests failed");
    }
    Ok(())
}

fn clean() -> Result<()> {
    let r = vtrace_lab::Lab::clean_all_leftovers()?;
    if !r.namespaces.is_empty() || !r.devices.is_empty() {
        eprintln!(
            "xtask: removed lab leftovers: {} {}",
            r.namespaces.join(" "),
            r.devices.join(" ")
        );
    }
    Ok(())
}

pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

pub fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: {why}");
    }
    Ok(())
}
