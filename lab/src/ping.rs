//! `ping` from inside a lab namespace, with its summary parsed.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cmd::{command_line, in_ns, output};
use crate::topology::is_lab_addr;

/// Round-trip times in milliseconds, as printed by ping's summary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rtt {
    pub min_ms: f64,
    pub avg_ms: f64,
    pub max_ms: f64,
    /// Standard deviation; 0 if the ping implementation does not print it.
    pub mdev_ms: f64,
}

/// The summary of one ping run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PingStats {
    pub transmitted: u32,
    pub received: u32,
    /// `None` when no reply came back (ping then prints no rtt line).
    pub rtt: Option<Rtt>,
}

impl PingStats {
    /// Fraction of requests without reply, 0.0 ..= 1.0.
    pub fn loss(&self) -> f64 {
        if self.transmitted == 0 {
            return 1.0;
        }
        1.0 - f64::from(self.received.min(self.transmitted)) / f64::from(self.transmitted)
    }
}

/// Runs `ip netns exec NS ping -n -q -c COUNT -i INTERVAL DST` and parses its summary.
///
/// Intervals below 0.2 s need root (ping refuses them otherwise). Lost replies are not
/// an error (see [`PingStats::received`]); a failure to run ping, or output without a
/// summary, is. `dst` must be in the lab block 198.18.0.0/15.
pub fn ping(ns: &str, dst: Ipv4Addr, count: u32, interval: Duration) -> Result<PingStats> {
    if !is_lab_addr(dst) {
        bail!("refusing to ping {dst}: lab traffic stays within 198.18.0.0/15");
    }
    if count == 0 {
        bail!("ping count must be at least 1");
    }
    let mut cmd = in_ns(ns, "ping");
    cmd.args(["-n", "-q", "-c", &count.to_string()])
        .args(["-i", &format!("{:.3}", interval.as_secs_f64())])
        // Without any reply, wait at most 2 s after the last request.
        .args(["-W", "2"])
        .arg(dst.to_string())
        // The summary's number format must not depend on the caller's locale.
        .env("LC_ALL", "C");
    let out = output(&mut cmd)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    parse_ping_output(&stdout).with_context(|| {
        format!(
            "`{}` ({}): {}",
            command_line(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

/// Parses the summary of iputils (or busybox) ping:
///
/// ```text
/// 5 packets transmitted, 5 received, 0% packet loss, time 4005ms
/// rtt min/avg/max/mdev = 0.031/0.042/0.056/0.009 ms
/// ```
pub fn parse_ping_output(text: &str) -> Result<PingStats> {
    let mut counts = None;
    let mut rtt = None;
    for line in text.lines() {
        let line = line.trim();
        if line.contains("transmitted") {
            counts = Some(
                parse_counts(line).with_context(|| format!("bad ping summary line {line:?}"))?,
            );
        } else if line.contains("min/avg/max") {
            rtt = Some(parse_rtt(line).with_context(|| format!("bad ping rtt line {line:?}"))?);
        }
    }
    let Some((transmitted, received)) = counts else {
        bail!("no summary in ping output {:?}", text.trim());
    };
    Ok(PingStats {
        transmitted,
        received,
        rtt,
    })
}

/// "5 packets transmitted, 4 received, +1 errors, 20% packet loss, time 4005ms"
/// (busybox: "5 packets transmitted, 5 packets received, 0% packet loss").
fn parse_counts(line: &str) -> Result<(u32, u32)> {
    let mut transmitted = None;
    let mut received = None;
    for part in line.split(',') {
        let mut words = part.split_whitespace();
        let (Some(num), Some(rest)) = (words.next(), words.collect::<Vec<_>>().last().copied())
        else {
            continue;
        };
        match rest {
            "transmitted" => transmitted = Some(num.parse()?),
            "received" => received = Some(num.parse()?),
            _ => {}
        }
    }
    match (transmitted, received) {
        (Some(t), Some(r)) => Ok((t, r)),
        _ => bail!("transmitted/received counts not found"),
    }
}

/// "rtt min/avg/max/mdev = 0.031/0.042/0.056/0.009 ms"
/// (busybox: "round-trip min/avg/max = 0.031/0.042/0.056 ms").
fn parse_rtt(line: &str) -> Result<Rtt> {
    let (keys, values) = line.split_once('=').context("no '='")?;
    let keys: Vec<&str> = keys
        .split_whitespace()
        .last()
        .context("no field names")?
        .split('/')
        .collect();
    let values = values.trim();
    let mut words = values.split_whitespace();
    let values = words.next().context("no values")?;
    // The unit may be followed by ", pipe N".
    let unit = words.next().unwrap_or("ms").trim_end_matches(',');
    let scale = match unit {
        "ms" => 1.0,
        "s" => 1000.0,
        "us" | "µs" => 0.001,
        other => bail!("unknown rtt unit {other:?}"),
    };
    let values: Vec<f64> = values
        .split('/')
        .map(|v| v.parse::<f64>().map(|x| x * scale))
        .collect::<std::result::Result<_, _>>()?;
    if keys.len() != values.len() {
        bail!("{} names but {} values", keys.len(), values.len());
    }
    let get = |k: &str| keys.iter().position(|&x| x == k).map(|i| values[i]);
    Ok(Rtt {
        min_ms: get("min").context("no min")?,
        avg_ms: get("avg").context("no avg")?,
        max_ms: get("max").context("no max")?,
        mdev_ms: get("mdev").unwrap_or(0.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const IPUTILS: &str = "PING 198.18.0.2 (198.18.0.2) 56(84) bytes of data.\n\
\n\
--- 198.18.0.2 ping statistics ---\n\
5 packets transmitted, 5 received, 0% packet loss, time 4005ms\n\
rtt min/avg/max/mdev = 0.031/0.042/0.056/0.009 ms\n";

    #[test]
    fn parses_iputils_summary() {
        let s = parse_ping_output(IPUTILS).expect("parses");
        assert_eq!(s.transmitted, 5);
        assert_eq!(s.received, 5);
        assert_eq!(s.loss(), 0.0);
        let r = s.rtt.expect("rtt");
        assert_eq!(
            (r.min_ms, r.avg_ms, r.max_ms, r.mdev_ms),
            (0.031, 0.042, 0.056, 0.009)
        );
    }

    #[test]
    fn parses_partial_loss_with_errors_and_duplicates() {
        let text = "--- 198.18.1.2 ping statistics ---\n\
10 packets transmitted, 7 received, +2 duplicates, +1 errors, 30% packet loss, time 9013ms\n\
rtt min/avg/max/mdev = 4.101/4.250/4.902/0.212 ms, pipe 2\n";
        let s = parse_ping_output(text).expect("parses");
        assert_eq!((s.transmitted, s.received), (10, 7));
        assert!((s.loss() - 0.3).abs() < 1e-9);
        let r = s.rtt.expect("rtt");
        assert_eq!(r.max_ms, 4.902);
    }

    #[test]
    fn parses_total_loss_without_rtt() {
        let text = "--- 198.18.0.2 ping statistics ---\n\
3 packets transmitted, 0 received, 100% packet loss, time 2030ms\n";
        let s = parse_ping_output(text).expect("parses");
        assert_eq!((s.transmitted, s.received, s.rtt), (3, 0, None));
        assert_eq!(s.loss(), 1.0);
    }

    #[test]
    fn parses_busybox_summary() {
        let text = "--- 198.18.0.2 ping statistics ---\n\
2 packets transmitted, 2 packets received, 0% packet loss\n\
round-trip min/avg/max = 0.070/0.080/0.090 ms\n";
        let s = parse_ping_output(text).expect("parses");
        assert_eq!((s.transmitted, s.received), (2, 2));
        let r = s.rtt.expect("rtt");
        assert_eq!(
            (r.min_ms, r.avg_ms, r.max_ms, r.mdev_ms),
            (0.07, 0.08, 0.09, 0.0)
        );
    }

    #[test]
    fn rejects_output_without_summary() {
        assert!(parse_ping_output("ping: connect: Network is unreachable\n").is_err());
        assert!(parse_ping_output("").is_err());
        assert!(parse_ping_output("x packets transmitted, 1 received\n").is_err());
    }

    #[test]
    fn refuses_non_lab_destinations() {
        let err = ping(
            "vlabcde-na",
            Ipv4Addr::new(8, 8, 8, 8),
            1,
            Duration::from_millis(200),
        )
        .expect_err("must refuse");
        assert!(format!("{err}").contains("198.18.0.0/15"));
    }
}
