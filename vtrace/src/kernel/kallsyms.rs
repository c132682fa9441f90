//! Kernel symbol resolution from `/proc/kallsyms`.
//!
//! Each line of `/proc/kallsyms` is `address type name` with an optional
//! `[module]` after a tab, e.g. (tab shown as spaces)
//!
//! ```text
//! ffffffff81dfce00 t tun_net_xmit
//! ffffffffc0a01230 t vxlan_xmit    [vxlan]
//! ```
//!
//! The type letter follows `nm`: `t`/`T` is text (code), `w`/`W` a weak
//! symbol (code here), `d`/`b`/`r` data, `a` absolute; upper case means
//! global. Only root (CAP_SYSLOG with `kptr_restrict` permitting) sees real
//! addresses; everyone else reads zeros, which [`Kallsyms::load`] reports
//! as an error.
//!
//! Symbol sizes are not listed, so an address is attributed to the nearest
//! symbol at or below it; data symbols, when the kernel lists them
//! (`CONFIG_KALLSYMS_ALL`), end the text symbol before them, so data
//! addresses do not get a text name.
//!
//! The compiler may emit specialised copies of a function under names such
//! as `foo.constprop.0`, `foo.isra.0`, `foo.part.0` or `foo.cold`; since `.`
//! cannot occur in a C identifier, [`Kallsyms::lookup`] treats any
//! `foo.<suffix>` as a variant of `foo`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the kernel lists its symbols.
pub const PROC_KALLSYMS: &str = "/proc/kallsyms";

/// Errors from loading or parsing kallsyms.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KallsymsError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line does not have the `address type name [module]` shape.
    #[error("kallsyms line {line}: {reason}")]
    Parse { line: usize, reason: String },
    /// Every address is zero: the kernel hides them from this process.
    #[error(
        "all kallsyms addresses are zero: kernel pointers are hidden \
         (run as root with CAP_SYSLOG, and check /proc/sys/kernel/kptr_restrict)"
    )]
    AddressesHidden,
    /// The input lists no symbols at all.
    #[error("kallsyms lists no symbols")]
    Empty,
}

/// One line of kallsyms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSymbol {
    /// Start address of the symbol.
    pub addr: u64,
    /// The `nm`-style type letter (`t`, `T`, `W`, `d`, ...).
    pub kind: char,
    /// Symbol name, including any compiler suffix (`foo.isra.0`).
    pub name: String,
    /// Module name without brackets; `None` for the core kernel.
    pub module: Option<Arc<str>>,
}

impl KernelSymbol {
    /// Whether the symbol is code (`t`, `T`, `w`, `W`).
    pub fn is_text(&self) -> bool {
        matches!(self.kind, 't' | 'T' | 'w' | 'W')
    }
}

/// An address resolved to `name+offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Symbol<'a> {
    /// Name of the symbol containing the address.
    pub name: &'a str,
    /// Bytes from the symbol's start.
    pub offset: u64,
    /// Module name; `None` for the core kernel.
    pub module: Option<&'a str>,
}

/// `name+0x1b3`, followed by ` [module]` for module symbols.
impl fmt::Display for Symbol<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{:#x}", self.name, self.offset)?;
        if let Some(module) = self.module {
            write!(f, " [{module}]")?;
        }
        Ok(())
    }
}

/// The kernel's symbol table, indexed by address and by name.
#[derive(Debug, Clone)]
pub struct Kallsyms {
    /// Sorted by address (stable: equal addresses keep file order).
    /// Absolute and zero-address symbols are left out.
    by_addr: Vec<KernelSymbol>,
    /// Indices into `by_addr`, sorted by name.
    by_name: Vec<usize>,
}

impl Kallsyms {
    /// Reads `/proc/kallsyms`.
    pub fn load() -> Result<Kallsyms, KallsymsError> {
        Kallsyms::from_file(PROC_KALLSYMS)
    }

