//! `vtrace-lab`: bring the lab up for people (demo, manual tracing), or clean up.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use vtrace_lab::guest::{Accel, GuestImage, VmLab, VmLabOptions};
use vtrace_lab::vhost::VhostOptions;
use vtrace_lab::{Lab, LabOptions, VmmOptions, VmmStats};

/// Test topology of vtrace: network namespaces joined by a native path
/// (veth — bridge — veth) and a virtual path (veth — bridge — tap ⇄ VMM ⇄ tap — bridge —
/// veth), all in 198.18.0.0/15. Needs root.
#[derive(Parser)]
#[command(name = "vtrace-lab", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the lab, print its names and addresses, run the VMM forwarder in the
    /// foreground until Ctrl-C or SIGTERM, then tear everything down.
    Up(UpArgs),
    /// Remove the namespaces and devices left behind by lab runs that died.
    Clean(CleanArgs),
    /// The lab with a real VM: a QEMU guest routing between two namespaces.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Drive the kernel's vhost-net without a VM, as QEMU does with `vhost=on`: create a
    /// tap, attach it to /dev/vhost-net with an RX and a TX ring in this process's memory,
    /// send frames through TX (handle_tx → tun_sendmsg) and count what the host sends to
    /// the tap on RX (handle_rx → tun_recvmsg). Prints one summary line. Needs root and
    /// the vhost_net module; the tap is removed on exit.
    Vhost(VhostArgs),
}

#[derive(Args)]
struct VhostArgs {
    /// Name of the tap to create (must not exist; not persistent).
    #[arg(long, value_name = "NAME")]
    tap: String,
    /// 64-byte Ethernet/IPv4/UDP frames to send through the TX ring, to the tap's MAC.
    #[arg(long, value_name = "N", default_value_t = 200)]
    frames: u64,
    /// Receive buffers (2 KiB each) to post on the RX ring, at most the ring size (256).
    #[arg(long, value_name = "M", default_value_t = 256,
          value_parser = clap::value_parser!(u16).range(1..=vtrace_lab::vhost::RING_SIZE as i64))]
    rx_buffers: u16,
    /// Source address of the frames (the "guest"), in 198.18.0.0/15.
    #[arg(long, value_name = "IPV4", default_value = "198.18.6.2")]
    src: std::net::Ipv4Addr,
    /// Destination address of the frames, in 198.18.0.0/15.
    #[arg(long, value_name = "IPV4", default_value = "198.18.6.1")]
    dst: std::net::Ipv4Addr,
    /// How long to keep receiving on the RX ring after all frames were sent, in ms.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    linger_ms: u64,
}

#[derive(Subcommand)]
enum VmCmd {
    /// Build the guest image (kernel + initramfs from Debian packages) into the cache, or
    /// say where the cached one is.
    Build(VmBuildArgs),
    /// Boot the guest as a router between two namespaces, print names, addresses and
    /// commands, keep it running until Ctrl-C or SIGTERM, then tear everything down.
    Up(VmUpArgs),
}

#[derive(Args)]
struct VmBuildArgs {
    /// Image cache (default: $VTRACE_GUEST_DIR, else target/vtrace-guest of the workspace).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<std::path::PathBuf>,
}

#[derive(Args)]
struct VmUpArgs {
    /// Lab id: 5 characters of [a-z0-9] (default: a fresh one). Names are "vl" + id + role.
    #[arg(long)]
    id: Option<String>,
    /// Image cache (default: $VTRACE_GUEST_DIR, else target/vtrace-guest of the workspace).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<std::path::PathBuf>,
    /// CPU acceleration: kvm, tcg, or auto (KVM if a probe boot works here, else TCG).
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Seconds the guest may take to boot.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    boot_timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    memory: u32,
}

