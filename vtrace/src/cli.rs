//! The command line.

use std::{net::IpAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "vtrace",
    version,
    about = "Where the network time and the packets go on a virtualization host",
    long_about = "vtrace attaches eBPF programs at the hooks a packet crosses in the host kernel \
(NIC driver, bridge, tun/tap and vhost-net, xen-netback), timestamps sampled packets at each hop, \
follows them across copies (a VMM writing into a tap makes a new skb), and reports per-stage \
latency and per-device drops.\n\nNeeds root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN). \
Everything it attaches is owned by the process and disappears when it exits.",
    after_help = "Examples:\n  vtrace hooks                         what this kernel lets vtrace hook\n  \
vtrace latency --duration 10         per-stage latency of all traffic for 10 s\n  \
vtrace latency --proto icmp --json   ping paths, as JSON for scripts\n  \
vtrace drops --iface tap0 --duration 30\n  \
vtrace compare native.json vm.json   which stages make the VM path slower\n\n\
Environment:\n  \
VTRACE_RAW_TRACEPOINTS=1   attach raw tracepoints without trying tp_btf (what older kernels run)\n  \
VTRACE_KPROBES=1           attach the function tier by kprobe without trying fentry"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List every hook point vtrace knows, its stage and tier, and whether this kernel allows it
    /// (found by trying to load a program there).
    Hooks {
        /// One JSON object for scripts instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Per-stage latency: time between consecutive hooks of each packet, and of whole paths.
    Latency(LatencyArgs),
    /// Where packets are dropped: per device, reason and kernel location, next to the kernel's
    /// own drop counters.
    Drops(DropsArgs),
    /// Run as a long-lived exporter of Prometheus metrics (per-edge latency histograms, drops
    /// by device and reason, lost events, vtrace's own cost) for a Prometheus server to scrape.
    Serve(ServeArgs),
    /// Record hop events and drops to a versioned file, for offline reports (`vtrace report`).
    Record(RecordArgs),
    /// The latency and drops reports from a file written by `vtrace record`.
    Report(ReportArgs),
    /// Empty programs at every latency hook, for measuring vtrace's per-hook cost against a
    /// floor in the same run (used by `cargo xtask bench`).
    #[command(hide = true)]
    Baseline {
        #[arg(long, short = 'd', default_value = "10", value_parser = parse_seconds)]
        duration: f64,
        /// Leave the kernel's BPF statistics off: for measuring the packet rate with empty
        /// programs attached (the floor of any tracer on these hooks), not their cost.
        #[arg(long)]
        no_stats: bool,
    },
    /// Compare two `vtrace latency --json` reports (e.g. native vs virtual router) stage by stage.
    Compare {
        /// The baseline report (e.g. the native path).
        a: PathBuf,
        /// The report to explain (e.g. the virtual path).
        b: PathBuf,
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug, Clone)]
pub struct FilterArgs {
    /// Only hops on this device (repeatable, up to 8; e.g. tap0, vif1.0, vnet3, a bridge).
    #[arg(long, value_parser = parse_ifname)]
    pub iface: Vec<String>,
    /// Only packets of this IP protocol.
    #[arg(long, value_enum)]
    pub proto: Option<Proto>,
    /// Only packets from or to this address (IPv4 or IPv6).
    #[arg(long)]
    pub host: Option<IpAddr>,
    /// Only TCP/UDP packets from or to this port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// Also trace the loopback device (left out by default: vtrace's own exporter talks there).
    #[arg(long)]
    pub include_loopback: bool,
}

#[derive(Args, Debug, Clone)]
pub struct TimingArgs {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long, short = 'd', value_parser = parse_seconds)]
    pub duration: Option<f64>,
    /// Refresh the live table every this many seconds.
    #[arg(long, short = 'i', default_value = "2", value_parser = parse_seconds)]
    pub interval: f64,
}