    /// `/proc/kallsyms` read once per process and shared (drop locations, driver functions,
    /// kprobe symbols): one copy in memory, taken when first asked for. `None` when it cannot
    /// be read.
    pub fn shared() -> Option<&'static Kallsyms> {
        static SHARED: std::sync::OnceLock<Option<Kallsyms>> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| Kallsyms::load().ok()).as_ref()
    }

    /// Reads a file in kallsyms format.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Kallsyms, KallsymsError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| KallsymsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Kallsyms::parse(&String::from_utf8_lossy(&bytes))
    }

    /// Parses kallsyms text. Errors when a line is malformed, when there
    /// are no symbols, and when every address is zero (hidden pointers).
    pub fn parse(text: &str) -> Result<Kallsyms, KallsymsError> {
        let mut modules: Vec<Arc<str>> = Vec::new();
        let mut symbols = Vec::new();
        let mut listed = 0usize;
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let err = |reason: &str| KallsymsError::Parse {
                line: line_no,
                reason: reason.to_string(),
            };
            let mut fields = line.split_whitespace();
            let Some(addr) = fields.next() else { continue };
            let addr =
                u64::from_str_radix(addr, 16).map_err(|_| err(&format!("bad address {addr:?}")))?;
            let kind = match fields.next().map(|k| (k.len(), k.chars().next())) {
                Some((1, Some(c))) => c,
                _ => return Err(err("missing or bad symbol type")),
            };
            let name = fields.next().ok_or_else(|| err("missing symbol name"))?;
            let module = match fields.next() {
                None => None,
                Some(m) => {
                    let m = m
                        .strip_prefix('[')
                        .and_then(|m| m.strip_suffix(']'))
                        .filter(|m| !m.is_empty())
                        .ok_or_else(|| err(&format!("bad module field {m:?}")))?;
                    // Module symbols come in runs; reuse the last name.
                    let arc = match modules.iter().rev().find(|x| &***x == m) {
                        Some(a) => a.clone(),
                        None => {
                            let a: Arc<str> = Arc::from(m);
                            modules.push(a.clone());
                            a
                        }
                    };
                    Some(arc)
                }
            };
            if fields.next().is_some() {
                return Err(err("unexpected trailing fields"));
            }
            listed += 1;
            if addr == 0 || matches!(kind, 'a' | 'A') {
                continue;
            }
            symbols.push(KernelSymbol {
                addr,
                kind,
                name: name.to_string(),
                module,
            });
        }
        if listed == 0 {
            return Err(KallsymsError::Empty);
        }
        if symbols.is_empty() {
            return Err(KallsymsError::AddressesHidden);
        }
        symbols.sort_by_key(|s| s.addr);
        let mut by_name: Vec<usize> = (0..symbols.len()).collect();
        by_name.sort_by(|&a, &b| symbols[a].name.cmp(&symbols[b].name).then(a.cmp(&b)));
        Ok(Kallsyms {
            by_addr: symbols,
            by_name,
        })
    }

    /// Number of symbols kept (absolute and zero-address ones are dropped).
    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    /// Whether no symbol was kept.
    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }

    /// The code symbol containing `addr`: the nearest text symbol at or
    /// below it. `None` below the first symbol, or when the nearest symbol
    /// is data.
    pub fn symbolize(&self, addr: u64) -> Option<Symbol<'_>> {
        let end = self.by_addr.partition_point(|s| s.addr <= addr);
        let nearest = self.by_addr.get(end.checked_sub(1)?)?.addr;
        let start = self.by_addr.partition_point(|s| s.addr < nearest);
        let sym = self.by_addr.get(start..end)?.iter().find(|s| s.is_text())?;
        Some(Symbol {
            name: &sym.name,
            offset: addr - sym.addr,
            module: sym.module.as_deref(),
        })
    }

    /// `name+0x1b3 [module]` for `addr`, or the bare hex address when no
    /// symbol contains it.
    pub fn format(&self, addr: u64) -> String {
        match self.symbolize(addr) {
            Some(sym) => sym.to_string(),
            None => format!("{addr:#x}"),
        }
    }

    /// Symbols named `name` and compiler-made variants of it
    /// (`name.constprop.0`, `name.isra.0`, `name.part.0`, `name.cold`, ...),
    /// exact matches first, then variants sorted by name.
    pub fn lookup(&self, name: &str) -> Vec<&KernelSymbol> {
        let mut found = Vec::new();
        // All names equal to `name`, then all starting with `name.`, are
        // contiguous in name order.
        let start = self.by_name.partition_point(|&i| self.name_at(i) < name);
        for &i in self.by_name.get(start..).unwrap_or_default() {
            let n = self.name_at(i);
            if n == name {
                if let Some(s) = self.by_addr.get(i) {
                    found.push(s);
                }
            } else {
                break;
            }
        }
        let prefix = format!("{name}.");
        let start = self
            .by_name
            .partition_point(|&i| self.name_at(i) < prefix.as_str());
        for &i in self.by_name.get(start..).unwrap_or_default() {
            let n = self.name_at(i);
            if n.len() > prefix.len() && n.starts_with(&prefix) {
                if let Some(s) = self.by_addr.get(i) {
                    found.push(s);
                }
            } else {
                break;
            }
        }
        found
    }

    /// Address of the text symbol named exactly `name` (the first one, if
    /// several static functions share the name).
    pub fn addr_of(&self, name: &str) -> Option<u64> {
        self.lookup(name)
            .into_iter()
            .find(|s| s.name == name && s.is_text())
            .map(|s| s.addr)
    }

    fn name_at(&self, i: usize) -> &str {
        self.by_addr.get(i).map_or("", |s| s.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
0000000000000000 A fixed_percpu_data
0000000000001000 A absolute_thing
ffffffff81000000 T _stext
ffffffff81000100 t foo
ffffffff81000180 t foo.constprop.0
ffffffff81000200 T foo_bar
ffffffff81000300 t foo.isra.0
ffffffff81000300 t foo_alias
ffffffff81000400 W weak_fn
ffffffff81000500 t foo.cold
ffffffff81000600 T _etext
ffffffff82000000 D some_data
ffffffff82000100 d other_data
ffffffffc0001000 t vx_xmit\t[vxlan]
ffffffffc0001080 T vx_rcv\t[vxlan]
ffffffffc0002000 t tun_thing\t[tun]
ffffffffc0002040 t foo\t[tun]
ffffffff81000050 t early_fn
";

    #[test]
    fn parses_and_symbolizes() {
        let k = Kallsyms::parse(SAMPLE).unwrap();
        assert_eq!(k.len(), 16); // absolute symbols dropped
        let s = k.symbolize(0xffffffff81000100 + 0x1b).unwrap();
        assert_eq!((s.name, s.offset, s.module), ("foo", 0x1b, None));
        assert_eq!(s.to_string(), "foo+0x1b");
        assert_eq!(k.format(0xffffffff81000100), "foo+0x0");
        // Unsorted input line.
        assert_eq!(k.symbolize(0xffffffff81000060).unwrap().name, "early_fn");
        assert_eq!(
            k.symbolize(0xffffffff810001ff).unwrap().name,
            "foo.constprop.0"
        );
        // Same address: the first listed text symbol wins.
        assert_eq!(k.symbolize(0xffffffff81000310).unwrap().name, "foo.isra.0");
        assert_eq!(k.symbolize(0xffffffff81000401).unwrap().name, "weak_fn");
        // Below the first symbol, and in data.
        assert_eq!(k.symbolize(0xffffffff80ffffff), None);
        assert_eq!(k.symbolize(0x10), None);
        assert_eq!(k.symbolize(0xffffffff82000010), None);
        assert_eq!(k.format(0xffffffff82000010), "0xffffffff82000010");
        // Module symbols.
        let s = k.symbolize(0xffffffffc0001090).unwrap();
        assert_eq!(
            (s.name, s.offset, s.module),
            ("vx_rcv", 0x10, Some("vxlan"))
        );
        assert_eq!(s.to_string(), "vx_rcv+0x10 [vxlan]");
        assert_eq!(k.format(0xffffffffc0002044), "foo+0x4 [tun]");
    }

    #[test]
    fn lookup_includes_compiler_variants() {
        let k = Kallsyms::parse(SAMPLE).unwrap();
        let names: Vec<(&str, Option<&str>)> = k
            .lookup("foo")
            .iter()
            .map(|s| (s.name.as_str(), s.module.as_deref()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("foo", None),
                ("foo", Some("tun")),
                ("foo.cold", None),
                ("foo.constprop.0", None),
                ("foo.isra.0", None),
            ]
        );
        assert_eq!(k.addr_of("foo"), Some(0xffffffff81000100));
        assert_eq!(k.addr_of("foo_bar"), Some(0xffffffff81000200));
        assert_eq!(k.addr_of("some_data"), None); // not text
        assert!(k.lookup("fo").is_empty());
        assert!(k.lookup("zzz").is_empty());
        assert_eq!(k.lookup("vx_xmit").len(), 1);
    }

    #[test]
    fn bad_input_is_an_error() {
        let hidden = "0000000000000000 T _stext\n0000000000000000 t foo\n";
        assert!(matches!(
            Kallsyms::parse(hidden),
            Err(KallsymsError::AddressesHidden)
        ));
        assert!(matches!(Kallsyms::parse(""), Err(KallsymsError::Empty)));
        assert!(matches!(Kallsyms::parse("\n\n"), Err(KallsymsError::Empty)));
        for bad in [
            "zzzz T foo",
            "ffffffff81000000",
            "ffffffff81000000 T",
            "ffffffff81000000 TT foo",
            "ffffffff81000000 T foo bar",
            "ffffffff81000000 T foo []",
            "ffffffff81000000 T foo [mod] extra",
            "1ffffffff81000000 T foo",
        ] {
            let err = Kallsyms::parse(&format!("ffffffff81000000 T ok\n{bad}\n")).unwrap_err();
            assert!(
                matches!(err, KallsymsError::Parse { line: 2, .. }),
                "{bad:?}: {err}"
            );
        }
        // Arbitrary bytes never panic.
        let mut state: u32 = 12345;
        for _ in 0..500 {
            let mut line = String::new();
            for _ in 0..40 {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                line.push(b"0123456789abcdef []\tTtx.\n"[(state >> 16) as usize % 25] as char);
            }
            if let Ok(k) = Kallsyms::parse(&line) {
                let _ = k.symbolize(u64::MAX);
                let _ = k.symbolize(0);
                let _ = k.lookup("t");
            }
        }
    }

    #[test]
    fn real_kallsyms() {
        let k = match Kallsyms::load() {
            Ok(k) => k,
            Err(e) => {
                eprintln!("skipping: {e}");
                return;
            }
        };
        assert!(k.len() > 1000);
        // tun may be built in or a module, or absent on other kernels.
        let Some(addr) = k.addr_of("tun_net_xmit") else {
            eprintln!("tun_net_xmit not in kallsyms; skipping");
            return;
        };
        let sym = k.symbolize(addr + 0x10).unwrap();
        assert_eq!(sym.name, "tun_net_xmit");
        assert_eq!(sym.offset, 0x10);
        let text = sym.to_string();
        assert!(text.starts_with("tun_net_xmit+0x10"), "{text}");
        // Several aliases share _stext's address; any of them, at offset 0.
        let stext = k.addr_of("_stext").unwrap();
        let sym = k.symbolize(stext).unwrap();
        assert_eq!(sym.offset, 0);
        assert_eq!(k.addr_of(sym.name), Some(stext));
        for s in k.lookup("tun_net_xmit") {
            assert!(s.name == "tun_net_xmit" || s.name.starts_with("tun_net_xmit."));
            eprintln!("{:#x} {} {}", s.addr, s.kind, s.name);
        }
    }
}
