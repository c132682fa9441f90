//! `vtrace compare A.json B.json`: the reference paper's question — a native router forwards in
//! 0.084 ms, the virtual one in 0.150 ms: where does the difference go? Both reports' main paths
//! are broken into stages, and the difference in time is attributed to the stages that cause it.

use std::collections::BTreeMap;

use serde::Serialize;

use super::report::{fmt_ns, HopRef, LatencyReport};

/// The data-path stage an edge belongs to, from the hooks at its two ends.
pub fn stage_of(from: &HopRef, to: &HopRef) -> &'static str {
    let same_dev = from.iface == to.iface;
    match (from.hook.as_str(), to.hook.as_str()) {
        // A reader copied the frame out of one skb and a writer made a new skb from it.
        (
            "consume_skb" | "skb_copy_datagram_iovec",
            "netif_receive_skb" | "netif_rx" | "napi_gro_receive_entry",
        ) => "vmm: tap read -> tap write",
        ("net_dev_start_xmit" | "net_dev_xmit", "skb_copy_datagram_iovec") => {
            "tap queue: wait for the reader"
        }
        ("net_dev_start_xmit", "net_dev_xmit") => "driver xmit",
        ("net_dev_queue", "net_dev_start_xmit")
        | ("net_dev_queue", "qdisc_dequeue")
        | ("qdisc_dequeue", "net_dev_start_xmit") => "qdisc",
        ("net_dev_start_xmit" | "net_dev_xmit", "netif_rx" | "netif_receive_skb") if !same_dev => {
            "veth/device hand-off"
        }
        ("netif_rx", "netif_receive_skb") => "backlog softirq",
        ("netif_receive_skb", "net_dev_queue") if !same_dev => "bridge/forward",
        ("netif_receive_skb", "skb_copy_datagram_iovec") => "socket delivery",
        ("netif_receive_skb", "consume_skb" | "kfree_skb") => "local stack",
        ("napi_gro_receive_entry", "netif_receive_skb") => "gro",
        _ => "other",
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct StageRow {
    pub stage: String,
    pub a_ns: f64,
    pub b_ns: f64,
    pub diff_ns: f64,
    /// Share of the total difference (B - A).
    pub share: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub a_total_ns: f64,
    pub b_total_ns: f64,
    pub stages: Vec<StageRow>,
}

/// The paths that make the report's main traffic: those carrying at least a quarter of the
/// busiest path's packets (for ping: the request and the reply path).
fn main_paths(r: &LatencyReport) -> Vec<&super::report::PathReport> {
    let max = r.paths.iter().map(|p| p.stats.count).max().unwrap_or(0);
    r.paths
        .iter()
        .filter(|p| p.stats.count * 4 >= max && p.hops.len() > 1)
        .collect()
}

/// Time per stage, summed along the main paths (each edge's mean).
pub fn stage_times(r: &LatencyReport) -> (f64, BTreeMap<&'static str, f64>) {
    let mut stages = BTreeMap::new();
    let mut total = 0.0;
    for p in main_paths(r) {
        total += p.stats.mean_ns;
        for e in p.edges(&r.edges).into_iter().flatten() {
            *stages.entry(stage_of(&e.from, &e.to)).or_insert(0.0) += e.stats.mean_ns;
        }
    }
    (total, stages)
}

pub fn compare(a: &LatencyReport, b: &LatencyReport) -> Comparison {
    let (a_total, a_st) = stage_times(a);
    let (b_total, b_st) = stage_times(b);
    let diff_total = b_total - a_total;
    let mut names: Vec<&str> = a_st.keys().chain(b_st.keys()).copied().collect();
    names.sort_unstable();
    names.dedup();
    let mut stages: Vec<StageRow> = names
        .into_iter()
        .map(|s| {
            let (x, y) = (
                a_st.get(s).copied().unwrap_or(0.0),
                b_st.get(s).copied().unwrap_or(0.0),
            );
            StageRow {
                stage: s.to_string(),
                a_ns: x,
                b_ns: y,
                diff_ns: y - x,
                share: if diff_total.abs() > 0.0 {
                    (y - x) / diff_total
                } else {
                    0.0
                },
            }
        })
        .collect();
    stages.sort_by(|p, q| q.diff_ns.total_cmp(&p.diff_ns));
    Comparison {
        a_total_ns: a_total,
        b_total_ns: b_total,
        stages,
    }
}

impl Comparison {
    pub fn render(&self, a_name: &str, b_name: &str) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<34} {:>12} {:>12} {:>12} {:>7}",
            "stage", a_name, b_name, "difference", "share"
        );
        for r in &self.stages {
            let _ = writeln!(
                s,
                "{:<34} {:>12} {:>12} {:>12} {:>6.0}%",
                r.stage,
                fmt_ns(r.a_ns),
                fmt_ns(r.b_ns),
                fmt_signed(r.diff_ns),
                100.0 * r.share
            );
        }
        let _ = writeln!(
            s,
            "{:<34} {:>12} {:>12} {:>12}",
            "total (main paths)",
            fmt_ns(self.a_total_ns),
            fmt_ns(self.b_total_ns),
            fmt_signed(self.b_total_ns - self.a_total_ns)
        );
        if let Some(top) = self.stages.first().filter(|r| r.diff_ns > 0.0) {
            let _ = writeln!(
                s,
                "=> {b_name} takes {} longer than {a_name}; the largest part, {} ({:.0}%), is in stage \"{}\"",
                fmt_ns(self.b_total_ns - self.a_total_ns),
                fmt_ns(top.diff_ns),
                100.0 * top.share,
                top.stage
            );
        }
        s
    }
}

