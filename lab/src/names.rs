//! Lab ids and the names derived from them.
//!
//! Every lab object is named `vl` + a 5-character id + a short role suffix, e.g. the
//! native sender namespace of lab `k3x9a` is `vlk3x9a-na` and its bridge `vlk3x9abn`.
//! Host device names therefore stay at 9 characters, well within IFNAMSIZ-1 = 15.
//! The fixed shape is what lets [`crate::Lab::clean_all_leftovers`] find the remains
//! of crashed runs without touching anything else on the host.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};

/// First two characters of every lab name.
pub const NAME_PREFIX: &str = "vl";
/// Length of a lab id.
pub const ID_LEN: usize = 5;
/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
/// 36^5: the number of distinct ids.
const ID_SPACE: u64 = 60_466_176;
/// Step between consecutive ids of one process. Coprime to 36^5 (odd, not a multiple
/// of 3), so a process never repeats an id within 36^5 calls.
const ID_STEP: u64 = 21_126_101;

static COUNTER: AtomicU64 = AtomicU64::new(0);
static PROCESS_BASE: OnceLock<u64> = OnceLock::new();

/// A fresh lab id: 5 characters of `[a-z0-9]`.
///
/// Built from the pid and the time of the process's first call (hashed into a
/// per-process starting point) plus an atomic counter (distinct ids for every call in
/// this process, whatever the thread). Ids whose names are already present on the
/// host (a running lab, or leftovers) are skipped.
pub fn unique_id() -> String {
    let base = *PROCESS_BASE.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        splitmix64((u64::from(std::process::id()) << 32) ^ nanos)
    });
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = encode_id((base % ID_SPACE + (n % ID_SPACE) * ID_STEP % ID_SPACE) % ID_SPACE);
        if !id_in_use(&id) {
            return id;
        }
    }
}

/// Whether anything named after lab `id` exists: owner file, namespaces or devices.
fn id_in_use(id: &str) -> bool {
    let p = prefix(id);
    if crate::topology::owner_file(id).exists() {
        return true;
    }
    let taken = |dir: &str| {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(&p))
            })
            .unwrap_or(false)
    };
    taken("/run/netns") || taken("/sys/class/net")
}

fn encode_id(mut v: u64) -> String {
    let mut out = [0u8; ID_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(v % 36) as usize];
        v /= 36;
    }
    out.iter().map(|&b| b as char).collect()
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn is_id_char(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// Checks that `id` is a valid lab id (exactly 5 characters of `[a-z0-9]`).
pub fn validate_id(id: &str) -> Result<()> {
    if id.len() != ID_LEN || !id.bytes().all(is_id_char) {
        bail!("invalid lab id {id:?}: expected {ID_LEN} characters of [a-z0-9]");
    }
    Ok(())
}

/// The name prefix of lab `id`: `vl` + id.
pub fn prefix(id: &str) -> String {
    format!("{NAME_PREFIX}{id}")
}

/// If `name` has the shape of a lab object name (`vl[a-z0-9]{5}` followed by nothing,
/// or by an optional `-` and two lowercase letters), returns its lab id.
pub fn lab_id_of(name: &str) -> Option<&str> {
    let b = name.as_bytes();
    let head = NAME_PREFIX.len() + ID_LEN;
    if b.len() < head || !name.starts_with(NAME_PREFIX) {
        return None;
    }
    if !b[NAME_PREFIX.len()..head].iter().all(|&c| is_id_char(c)) {
        return None;
    }
    let rest = &b[head..];
    let rest = rest.strip_prefix(b"-").unwrap_or(rest);
    if rest.is_empty() || (rest.len() == 2 && rest.iter().all(u8::is_ascii_lowercase)) {
        Some(&name[NAME_PREFIX.len()..head])
    } else {
        None
    }
}

/// Whether `name` has the shape of a lab object name (see [`lab_id_of`]).
pub fn is_lab_name(name: &str) -> bool {
    lab_id_of(name).is_some()
}

/// Checks that `prefix` is a usable clean-up prefix: `vl` followed by 0 to 5 id
/// characters (so that it can only ever select lab names).
pub fn validate_prefix(prefix: &str) -> Result<()> {
    let ok = prefix.starts_with(NAME_PREFIX)
        && prefix.len() <= NAME_PREFIX.len() + ID_LEN
        && prefix.bytes().skip(NAME_PREFIX.len()).all(is_id_char);
    if !ok {
        bail!("invalid lab prefix {prefix:?}: expected \"vl\" followed by up to {ID_LEN} characters of [a-z0-9]");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_have_the_right_shape() {
        for _ in 0..100 {
            let id = unique_id();
            validate_id(&id).expect("valid id");
        }
    }

    #[test]
    fn ids_are_unique_across_threads() {
        let handles: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..500).map(|_| unique_id()).collect::<Vec<_>>()))
            .collect();
        let mut seen = HashSet::new();
        for h in handles {
            for id in h.join().expect("thread") {
                assert!(seen.insert(id.clone()), "duplicate id {id}");
            }
        }
    }

    #[test]
    fn encoding_is_base36() {
        assert_eq!(encode_id(0), "00000");
        assert_eq!(encode_id(35), "0000z");
        assert_eq!(encode_id(36), "00010");
        assert_eq!(encode_id(ID_SPACE - 1), "zzzzz");
    }

    // 36^5 = 2^10 * 3^10: the step must be neither even nor a multiple of 3.
    const _: () = assert!(!ID_STEP.is_multiple_of(2) && !ID_STEP.is_multiple_of(3));

    #[test]
    fn validate_id_rejects_bad_ids() {
        assert!(validate_id("ab1c9").is_ok());
        for bad in ["", "abcd", "abcdef", "ABCDE", "ab-de", "ab de", "abcdé"] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn lab_names_are_recognised() {
        assert_eq!(lab_id_of("vlab1c9-na"), Some("ab1c9"));
        assert_eq!(lab_id_of("vlab1c9na"), Some("ab1c9"));
        assert_eq!(lab_id_of("vlab1c9bx"), Some("ab1c9"));
        assert_eq!(lab_id_of("vlab1c9"), Some("ab1c9"));
        for other in [
            "eth0",
            "lo",
            "vl",
            "vlab1c",
            "vlAB1C9na",
            "vlab1c9-n",
            "vlab1c9-nax",
            "vlab1c9n1",
            "vlab1c9_na",
            "xvlab1c9na",
            "vlan10",
            "vlab1c9nab",
        ] {
            assert!(!is_lab_name(other), "{other:?} taken for a lab name");
        }
    }

    #[test]
    fn device_names_fit_ifnamsiz() {
        let p = prefix("zzzzz");
        assert!(format!("{p}na").len() <= MAX_IFNAME);
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(validate_prefix("vl").is_ok());
        assert!(validate_prefix("vlab1c9").is_ok());
        for bad in ["", "v", "eth", "vlab1c9x", "vlAB", "vl-"] {
            assert!(validate_prefix(bad).is_err(), "{bad:?} accepted");
        }
    }
}