#[derive(Args)]
struct UpArgs {
    /// Lab id: 5 characters of [a-z0-9] (default: a fresh one). Names are "vl" + id + role.
    #[arg(long)]
    id: Option<String>,
    /// VMM delay before each forwarded frame, in microseconds (each ping round trip
    /// crosses the VMM twice).
    #[arg(long, value_name = "US", default_value_t = 0)]
    delay_us: u64,
    /// VMM pause between consecutive reads of a tap, in microseconds; under load the
    /// tap's ring overflows (kernel drop reason FULL_RING in tun_net_xmit).
    #[arg(long, value_name = "US", default_value_t = 0)]
    read_pause_us: u64,
    /// txqueuelen of the taps, i.e. the size of the tun ring (kernel default 500).
    #[arg(long, value_name = "N")]
    tap_queue_len: Option<u32>,
    /// Do not build the native path.
    #[arg(long)]
    no_native: bool,
    /// Do not build the virtual path (and run no VMM).
    #[arg(long)]
    no_virtual: bool,
    /// Print the VMM counters every SECS seconds (0: only at the end).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    stats_every: u64,
}

#[derive(Args)]
struct CleanArgs {
    /// Only names starting with this prefix ("vl" + up to 5 id characters).
    #[arg(long, default_value = "vl")]
    prefix: String,
    /// Also remove labs whose owner process is still running.
    #[arg(long)]
    force: bool,
}

/// `println!` that ignores write errors (a closed pipe must not abort the teardown).
macro_rules! say {
    ($($arg:tt)*) => {{
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, $($arg)*);
        let _ = out.flush();
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Up(a) => up(a),
        Cmd::Clean(a) => clean(a),
        Cmd::Vm(VmCmd::Build(a)) => vm_build(a),
        Cmd::Vm(VmCmd::Up(a)) => vm_up(a),
        Cmd::Vhost(a) => vhost(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vtrace-lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn require_root() -> Result<()> {
    // SAFETY: no arguments, cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("must run as root (creates namespaces, bridges and taps)");
    }
    Ok(())
}

/// The termination signals, blocked in this thread (and so in every thread spawned
/// afterwards, including the VMM's) and collected synchronously with `sigtimedwait`.
fn block_termination_signals() -> Result<libc::sigset_t> {
    // SAFETY: sigset manipulation on a local, then pthread_sigmask on the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            bail!("pthread_sigmask: {}", std::io::Error::from_raw_os_error(rc));
        }
        Ok(set)
    }
}

/// Waits up to `timeout` for one of `set`; returns the signal, or None on timeout.
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<libc::c_int> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: valid set and timespec; no siginfo wanted.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

fn up(a: UpArgs) -> Result<()> {
    require_root()?;
    if a.no_native && a.no_virtual {
        bail!("--no-native and --no-virtual leave nothing to build");
    }
    // Before any thread exists, so that all of them inherit the blocked mask and a
    // Ctrl-C during setup is only acted upon once setup is complete or has failed.
    let signals = block_termination_signals()?;
    let vmm = VmmOptions {
        per_frame_delay: Duration::from_micros(a.delay_us),
        read_pause: Duration::from_micros(a.read_pause_us),
        tap_queue_len: a.tap_queue_len,
    };
    let mut opts = LabOptions::default().with_vmm(vmm);
    if let Some(id) = a.id {
        opts.id = id;
    }
    opts.native = !a.no_native;
    opts.virtual_path = !a.no_virtual;
    let lab = Lab::up(opts.clone())?;
    print_lab(&lab, &opts);

    let period = if a.stats_every > 0 {
        Duration::from_secs(a.stats_every)
    } else {
        Duration::from_secs(3600)
    };
    let sig = loop {
        if let Some(sig) = wait_signal(&signals, period) {
            break sig;
        }
        if a.stats_every > 0 && lab.try_virt().is_some() {
            say!("vmm: {}", format_stats(&lab.vmm_stats()));
        }
    };
    let name = match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "SIGHUP",
    };
    say!("\n{name}: tearing lab {} down", lab.prefix());
    if lab.try_virt().is_some() {
        say!("vmm: {}", format_stats(&lab.vmm_stats()));
    }
    drop(lab);
    say!("done");
    Ok(())
}

fn format_stats(s: &VmmStats) -> String {
    format!(
        "forwarded tap_in→tap_out {}, tap_out→tap_in {}; dropped by the VMM {}; tun ring drops tap_in {}, tap_out {}",
        s.in_to_out, s.out_to_in, s.dropped, s.tap_in_ring_drops, s.tap_out_ring_drops
    )
}

