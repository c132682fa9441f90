//! Aggregates edge and path observations into HdrHistograms and renders them: a human table and
//! the `--json` contract (see README, "vtrace latency --json").

use crate::fasthash::FastMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::join::{Observation, Point};

/// Histograms per edge and per complete path.
pub struct Aggregate {
    edges: FastMap<(Point, Point), Histogram<u64>>,
    paths: FastMap<Vec<Point>, Histogram<u64>>,
}

fn new_hist() -> Histogram<u64> {
    // 3 significant digits, auto-resizing: a few KiB per edge whatever the range.
    let mut h = Histogram::<u64>::new(3).expect("3 significant digits is valid");
    h.auto(true);
    h
}

impl Default for Aggregate {
    fn default() -> Self {
        Self::new()
    }
}

impl Aggregate {
    pub fn new() -> Aggregate {
        Aggregate {
            edges: FastMap::default(),
            paths: FastMap::default(),
        }
    }

    pub fn add(&mut self, obs: Observation) {
        match obs {
            Observation::Edge { from, to, ns } => {
                let _ = self
                    .edges
                    .entry((from, to))
                    .or_insert_with(new_hist)
                    .record(ns);
            }
            Observation::Path { hops, ns } => {
                let _ = self.paths.entry(hops).or_insert_with(new_hist).record(ns);
            }
        }
    }

    /// Every edge's histogram (nanoseconds, cumulative since the start), for the exporter.
    pub fn edge_histograms(&self) -> impl Iterator<Item = (&Point, &Point, &Histogram<u64>)> {
        self.edges.iter().map(|((from, to), h)| (from, to, h))
    }

    /// The report, edges and paths sorted by count (busiest first).
    pub fn report(&self, duration_s: f64, lost_events: u64) -> LatencyReport {
        let mut edges: Vec<EdgeReport> = self
            .edges
            .iter()
            .map(|((from, to), h)| EdgeReport {
                from: HopRef::of(from),
                to: HopRef::of(to),
                stats: Summary::of(h),
            })
            .collect();
        edges.sort_by(|a, b| {
            b.stats
                .count
                .cmp(&a.stats.count)
                .then(b.stats.mean_ns.total_cmp(&a.stats.mean_ns))
        });
        let mut paths: Vec<PathReport> = self
            .paths
            .iter()
            .map(|(hops, h)| PathReport {
                hops: hops.iter().map(HopRef::of).collect(),
                stats: Summary::of(h),
            })
            .collect();
        paths.sort_by(|a, b| {
            b.stats
                .count
                .cmp(&a.stats.count)
                .then(b.hops.len().cmp(&a.hops.len()))
        });
        LatencyReport {
            duration_s,
            lost_events,
            edges,
            paths,
            notes: Vec::new(),
            events: EventCounts::default(),
            cost: Vec::new(),
            drivers: Vec::new(),
            work: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventCounts {
    pub emitted: u64,
    pub received: u64,
    pub lost: u64,
}

/// A hook at a device, as users see it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HopRef {
    pub hook: String,
    pub iface: String,
    /// The tier the hook belongs to: `tracepoint` or `function`.
    #[serde(default = "tracepoint_tier")]
    pub tier: String,
}

fn tracepoint_tier() -> String {
    "tracepoint".into()
}

impl HopRef {
    fn of(p: &Point) -> HopRef {
        HopRef {
            hook: p.hook.name().to_string(),
            iface: p.iface.to_string(),
            tier: if p.hook.is_function() {
                "function"
            } else {
                "tracepoint"
            }
            .into(),
        }
    }
}

impl std::fmt::Display for HopRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.hook, self.iface)
    }
}

/// Count, mean and quantiles of one histogram, in nanoseconds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub mean_ns: f64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

impl Summary {
    pub fn of(h: &Histogram<u64>) -> Summary {
        Summary {
            count: h.len(),
            mean_ns: h.mean(),
            p50_ns: h.value_at_quantile(0.5),
            p90_ns: h.value_at_quantile(0.9),
            p99_ns: h.value_at_quantile(0.99),
            p999_ns: h.value_at_quantile(0.999),
            max_ns: h.max(),
        }
    }
}

/// The time between two consecutive hops. The summary's fields sit beside `from` and `to` in
/// JSON (the `--json` contract).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EdgeReport {
    pub from: HopRef,
    pub to: HopRef,
    #[serde(flatten)]
    pub stats: Summary,
}

/// A packet's whole path through the host.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PathReport {
    pub hops: Vec<HopRef>,
    #[serde(flatten)]
    pub stats: Summary,
}

