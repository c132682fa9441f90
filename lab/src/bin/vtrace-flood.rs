//! `vtrace-flood`: 64-byte UDP flood between two lab namespaces.

use std::io::Write;
use std::net::SocketAddrV4;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;
use vtrace_lab::flood::{DEFAULT_BATCH, DEFAULT_PAYLOAD_LEN};
use vtrace_lab::{flood, FloodOptions};

/// Sends minimum-size UDP datagrams (64-byte frames) from one lab namespace to
/// another as fast as possible, and reports sent and received packets per second.
/// The destination must be in 198.18.0.0/15. Needs root.
#[derive(Parser)]
#[command(name = "vtrace-flood", version)]
struct Cli {
    /// Network namespace of the sender (e.g. vlXXXXX-na).
    #[arg(long, value_name = "NS")]
    from: String,
    /// Network namespace of the receiver (e.g. vlXXXXX-nb); it must own the address of --dst.
    #[arg(long, value_name = "NS")]
    to: String,
    /// Destination address and UDP port, e.g. 198.18.0.2:9000.
    #[arg(long, value_name = "IP:PORT")]
    dst: SocketAddrV4,
    /// How long to send, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    duration: f64,
    /// UDP payload bytes (18 makes a 64-byte Ethernet frame).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_PAYLOAD_LEN)]
    payload_len: usize,
    /// Datagrams per sendmmsg call.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BATCH)]
    batch: usize,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

/// `println!` that ignores write errors (e.g. a closed pipe).
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vtrace-flood: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if !(cli.duration.is_finite() && cli.duration > 0.0 && cli.duration <= 86_400.0) {
        bail!("--duration must be a positive number of seconds (at most one day)");
    }
    let opts = FloodOptions {
        duration: Duration::from_secs_f64(cli.duration),
        payload_len: cli.payload_len,
        batch: cli.batch,
        ..FloodOptions::new(cli.from, cli.to, cli.dst)
    };
    let r = flood(opts)?;
    if cli.json {
        say!("{}", r.to_json());
    } else {
        let loss = if r.sent > 0 {
            100.0 * (r.sent.saturating_sub(r.received)) as f64 / r.sent as f64
        } else {
            0.0
        };
        say!(
            "sent     {:>10} datagrams in {:.3} s: {:>10.0} pps",
            r.sent,
            r.elapsed.as_secs_f64(),
            r.sent_pps
        );
        say!(
            "received {:>10} datagrams:            {:>10.0} pps (loss {loss:.2}%)",
            r.received,
            r.received_pps
        );
        if r.send_errors > 0 {
            say!("transient send errors: {}", r.send_errors);
        }
    }
    Ok(())
}