fn fmt_signed(ns: f64) -> String {
    if ns < 0.0 {
        format!("-{}", fmt_ns(-ns))
    } else {
        format!("+{}", fmt_ns(ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latency::report::{EdgeReport, PathReport, Summary};

    fn hop(hook: &str, iface: &str) -> HopRef {
        HopRef {
            hook: hook.into(),
            iface: iface.into(),
            tier: "tracepoint".into(),
        }
    }

    /// Ten packets that all took `ns`.
    fn flat(ns: f64) -> Summary {
        Summary {
            count: 10,
            mean_ns: ns,
            p50_ns: ns as u64,
            p90_ns: ns as u64,
            p99_ns: ns as u64,
            p999_ns: ns as u64,
            max_ns: ns as u64,
        }
    }

    fn report(hops: &[(&str, &str)], edge_means: &[f64]) -> LatencyReport {
        let hops: Vec<HopRef> = hops.iter().map(|(h, i)| hop(h, i)).collect();
        let edges: Vec<EdgeReport> = hops
            .windows(2)
            .zip(edge_means)
            .map(|(w, m)| EdgeReport {
                from: w[0].clone(),
                to: w[1].clone(),
                stats: flat(*m),
            })
            .collect();
        let total: f64 = edge_means.iter().sum();
        let path = PathReport {
            hops,
            stats: flat(total),
        };
        LatencyReport {
            duration_s: 1.0,
            lost_events: 0,
            edges,
            paths: vec![path],
            notes: vec![],
            events: Default::default(),
            cost: vec![],
            drivers: vec![],
            work: vec![],
        }
    }

    #[test]
    fn the_difference_goes_to_the_vmm_stages() {
        let native = report(
            &[
                ("net_dev_queue", "eth0@a"),
                ("netif_receive_skb", "br-port"),
                ("net_dev_queue", "eth0@b"),
            ],
            &[5e3, 10e3],
        );
        let vm = report(
            &[
                ("net_dev_queue", "eth0@a"),
                ("net_dev_start_xmit", "tap0"),
                ("skb_copy_datagram_iovec", "tap0"),
                ("netif_receive_skb", "tap1"),
                ("net_dev_queue", "eth0@b"),
            ],
            &[5e3, 100e3, 40e3, 10e3],
        );
        let c = compare(&native, &vm);
        assert_eq!(c.a_total_ns, 15e3);
        assert_eq!(c.b_total_ns, 155e3);
        assert_eq!(c.stages[0].stage, "tap queue: wait for the reader");
        assert!((c.stages[0].share - 100.0 / 140.0).abs() < 1e-9);
        let shares: f64 = c.stages.iter().map(|s| s.share).sum();
        assert!(
            (shares - 1.0).abs() < 1e-9,
            "the stages account for the whole difference"
        );
        assert!(c.render("native", "vm").contains("tap queue"));
    }

    #[test]
    fn stages_by_hook_pairs() {
        assert_eq!(
            stage_of(
                &hop("consume_skb", "tap0"),
                &hop("netif_receive_skb", "tap1")
            ),
            "vmm: tap read -> tap write"
        );
        assert_eq!(
            stage_of(
                &hop("netif_receive_skb", "vif1.0"),
                &hop("net_dev_queue", "eth0")
            ),
            "bridge/forward"
        );
        assert_eq!(
            stage_of(
                &hop("net_dev_queue", "eth0"),
                &hop("net_dev_start_xmit", "eth0")
            ),
            "qdisc"
        );
    }
}
