//! Packet identity: joins hop events into the paths packets take through the host.
//!
//! Within one skb's life the skb address is the identity; it is forgotten when the skb is freed
//! (`consume_skb`/`kfree_skb`), because the kernel hands the same memory to the next packet at
//! once. When the data is copied into a new skb (a VMM writing to a tap, netback building an skb
//! from a guest grant, a clone), the new skb is joined to the most recent earlier segment with
//! the same content fingerprint, within a join window.
//!
//! Pure logic: events in, edge and path observations out. The caller resolves device names.

use std::collections::VecDeque;

use crate::fasthash::FastMap;

pub use super::iface::Iface;

use vtrace_common::Hook;

/// One hop of a path: a hook at a device. Device-less hooks (a reader copying the data out, a
/// free) take the device the skb was last seen on, so `skb_copy_datagram_iovec@tap0` reads as
/// "the VMM read from tap0".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Point {
    pub hook: Hook,
    pub iface: Iface,
}

/// One hop event, as the joiner needs it.
#[derive(Clone, Debug)]
pub struct HopIn {
    pub ts: u64,
    pub skb: u64,
    pub fingerprint: u64,
    pub hook: Hook,
    /// None for hooks without a device.
    pub iface: Option<Iface>,
    /// The kernel started tracking this skb here (a new skb, or a reused address).
    pub first: bool,
}

/// What the joiner finds.
#[derive(Clone, Debug, PartialEq)]
pub enum Observation {
    /// Time between two consecutive hops of one packet.
    Edge { from: Point, to: Point, ns: u64 },
    /// A packet's whole path through the host, first hop to last, across joins.
    Path { hops: Vec<Point>, ns: u64 },
}

/// A slot in the joiner's segment table (segments are stored by index, not hashed).
type SegId = u32;

struct Segment {
    fingerprint: u64,
    hops: Vec<(Point, u64)>,
    /// The segment this one was copied from, and how many of its hops came before the copy.
    parent: Option<(SegId, usize)>,
    /// Children not yet finalized: a segment stays while a child may still need its hops.
    open_children: u32,
    /// The largest parent hop count any child was linked at.
    max_child_link: usize,
    ended: bool,
    finalized: bool,
}

impl Segment {
    fn last_ts(&self) -> u64 {
        self.hops.last().map(|h| h.1).unwrap_or(0)
    }
}

/// The segments that share one fingerprint: almost always one to three (a packet and its
/// copies), so they are kept inline and only spill to the heap beyond that.
#[derive(Default)]
struct SameContent {
    len: usize,
    inline: [SegId; 3],
    spill: Vec<SegId>,
}

impl SameContent {
    fn push(&mut self, id: SegId) {
        if self.len < self.inline.len() {
            self.inline[self.len] = id;
        } else {
            self.spill.push(id);
        }
        self.len += 1;
    }