fn print_lab(lab: &Lab, opts: &LabOptions) {
    let mut o = String::new();
    let p = lab.prefix();
    o += &format!("lab {p} is up (id {})\n", lab.id());
    if let Some(n) = lab.try_native() {
        o += "\nnative path:  netns — veth — bridge — veth — netns\n";
        o += &format!(
            "  {:<11} eth0 {}/24 {}  host end {}\n",
            n.sender_ns, n.sender_ip, n.sender_mac, n.sender_veth
        );
        o += &format!(
            "  {:<11} eth0 {}/24 {}  host end {}\n",
            n.receiver_ns, n.receiver_ip, n.receiver_mac, n.receiver_veth
        );
        o += &format!("  bridge {}\n", n.bridge);
        o += &format!(
            "  ping:  ip netns exec {} ping {}\n",
            n.sender_ns, n.receiver_ip
        );
        o += &format!(
            "  flood: vtrace-flood --from {} --to {} --dst {}:9000\n",
            n.sender_ns, n.receiver_ns, n.receiver_ip
        );
    }
    if let Some(v) = lab.try_virt() {
        o += "\nvirtual path: netns — veth — bridge — tap ⇄ VMM ⇄ tap — bridge — veth — netns\n";
        o += &format!(
            "  {:<11} eth0 {}/24 {}  host end {} on bridge {}\n",
            v.sender_ns, v.sender_ip, v.sender_mac, v.sender_veth, v.bridge_in
        );
        o += &format!(
            "  {:<11} eth0 {}/24 {}  host end {} on bridge {}\n",
            v.receiver_ns, v.receiver_ip, v.receiver_mac, v.receiver_veth, v.bridge_out
        );
        o += &format!(
            "  taps: {} (on {}) ⇄ VMM ⇄ {} (on {})\n",
            v.tap_in, v.bridge_in, v.tap_out, v.bridge_out
        );
        let q = opts
            .vmm
            .tap_queue_len
            .map_or_else(|| "default".to_string(), |n| n.to_string());
        o += &format!(
            "  VMM: per-frame delay {} µs, read pause {} µs, tap txqueuelen {q}\n",
            opts.vmm.per_frame_delay.as_micros(),
            opts.vmm.read_pause.as_micros()
        );
        o += &format!(
            "  ping:  ip netns exec {} ping {}\n",
            v.sender_ns, v.receiver_ip
        );
        o += &format!(
            "  flood: vtrace-flood --from {} --to {} --dst {}:9000\n",
            v.sender_ns, v.receiver_ns, v.receiver_ip
        );
    }
    o += "\nrunning; Ctrl-C or SIGTERM tears the lab down\n";
    let _ = std::io::stdout().write_all(o.as_bytes());
    let _ = std::io::stdout().flush();
}

fn vm_build(a: VmBuildArgs) -> Result<()> {
    let dir = a.cache_dir.unwrap_or_else(GuestImage::default_cache_dir);
    let started = std::time::Instant::now();
    let img = GuestImage::ensure(&dir)?;
    say!(
        "guest image {} in {:.1} s: {} ({})",
        if img.built { "built" } else { "cached" },
        started.elapsed().as_secs_f64(),
        dir.display(),
        img.kernel_package
    );
    say!("  kernel  {}", img.kernel.display());
    say!("  initrd  {}", img.initrd.display());
    say!("  modules {}", img.modules.join(" "));
    Ok(())
}

