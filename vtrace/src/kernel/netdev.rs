//! The kernel's own per-device counters, read in the device's network namespace from
//! /sys/class/net/<dev>/statistics (the same `rtnl_link_stats64` netlink's IFLA_STATS64 carries).

use std::{collections::BTreeMap, path::Path};

/// The drop-related counters of one device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DropCounters {
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    pub rx_missed_errors: u64,
    pub rx_fifo_errors: u64,
    pub tx_fifo_errors: u64,
}

impl DropCounters {
    pub fn delta(&self, before: &DropCounters) -> DropCounters {
        DropCounters {
            rx_dropped: self.rx_dropped.saturating_sub(before.rx_dropped),
            tx_dropped: self.tx_dropped.saturating_sub(before.tx_dropped),
            rx_missed_errors: self
                .rx_missed_errors
                .saturating_sub(before.rx_missed_errors),
            rx_fifo_errors: self.rx_fifo_errors.saturating_sub(before.rx_fifo_errors),
            tx_fifo_errors: self.tx_fifo_errors.saturating_sub(before.tx_fifo_errors),
        }
    }
    pub fn total(&self) -> u64 {
        self.rx_dropped
            + self.tx_dropped
            + self.rx_missed_errors
            + self.rx_fifo_errors
            + self.tx_fifo_errors
    }
}

/// Counters of every device in this process's network namespace.
pub fn snapshot() -> BTreeMap<String, DropCounters> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let stats = entry.path().join("statistics");
        let read = |f: &str| read_u64(&stats.join(f));
        out.insert(
            name,
            DropCounters {
                rx_dropped: read("rx_dropped"),
                tx_dropped: read("tx_dropped"),
                rx_missed_errors: read("rx_missed_errors"),
                rx_fifo_errors: read("rx_fifo_errors"),
                tx_fifo_errors: read("tx_fifo_errors"),
            },
        );
    }
    out
}

fn read_u64(p: &Path) -> u64 {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The network namespace inode of this process (to tell host devices from namespaced ones).
pub fn own_netns() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino() as u32)
        .unwrap_or(0)
}

/// Names of the namespaces under /var/run/netns (`ip netns`), by inode.
pub fn netns_names() -> BTreeMap<u32, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/var/run/netns") {
        for e in dir.flatten() {
            if let Ok(m) = std::fs::metadata(e.path()) {
                out.insert(m.ino() as u32, e.file_name().to_string_lossy().to_string());
            }
        }
    }
    out
}