    fn iter(&self) -> impl Iterator<Item = SegId> + '_ {
        let n = self.len.min(self.inline.len());
        self.inline[..n].iter().chain(self.spill.iter()).copied()
    }

    fn remove(&mut self, id: SegId) {
        let n = self.len.min(self.inline.len());
        if let Some(i) = self.inline[..n].iter().position(|x| *x == id) {
            // Fill the hole from the spill, else from the last inline slot.
            self.inline[i] = match self.spill.pop() {
                Some(last) => last,
                None => self.inline[n - 1],
            };
            self.len -= 1;
        } else if let Some(i) = self.spill.iter().position(|x| *x == id) {
            self.spill.swap_remove(i);
            self.len -= 1;
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Counters the joiner keeps about itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JoinStats {
    pub segments: u64,
    pub joins: u64,
    /// Segments that never saw their free (lost event, or still in flight at the end).
    pub unfinished: u64,
    /// Edges whose later hop carried an earlier timestamp (cross-CPU ordering); not timed.
    pub reordered: u64,
    /// Events whose fingerprint contradicted the live skb's: the address was reused unseen.
    pub stale: u64,
}

/// Hop vectors kept for reuse: a flood starts and releases tens of thousands of segments a
/// second, and reusing their vectors keeps the allocator out of the per-event path.
/// A live skb silent for this many windows is taken as ended: its free was lost or has no
/// tracepoint. That is the common case, not a rare one: a UDP socket copies small datagrams
/// out and frees them without a tracepoint, so every sampled UDP packet delivered to a local
/// socket waits this long. Four windows (4 s by default) keeps that memory small and still
/// lets a packet sit in a queue for seconds before its next hop.
const STALE_WINDOWS: u64 = 4;

const SPARE_HOPS: usize = 4096;

pub struct Joiner {
    /// Segments by slot; `None` slots are free and listed in `free`.
    slots: Vec<Option<Segment>>,
    free: Vec<SegId>,
    spare_hops: Vec<Vec<(Point, u64)>>,
    /// skb address → its segment, while the kernel may still report hops of it.
    live: FastMap<u64, SegId>,
    by_fp: FastMap<u64, SameContent>,
    /// Ended segments in the order they ended (about the order of their last hop): `flush`
    /// finalizes from the front while the front's window has passed.
    ended: VecDeque<SegId>,
    window_ns: u64,
    now: u64,
    /// Event time of the last `flush`: the joiner flushes itself once per window, so its
    /// memory is bounded by the packets of about two windows whatever the report interval.
    last_flush: u64,
    out: Vec<Observation>,
    pub stats: JoinStats,
}

impl Joiner {
    /// `window_ns`: how long after its last hop a segment may still be joined by a copy.
    pub fn new(window_ns: u64) -> Joiner {
        Joiner {
            slots: Vec::new(),
            free: Vec::new(),
            spare_hops: Vec::new(),
            live: FastMap::default(),
            by_fp: FastMap::default(),
            ended: VecDeque::new(),
            last_flush: 0,
            window_ns,
            now: 0,
            out: Vec::new(),
            stats: JoinStats::default(),
        }
    }

    /// Observations found since the last call.
    pub fn drain(&mut self) -> std::vec::Drain<'_, Observation> {
        self.out.drain(..)
    }

    /// Packets in flight (for memory accounting).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn seg(&self, id: SegId) -> Option<&Segment> {
        self.slots.get(id as usize).and_then(Option::as_ref)
    }

    fn seg_mut(&mut self, id: SegId) -> Option<&mut Segment> {
        self.slots.get_mut(id as usize).and_then(Option::as_mut)
    }

    /// Moves the clock on without an event (a quiet host): lets `flush` finalize packets
    /// whose window passed. `now_ns` is CLOCK_MONOTONIC, the clock of the events.
    pub fn advance(&mut self, now_ns: u64) {
        self.now = self.now.max(now_ns);
    }

    pub fn push(&mut self, ev: HopIn) {
        self.now = self.now.max(ev.ts);
        let mut current = self.live.get(&ev.skb).copied();
        if let Some(id) = current {
            if ev.first || self.seg(id).map(|s| s.fingerprint) != Some(ev.fingerprint) {
                // The address was reused without us seeing the free: close the old one.
                self.stats.stale += 1;
                self.end(ev.skb, id);
                current = None;
            }
        }
        let id = match current {
            Some(id) => id,
            None => self.start(&ev),
        };
        self.append(id, &ev);
        // The kernel forgets an skb when it is freed, and when a reader has copied it out
        // (many readers free it without a tracepoint): so does the joiner.
        if matches!(
            ev.hook,
            Hook::ConsumeSkb | Hook::KfreeSkb | Hook::SkbCopyDatagramIovec
        ) {
            self.end(ev.skb, id);
        }
        if self.now.saturating_sub(self.last_flush) > self.window_ns {
            self.flush(false);
        }
    }

    fn start(&mut self, ev: &HopIn) -> SegId {
        self.stats.segments += 1;
        // The most recent segment with the same content, still within the window.
        let window = self.window_ns;
        let parent = self.by_fp.get(&ev.fingerprint).and_then(|ids| {
            ids.iter()
                .filter_map(|pid| self.seg(pid).map(|s| (pid, s)))
                .filter(|(_, s)| {
                    !s.finalized && s.last_ts() <= ev.ts && ev.ts - s.last_ts() <= window
                })
                .max_by_key(|(_, s)| s.last_ts())
                .map(|(pid, s)| (pid, s.hops.len()))
        });
        if let Some((pid, link)) = parent {
            self.stats.joins += 1;
            if let Some(p) = self.seg_mut(pid) {
                p.open_children += 1;
                p.max_child_link = p.max_child_link.max(link);
            }
        }
        let seg = Segment {
            fingerprint: ev.fingerprint,
            hops: self.spare_hops.pop().unwrap_or_default(),
            parent,
            open_children: 0,
            max_child_link: 0,
            ended: false,
            finalized: false,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(seg);
                id
            }
            None => {
                self.slots.push(Some(seg));
                (self.slots.len() - 1) as SegId
            }
        };
        self.live.insert(ev.skb, id);
        self.by_fp.entry(ev.fingerprint).or_default().push(id);
        id
    }

    fn append(&mut self, id: SegId, ev: &HopIn) {
        let (prev, iface) = {
            let Some(seg) = self.seg(id) else {
                return;
            };
            let prev = match seg.hops.last() {
                Some(h) => Some(*h),
                None => seg.parent.and_then(|(pid, link)| {
                    self.seg(pid)
                        .and_then(|p| link.checked_sub(1).and_then(|i| p.hops.get(i)).copied())
                }),
            };
            let iface = match ev.iface {
                Some(i) => i,
                None => prev.map(|(p, _)| p.iface).unwrap_or_else(Iface::none),
            };
            (prev, iface)
        };
        let point = Point {
            hook: ev.hook,
            iface,
        };
        if let Some((from, from_ts)) = prev {
            if ev.ts < from_ts {
                // Cross-CPU order: counted, not timed (a 0 would pull the quantiles down).
                self.stats.reordered += 1;
            } else {
                self.out.push(Observation::Edge {
                    from,
                    to: point,
                    ns: ev.ts - from_ts,
                });
            }
        }
        if let Some(seg) = self.seg_mut(id) {
            seg.hops.push((point, ev.ts));
        }
    }

    fn end(&mut self, skb: u64, id: SegId) {
        self.live.remove(&skb);
        if let Some(seg) = self.seg_mut(id) {
            if !seg.ended {
                seg.ended = true;
                self.ended.push_back(id);
            }
        }
    }

    /// Finalizes segments that ended more than a window ago (all of them with `force`), emitting
    /// their paths. Live segments silent for `STALE_WINDOWS` windows are taken as ended.
    pub fn flush(&mut self, force: bool) {
        let now = self.now;
        self.last_flush = now;
        let window = self.window_ns;
        let stale_live: Vec<(u64, SegId)> = self
            .live
            .iter()
            .filter(|(_, id)| {
                self.seg(**id)
                    .map(|s| {
                        force
                            || now.saturating_sub(s.last_ts())
                                > window.saturating_mul(STALE_WINDOWS)
                    })
                    .unwrap_or(true)
            })
            .map(|(skb, id)| (*skb, *id))
            .collect();
        for (skb, id) in stale_live {
            self.stats.unfinished += 1;
            self.end(skb, id);
        }
        while let Some(&id) = self.ended.front() {
            let due = match self.seg(id) {
                Some(s) => force || now.saturating_sub(s.last_ts()) > window,
                None => true,
            };
            if !due {
                break;
            }
            self.ended.pop_front();
            self.finalize(id);
        }
    }

    fn finalize(&mut self, id: SegId) {
        let emit = match self.seg_mut(id) {
            Some(seg) if !seg.finalized => {
                seg.finalized = true;
                // Its own path, unless every hop after the last copy is only the free.
                seg.hops[seg.max_child_link.min(seg.hops.len())..]
                    .iter()
                    .any(|(p, _)| !matches!(p.hook, Hook::ConsumeSkb | Hook::KfreeSkb))
                    || seg.open_children == 0 && seg.max_child_link == 0
            }
            _ => return,
        };
        if emit {
            if let Some((hops, ns)) = self.path_of(id) {
                self.out.push(Observation::Path { hops, ns });
            }
        }
        self.release(id);
    }

    /// The points of segment `id`'s whole path (its ancestors' hops before each copy, then its
    /// own) and the time from the first to the last; None for a segment without hops.
    fn path_of(&self, id: SegId) -> Option<(Vec<Point>, u64)> {
        let mut chain: Vec<&[(Point, u64)]> = Vec::new();
        let (mut cur, mut limit) = (Some(id), usize::MAX);
        // Guard against cycles, which `start` cannot make, by bounding the walk.
        for _ in 0..64 {
            let Some(cid) = cur else { break };
            let Some(seg) = self.seg(cid) else {
                break;
            };
            let n = limit.min(seg.hops.len());
            chain.push(&seg.hops[..n]);
            match seg.parent {
                Some((pid, link)) => {
                    cur = Some(pid);
                    limit = link;
                }
                None => cur = None,
            }
        }
        let first = chain.iter().rev().find_map(|c| c.first())?.1;
        let last = chain.iter().find_map(|c| c.last())?.1;
        let mut points = Vec::with_capacity(chain.iter().map(|c| c.len()).sum());
        for c in chain.iter().rev() {
            points.extend(c.iter().map(|(p, _)| *p));
        }
        Some((points, last.saturating_sub(first)))
    }

    /// Drops a finalized segment once no child needs it, then its parent likewise.
    fn release(&mut self, mut id: SegId) {
        loop {
            let Some(seg) = self.seg(id) else {
                return;
            };
            if !seg.finalized || seg.open_children > 0 {
                return;
            }
            let Some(seg) = self.slots[id as usize].take() else {
                return;
            };
            self.free.push(id);
            if let Some(ids) = self.by_fp.get_mut(&seg.fingerprint) {
                ids.remove(id);
                if ids.is_empty() {
                    self.by_fp.remove(&seg.fingerprint);
                }
            }
            if self.spare_hops.len() < SPARE_HOPS {
                let mut hops = seg.hops;
                hops.clear();
                self.spare_hops.push(hops);
            }
            let Some((pid, _)) = seg.parent else { return };
            if let Some(p) = self.seg_mut(pid) {
                p.open_children = p.open_children.saturating_sub(1);
            }
            id = pid;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ts: u64, skb: u64, fp: u64, hook: Hook, iface: Option<&str>) -> HopIn {
        HopIn {
            ts,
            skb,
            fingerprint: fp,
            hook,
            iface: iface.map(Iface::new),
            first: false,
        }
    }

    /// A hop the kernel flagged as the start of an skb's tracking.
    fn first(ts: u64, skb: u64, fp: u64, hook: Hook, iface: &str) -> HopIn {
        HopIn {
            first: true,
            ..ev(ts, skb, fp, hook, Some(iface))
        }
    }

    fn paths(j: &mut Joiner) -> Vec<(Vec<String>, u64)> {
        j.drain()
            .filter_map(|o| match o {
                Observation::Path { hops, ns } => Some((
                    hops.iter()
                        .map(|p| format!("{}@{}", p.hook.name(), p.iface))
                        .collect(),
                    ns,
                )),
                _ => None,
            })
            .collect()
    }

    /// A ping request over the virtual lab path: the VMM reads tap A's skb (the kernel stops
    /// tracking it there) and writes the frame into tap B as a new skb with the same content.
    #[test]
    fn joins_across_a_copy_into_a_new_skb() {
        let mut j = Joiner::new(1_000_000);
        let fp = 0xabc;
        j.push(ev(1_000, 1, fp, Hook::NetDevStartXmit, Some("tapA")));
        j.push(ev(1_500, 1, fp, Hook::SkbCopyDatagramIovec, None));
        j.push(ev(9_500, 2, fp, Hook::NetifReceiveSkb, Some("tapB")));
        j.push(ev(10_000, 2, fp, Hook::ConsumeSkb, None));
        let edges: Vec<_> = j
            .drain()
            .filter_map(|o| match o {
                Observation::Edge { from, to, ns } => {
                    Some((from.hook, to.hook, to.iface.to_string(), ns))
                }
                _ => None,
            })
            .collect();
        let want = vec![
            (
                Hook::NetDevStartXmit,
                Hook::SkbCopyDatagramIovec,
                "tapA".to_string(),
                500,
            ),
            (
                Hook::SkbCopyDatagramIovec,
                Hook::NetifReceiveSkb,
                "tapB".to_string(),
                8_000,
            ),
            (
                Hook::NetifReceiveSkb,
                Hook::ConsumeSkb,
                "tapB".to_string(),
                500,
            ),
        ];
        assert_eq!(edges, want);
        j.flush(true);
        let p = paths(&mut j);
        assert_eq!(p.len(), 1, "one packet, one path: {p:?}");
        assert_eq!(p[0].1, 9_000);
        assert_eq!(p[0].0.len(), 4);
        assert_eq!(j.stats.joins, 1);
        assert_eq!(j.in_flight(), 0, "everything released");
    }

    /// The kernel reuses an skb's memory at once: after the free, the same address is another
    /// packet and must not extend the first one's path.
    #[test]
    fn forgets_the_address_at_free() {
        let mut j = Joiner::new(1_000);
        j.push(ev(100, 7, 1, Hook::NetDevQueue, Some("eth0")));
        j.push(ev(200, 7, 1, Hook::ConsumeSkb, None));
        j.push(ev(10_000, 7, 2, Hook::NetDevQueue, Some("eth0")));
        j.push(ev(10_050, 7, 2, Hook::ConsumeSkb, None));
        j.flush(true);
        let p = paths(&mut j);
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|(_, ns)| *ns < 200), "{p:?}");
        assert_eq!(j.stats.joins, 0, "different content never joins");
    }

    /// Same content far apart in time (a retransmission, or a repeated ping payload) is not a
    /// copy: the window stops the join.
    #[test]
    fn does_not_join_outside_the_window() {
        let mut j = Joiner::new(1_000);
        j.push(ev(100, 1, 5, Hook::NetDevQueue, Some("a")));
        j.push(ev(150, 1, 5, Hook::ConsumeSkb, None));
        j.flush(false);
        j.push(ev(5_000, 2, 5, Hook::NetifReceiveSkb, Some("b")));
        j.push(ev(5_100, 2, 5, Hook::ConsumeSkb, None));
        j.flush(true);
        assert_eq!(j.stats.joins, 0);
        assert_eq!(paths(&mut j).len(), 2);
    }

    /// A reused address whose free event was lost: the fingerprint differs, so the old segment
    /// is closed instead of growing a nonsense edge.
    #[test]
    fn a_lost_free_does_not_glue_two_packets() {
        let mut j = Joiner::new(1_000);
        j.push(ev(100, 9, 1, Hook::NetDevQueue, Some("a")));
        j.push(ev(900, 9, 2, Hook::NetDevQueue, Some("a")));
        j.flush(true);
        assert_eq!(j.stats.stale, 1);
        let edges = j
            .drain()
            .filter(|o| matches!(o, Observation::Edge { .. }))
            .count();
        assert_eq!(edges, 0);
    }

    /// A clone (bridge flood, raw socket delivery) forks the path; each edge is reported once,
    /// and a parent whose only hop after the fork is its free adds no path of its own.
    #[test]
    fn clones_fork_the_path() {
        let mut j = Joiner::new(10_000);
        j.push(ev(100, 1, 3, Hook::NetifReceiveSkb, Some("eth0")));
        j.push(ev(200, 2, 3, Hook::SkbCopyDatagramIovec, None)); // the clone, read by a socket
        j.push(ev(250, 2, 3, Hook::ConsumeSkb, None));
        j.push(ev(300, 1, 3, Hook::KfreeSkb, None)); // the original, dropped (NO_SOCKET)
        j.flush(true);
        let obs: Vec<_> = j.drain().collect();
        let edges = obs
            .iter()
            .filter(|o| matches!(o, Observation::Edge { .. }))
            .count();
        let paths = obs
            .iter()
            .filter(|o| matches!(o, Observation::Path { .. }))
            .count();
        assert_eq!(edges, 3);
        assert_eq!(paths, 1);
        assert_eq!(j.in_flight(), 0);
    }

    /// The same content at a reused address (a copy landing where the original was freed
    /// without a tracepoint): the kernel's FIRST flag still starts a new segment, joined as a copy.
    #[test]
    fn first_flag_starts_a_new_segment_at_a_reused_address() {
        let mut j = Joiner::new(10_000);
        j.push(first(100, 1, 4, Hook::NetDevStartXmit, "tapA"));
        j.push(first(900, 1, 4, Hook::NetifReceiveSkb, "tapB"));
        j.flush(true);
        assert_eq!(j.stats.stale, 1);
        assert_eq!(j.stats.joins, 1);
        assert_eq!(j.stats.segments, 2);
    }

    #[test]
    fn silent_live_segments_expire() {
        let mut j = Joiner::new(100);
        j.push(ev(100, 1, 1, Hook::NetDevQueue, Some("a")));
        j.push(ev(100_000, 2, 2, Hook::NetDevQueue, Some("a")));
        j.flush(false);
        assert_eq!(j.stats.unfinished, 1);
        assert_eq!(j.in_flight(), 1, "only the fresh one remains");
    }

    /// Without any report (a long `--interval`), the joiner still finalizes what is done: its
    /// memory holds about two windows of packets, not the whole run.
    #[test]
    fn memory_is_bounded_without_reports() {
        let ms = 1_000_000;
        let mut j = Joiner::new(10 * ms);
        let mut most = 0;
        for i in 0..10_000u64 {
            let t = i * ms;
            j.push(ev(t, 0x1000 + i, i + 1, Hook::NetDevQueue, Some("a")));
            j.push(ev(t + 1000, 0x1000 + i, i + 1, Hook::ConsumeSkb, None));
            most = most.max(j.in_flight());
            let _ = j.drain().count();
        }
        assert!(most <= 25, "{most} segments held at once");
    }
}
