//! Interned device names for the per-hop path.
//!
//! Every hop carries the name of the device it was seen at, and the joiner copies, compares and
//! hashes those names for every hop event (tens of thousands a second under a flood). An
//! `Iface` is a pointer to the one copy of its name: copying it is a word, comparing and hashing
//! it is a pointer comparison. Names are interned once, process-wide, and kept for the life of
//! the process: they are bounded by the devices the host has had (a few dozen bytes each), and
//! the aggregates keep every edge's names for the whole run anyway.

use std::{
    collections::HashSet,
    fmt,
    hash::{Hash, Hasher},
    sync::Mutex,
};

/// A device name as reports show it (`eth0`, `eth0@netns`, `-` for none).
#[derive(Clone, Copy)]
pub struct Iface(&'static str);

static NAMES: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);

impl Iface {
    /// The one `Iface` for this name (interned on first use; later calls only look it up).
    pub fn new(name: &str) -> Iface {
        // A poisoned lock only means another thread panicked mid-insert; the set is still valid.
        let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
        let names = names.get_or_insert_with(HashSet::new);
        if let Some(n) = names.get(name) {
            return Iface(n);
        }
        let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
        names.insert(leaked);
        Iface(leaked)
    }

    /// The name hops without a device of their own get when nothing came before them.
    pub fn none() -> Iface {
        Iface::new("-")
    }
}

// Interning makes the address the identity: equal names are the same allocation.
impl PartialEq for Iface {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl Eq for Iface {}

impl Hash for Iface {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self.0.as_ptr() as usize).hash(state);
    }
}

// Reports sort by the name itself, so the order does not depend on where names were allocated.
// Consistent with `eq`: two interned names compare equal exactly when they are the same name.
impl Ord for Iface {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(other.0)
    }
}

impl PartialOrd for Iface {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::ops::Deref for Iface {
    type Target = str;
    fn deref(&self) -> &str {
        self.0
    }
}

impl fmt::Display for Iface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Debug for Iface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

impl From<&str> for Iface {
    fn from(name: &str) -> Iface {
        Iface::new(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_names_are_one_iface_and_sort_by_name() {
        let a = Iface::new("tap0");
        let b = Iface::new(&String::from("tap0"));
        assert_eq!(a, b);
        assert!(std::ptr::eq(&*a, &*b));
        let c = Iface::new("eth0");
        assert_ne!(a, c);
        assert!(c < a, "sorted by name, not by address");
        assert_eq!(c.to_string(), "eth0");
    }
}