impl PathReport {
    /// The edges of this path, looked up in `edges` (each edge's own mean over all packets).
    pub fn edges<'a>(&self, edges: &'a [EdgeReport]) -> Vec<Option<&'a EdgeReport>> {
        self.hops
            .windows(2)
            .map(|w| edges.iter().find(|e| e.from == w[0] && e.to == w[1]))
            .collect()
    }

    /// The edge of this path with the largest mean, and its share of the path's mean.
    pub fn dominant_edge<'a>(&self, edges: &'a [EdgeReport]) -> Option<(&'a EdgeReport, f64)> {
        let best = self
            .edges(edges)
            .into_iter()
            .flatten()
            .max_by(|a, b| a.stats.mean_ns.total_cmp(&b.stats.mean_ns))?;
        let share = if self.stats.mean_ns > 0.0 {
            best.stats.mean_ns / self.stats.mean_ns
        } else {
            0.0
        };
        Some((best, share))
    }
}

/// The `--json` contract: `duration_s`, `lost_events`, `edges[]`, `paths[]` are stable; other
/// fields may be added.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LatencyReport {
    pub duration_s: f64,
    pub lost_events: u64,
    pub edges: Vec<EdgeReport>,
    pub paths: Vec<PathReport>,
    #[serde(default)]
    pub notes: Vec<String>,
    /// Hop events sent by the kernel, read by vtrace, and lost (ring buffer full):
    /// received + lost == emitted once the run has ended.
    #[serde(default)]
    pub events: EventCounts,
    /// vtrace's own cost per hook, with `--cost`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cost: Vec<crate::cost::ProgramCost>,
    /// Driver functions read from the devices at run time (final report of a live run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drivers: Vec<crate::discovery::DriverFunction>,
    /// Work functions of the function tier, timed per call (see `work`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub work: Vec<crate::work::WorkRow>,
}

pub fn fmt_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.2}s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.2}ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1}us", ns / 1e3)
    } else {
        format!("{ns:.0}ns")
    }
}

impl LatencyReport {
    /// The human table: the busiest paths with their edges, then the dominant edge in words.
    pub fn render(&self, max_paths: usize) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "vtrace latency: {:.1}s, {} paths, {} edges, {} lost events",
            self.duration_s,
            self.paths.len(),
            self.edges.len(),
            self.lost_events
        );
        if self.paths.is_empty() {
            let _ = writeln!(
                s,
                "  no complete packet path seen yet (is traffic crossing the traced devices?)"
            );
        }
        for (i, p) in self.paths.iter().take(max_paths).enumerate() {
            let _ = writeln!(
                s,
                "\npath {} ({} packets): mean {}  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                i + 1,
                p.stats.count,
                fmt_ns(p.stats.mean_ns),
                fmt_ns(p.stats.p50_ns as f64),
                fmt_ns(p.stats.p90_ns as f64),
                fmt_ns(p.stats.p99_ns as f64),
                fmt_ns(p.stats.p999_ns as f64),
                fmt_ns(p.stats.max_ns as f64)
            );
            let _ = writeln!(
                s,
                "  {:<34} {:<34} {:>8} {:>9} {:>9} {:>9} {:>9} {:>6}",
                "from", "to", "count", "mean", "p50", "p99", "max", "share"
            );
            for (w, e) in p.hops.windows(2).zip(p.edges(&self.edges)) {
                let (from, to) = (w[0].to_string(), w[1].to_string());
                match e {
                    Some(e) => {
                        let share = if p.stats.mean_ns > 0.0 {
                            100.0 * e.stats.mean_ns / p.stats.mean_ns
                        } else {
                            0.0
                        };
                        let _ = writeln!(
                            s,
                            "  {:<34} {:<34} {:>8} {:>9} {:>9} {:>9} {:>9} {:>5.0}%",
                            trunc(&from, 34),
                            trunc(&to, 34),
                            e.stats.count,
                            fmt_ns(e.stats.mean_ns),
                            fmt_ns(e.stats.p50_ns as f64),
                            fmt_ns(e.stats.p99_ns as f64),
                            fmt_ns(e.stats.max_ns as f64),
                            share
                        );
                    }
                    None => {
                        let _ = writeln!(s, "  {:<34} {:<34}", trunc(&from, 34), trunc(&to, 34));
                    }
                }
            }
            if let Some((e, share)) = p.dominant_edge(&self.edges) {
                let _ = writeln!(
                    s,
                    "  => most of this path's time is spent between {} and {}: {} of {} ({:.0}%)",
                    e.from,
                    e.to,
                    fmt_ns(e.stats.mean_ns),
                    fmt_ns(p.stats.mean_ns),
                    100.0 * share
                );
            }
        }
        if !self.cost.is_empty() {
            let _ = write!(
                s,
                "\nvtrace's own cost in the kernel:\n{}",
                crate::cost::render(&self.cost)
            );
        }
        s.push_str(&crate::discovery::render(&self.drivers));
        s.push_str(&crate::work::render(&self.work));
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }
}

fn trunc(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('~');
        t
    }
}