fn vm_up(a: VmUpArgs) -> Result<()> {
    require_root()?;
    // As for `up`: signals wait until setup has finished (or failed and cleaned up).
    let signals = block_termination_signals()?;
    let mut opts = VmLabOptions::new();
    if let Some(id) = a.id {
        opts.id = id;
    }
    if let Some(d) = a.cache_dir {
        opts.cache_dir = d;
    }
    opts.accel = Accel::parse(&a.accel)?;
    opts.boot_timeout = Duration::from_secs(a.boot_timeout);
    opts.memory_mib = a.memory;
    let lab = VmLab::up(opts)?;
    let p = lab.path().clone();
    let mut o = String::new();
    o += &format!(
        "VM lab {} is up (id {}): QEMU pid {}, {}{}, booted in {:.1} s, kernel {}\n",
        lab.prefix(),
        lab.id(),
        lab.qemu_pid(),
        lab.accel().name(),
        if lab.vhost() {
            " + vhost-net"
        } else {
            ", userspace virtio-net backend"
        },
        lab.boot_time().as_secs_f64(),
        lab.image().kernel_release
    );
    o += "\n  netns — veth — bridge — tap ⇄ QEMU [guest routes, TTL-1] ⇄ tap — bridge — veth — netns\n";
    o += &format!(
        "  {:<11} eth0 {}/24 {}  host end {} on bridge {}, gateway {}\n",
        p.sender_ns, p.sender_ip, p.sender_mac, p.sender_veth, p.bridge_a, p.guest_ip_a
    );
    o += &format!(
        "  {:<11} eth0 {}/24 {}  host end {} on bridge {}, gateway {}\n",
        p.receiver_ns, p.receiver_ip, p.receiver_mac, p.receiver_veth, p.bridge_b, p.guest_ip_b
    );
    o += &format!(
        "  guest NICs: {} {} on tap {}, {} {} on tap {}\n",
        p.guest_ip_a, p.guest_mac_a, p.tap_a, p.guest_ip_b, p.guest_mac_b, p.tap_b
    );
    o += &format!(
        "  ping:   ip netns exec {} ping {}\n",
        p.sender_ns, p.receiver_ip
    );
    o += &format!(
        "  trace:  vtrace latency --proto icmp --host {}\n",
        p.receiver_ip
    );
    o += &format!(
        "  flood:  vtrace-flood --from {} --to {} --dst {}:9000\n",
        p.sender_ns, p.receiver_ns, p.receiver_ip
    );
    o += "\nguest console (last lines):\n";
    for l in lab.console_tail(8) {
        o += &format!("  | {l}\n");
    }
    o += "\nrunning; Ctrl-C or SIGTERM tears the VM lab down\n";
    let _ = std::io::stdout().write_all(o.as_bytes());
    let _ = std::io::stdout().flush();
    let sig = loop {
        if let Some(sig) = wait_signal(&signals, Duration::from_secs(1)) {
            break sig;
        }
        // SAFETY: signal 0 only checks that the process exists.
        if unsafe { libc::kill(lab.qemu_pid() as libc::pid_t, 0) } != 0 {
            say!("QEMU is gone; console tail:");
            for l in lab.console_tail(20) {
                say!("  | {l}");
            }
            break 0;
        }
    };
    if sig != 0 {
        say!("\nsignal {sig}: tearing VM lab {} down", lab.prefix());
    }
    drop(lab);
    say!("done");
    Ok(())
}

fn vhost(a: VhostArgs) -> Result<()> {
    require_root()?;
    let opts = VhostOptions {
        tap: a.tap,
        frames: a.frames,
        rx_buffers: a.rx_buffers,
        src: a.src,
        dst: a.dst,
        linger: Duration::from_millis(a.linger_ms),
    };
    let r = vtrace_lab::vhost::run(&opts)?;
    say!(
        "vhost: tap {}: tx {} frames sent ({} used), rx {} frames received ({} ICMP echo requests for {}); features {:#x}",
        opts.tap,
        r.tx_sent,
        r.tx_used,
        r.rx_frames,
        r.rx_echo_requests,
        opts.src,
        r.features
    );
    Ok(())
}

fn clean(a: CleanArgs) -> Result<()> {
    require_root()?;
    let r = Lab::clean_leftovers(&a.prefix, a.force)?;
    if r.namespaces.is_empty() && r.devices.is_empty() {
        say!("nothing to clean");
    }
    for ns in &r.namespaces {
        say!("removed netns {ns}");
    }
    for dev in &r.devices {
        say!("removed device {dev}");
    }
    for id in &r.skipped_live {
        say!("kept lab vl{id}: its owner process is running (--force removes it)");
    }
    Ok(())
}