#[derive(Args, Debug, Clone)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long, short = 'd', value_parser = parse_seconds)]
    pub duration: Option<f64>,
    /// Refresh the live table every this many seconds.
    #[arg(long, short = 'i', default_value = "2", value_parser = parse_seconds)]
    pub interval: f64,
    /// Time 1 packet in N, chosen by a hash of its content so every hop picks the same packets.
    #[arg(long, default_value = "1", value_parser = clap::value_parser!(u32).range(1..))]
    pub sample: u32,
    /// How long after its last hop a packet may still be joined by a copy (VMM, netback), in ms.
    #[arg(long, default_value = "1000", value_parser = parse_positive)]
    pub window_ms: f64,
    /// Size of the kernel-to-user event ring buffer, in KiB (a power of two, at least 4).
    #[arg(long, default_value = "4096", value_parser = parse_ring_kib)]
    pub ring_kib: u32,
    /// Paths shown in the table.
    #[arg(long, default_value = "4")]
    pub top: usize,
    /// Also measure vtrace's own cost: run count and ns per run of each hook (turns on the
    /// kernel's BPF statistics for the run, which adds a little to every run).
    #[arg(long)]
    pub cost: bool,
    /// Print one JSON object at the end instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write the final JSON report to this file (the table still goes to stdout).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct DropsArgs {
    /// Only drops on these devices (repeatable).
    #[arg(long, value_parser = parse_ifname)]
    pub iface: Vec<String>,
    #[command(flatten)]
    pub timing: TimingArgs,
    /// Rows shown in the live table.
    #[arg(long, default_value = "10")]
    pub top: usize,
    /// Also list frees the kernel does not count as loss (reason NOT_DROPPED_YET / CONSUMED).
    #[arg(long)]
    pub all_reasons: bool,
    /// Print one JSON object at the end instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write the final JSON report to this file (the table still goes to stdout).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to serve /metrics on (e.g. 127.0.0.1:9464, or [::]:9464 for a fleet).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub listen: std::net::SocketAddr,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Time 1 packet in N (counts stay exact: every packet is counted in the kernel).
    #[arg(long, default_value = "64", value_parser = clap::value_parser!(u32).range(1..))]
    pub sample: u32,
    /// How long after its last hop a packet may still be joined by a copy, in ms.
    #[arg(long, default_value = "1000", value_parser = parse_positive)]
    pub window_ms: f64,
    /// Size of the kernel-to-user event ring buffer, in KiB (a power of two, at least 4).
    #[arg(long, default_value = "4096", value_parser = parse_ring_kib)]
    pub ring_kib: u32,
    /// Stop after this many seconds (default: run until SIGINT/SIGTERM).
    #[arg(long, short = 'd', value_parser = parse_seconds)]
    pub duration: Option<f64>,
}

#[derive(Args, Debug, Clone)]
pub struct RecordArgs {
    /// The file to write.
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Time 1 packet in N.
    #[arg(long, default_value = "1", value_parser = clap::value_parser!(u32).range(1..))]
    pub sample: u32,
    /// Size of the kernel-to-user event ring buffer, in KiB (a power of two, at least 4).
    #[arg(long, default_value = "4096", value_parser = parse_ring_kib)]
    pub ring_kib: u32,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long, short = 'd', value_parser = parse_seconds)]
    pub duration: Option<f64>,
}

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// A file written by `vtrace record`.
    pub file: PathBuf,
    /// How long after its last hop a packet may still be joined by a copy, in ms.
    #[arg(long, default_value = "1000", value_parser = parse_positive)]
    pub window_ms: f64,
    /// Paths shown in the table.
    #[arg(long, default_value = "4")]
    pub top: usize,
    /// One JSON object ({"latency": ..., "drops": ...}) instead of the tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Proto {
    Icmp,
    Tcp,
    Udp,
    Icmpv6,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Icmp => 1,
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Icmpv6 => 58,
        }
    }
}

fn parse_ifname(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 15 || s.contains(['/', '@']) || s.contains(char::is_whitespace) {
        return Err(format!(
            "'{s}' is not a device name (1 to 15 characters, no '/', '@' or spaces; it matches in every network namespace)"
        ));
    }
    Ok(s.to_string())
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() && v < 1e7 => Ok(v),
        _ => Err(format!("'{s}' is not a positive number of seconds")),
    }
}

fn parse_positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("'{s}' is not a positive number")),
    }
}

fn parse_ring_kib(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(v) if v >= 4 && v.is_power_of_two() && v <= 1 << 20 => Ok(v),
        _ => Err(format!("'{s}' is not a power of two between 4 and 1048576")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vtrace").chain(args.iter().copied()))
    }

    #[test]
    fn accepts_what_the_readme_shows() {
        assert!(parse(&["hooks", "--json"]).is_ok());
        assert!(parse(&[
            "latency",
            "--duration",
            "5",
            "--proto",
            "icmp",
            "--iface",
            "tap0",
            "--iface",
            "vif1.0",
            "--json"
        ])
        .is_ok());
        assert!(parse(&["drops", "--iface", "tap0", "-d", "30"]).is_ok());
        assert!(parse(&["compare", "a.json", "b.json"]).is_ok());
    }

    #[test]
    fn refuses_bad_input_with_a_reason() {
        for bad in [
            &["latency", "--duration", "-1"][..],
            &["latency", "--iface", "this-name-is-far-too-long"],
            &["latency", "--iface", "eth0@vm-a"],
            &["latency", "--port", "0"],
            &["latency", "--host", "not-an-address"],
            &["latency", "--ring-kib", "1000"],
            &["latency", "--sample", "0"],
            &["frobnicate"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
