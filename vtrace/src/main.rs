//! vtrace: where the network time and the packets go on a virtualization host.
//!
//! Layout: `cli` (the command line), `kernel/` (BTF, kallsyms, device counters, privileges),
//! `tracer` (load and attach the eBPF programs of vtrace-ebpf), `session` (run, read events,
//! stop cleanly), `hooks` (the catalog), `latency/` (join hops into paths, histograms, reports),
//! `drops` (drop points per device), `serve` (Prometheus exporter), `record` (record files and
//! offline reports).

mod cli;
mod cost;
mod discovery;
mod drops;
mod fasthash;
mod hooks;
mod kernel;
mod latency;
mod record;
mod serve;
mod session;
mod tracer;
mod work;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // --help and --version print and succeed; usage errors print clap's message.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line: the error and its causes, no backtrace.
            eprintln!("vtrace: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Hooks { json } => {
            kernel::privileges::require()?;
            let statuses = hooks::probe_all()?;
            print_hooks(&statuses, json)?;
            // Usable when the tracepoint tier works: that is what latency and drops need.
            let tracepoints_ok = statuses
                .iter()
                .filter(|s| {
                    s.tier == hooks::Tier::Tracepoint
                        && latency::HOOKS.iter().any(|h| s.hook.ends_with(h.name()))
                })
                .all(|s| s.status == "available");
            Ok(if tracepoints_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Latency(args) => {
            kernel::privileges::require()?;
            latency::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Drops(args) => {
            kernel::privileges::require()?;
            drops::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => {
            kernel::privileges::require()?;
            serve::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Record(args) => {
            kernel::privileges::require()?;
            record::record(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Report(args) => {
            record::report(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Baseline { duration, no_stats } => {
            kernel::privileges::require()?;
            let costs = cost::baseline(std::time::Duration::from_secs_f64(duration), !no_stats)?;
            println!("{}", serde_json::to_string(&costs)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Compare { a, b, json } => {
            let read = |p: &std::path::Path| -> Result<latency::report::LatencyReport> {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                serde_json::from_str(&text).with_context(|| {
                    format!("{} is not a `vtrace latency --json` report", p.display())
                })
            };
            let (ra, rb) = (read(&a)?, read(&b)?);
            let cmp = latency::compare::compare(&ra, &rb);
            if json {
                println!("{}", serde_json::to_string(&cmp)?);
            } else {
                let name = |p: &std::path::Path| {
                    p.file_stem()
                        .map(|s| s.to_string_lossy().to_string())
                        .unwrap_or_default()
                };
                print!("{}", cmp.render(&name(&a), &name(&b)));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_hooks(statuses: &[hooks::HookStatus], json: bool) -> Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({ "hooks": statuses }))?
        );
        return Ok(());
    }
    println!(
        "{:<32} {:<12} {:<11} {:<10} {:<8} detail",
        "hook", "stage", "tier", "status", "via"
    );
    for s in statuses {
        let stage = serde_json::to_value(s.stage)?
            .as_str()
            .unwrap_or("")
            .to_string();
        let tier = serde_json::to_value(s.tier)?
            .as_str()
            .unwrap_or("")
            .to_string();
        let mut detail = String::new();
        if let Some(e) = &s.errno {
            detail.push_str(e);
            detail.push_str(": ");
        }
        if let Some(r) = &s.reason {
            detail.push_str(r);
        }
        if s.symbols.len() > 1 || s.symbols.first().is_some_and(|x| x != s.hook) {
            detail.push_str(&format!(" [symbols: {}]", s.symbols.join(", ")));
        }
        println!(
            "{:<32} {:<12} {:<11} {:<10} {:<8} {}",
            s.hook,
            stage,
            tier,
            s.status,
            s.via.unwrap_or("-"),
            detail.trim()
        );
    }
    Ok(())
}

/// A kernel device name from its NUL-padded bytes.
pub fn ifname(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}
