//! A small reader for BTF (BPF Type Format), the type information the kernel
//! exports in `/sys/kernel/btf/`.
//!
//! aya-ebpf has no CO-RE relocations, so the eBPF programs cannot ask the
//! loader to patch struct field offsets. Instead vtrace reads the layout of
//! the kernel structures it needs (`sk_buff`, `net_device`, ...) from the
//! running kernel's BTF here, in userspace, and hands the byte offsets to the
//! programs. The same data answers "does this kernel have function X" (for
//! kprobes/fentry) and "what is the numeric value of enum constant Y" (for
//! `skb_drop_reason`).
//!
//! # The format, as far as this reader needs it
//!
//! See the kernel's `Documentation/bpf/btf.rst` for the full description.
//!
//! * A blob starts with a header: `magic: u16` (0xEB9F, written in the
//!   producer's byte order, which tells the reader the blob's endianness),
//!   `version: u8` (1), `flags: u8`, `hdr_len: u32`, then four `u32`s:
//!   `type_off`, `type_len`, `str_off`, `str_len`. The section offsets are
//!   relative to the *end* of the header (`hdr_len` bytes from the start),
//!   and `hdr_len` may be larger than the 24 bytes this reader knows.
//! * The string section is a sequence of NUL terminated strings; a name is
//!   referred to by its byte offset (`name_off`) in that section. Offset 0
//!   is the empty string, which is how anonymous types and members are named.
//! * The type section is a sequence of variable-length records. Each starts
//!   with a 12-byte `struct btf_type { name_off, info, size_or_type }`, where
//!   `info` packs `vlen` (bits 0..16), `kind` (bits 24..29) and `kind_flag`
//!   (bit 31). Depending on the kind, extra data follows the record (e.g.
//!   `vlen` 12-byte members for a struct); every kind must be understood to
//!   find where the next record starts. Type ids are implicit: the first
//!   record is id 1, and id 0 means `void`.
//! * Struct and union members carry a bit offset. When the struct's
//!   `kind_flag` is set the member's `offset` word packs the bitfield size in
//!   its top 8 bits and the bit offset in its low 24 bits; otherwise the word
//!   is the bit offset and a bitfield is expressed by an `INT` type whose bit
//!   width is smaller than its byte size.
//! * Modules' BTF (`/sys/kernel/btf/<module>`) is *split* BTF built on top of
//!   vmlinux: its type ids continue after vmlinux's last id and its string
//!   offsets continue after the end of vmlinux's string section, so a module
//!   type can refer to vmlinux types and names directly.
//!
//! The reader keeps the raw blob and an index of where each type record
//! starts, and decodes records on demand. It never indexes unchecked: every
//! read on the blob is bounds checked, so a truncated or corrupted blob gives
//! a [`BtfError`], not a panic.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Magic number at the start of every BTF blob, in the producer's byte order.
pub const BTF_MAGIC: u16 = 0xeb9f;

/// Directory where the kernel exports BTF: `vmlinux` plus one file per module.
pub const SYS_BTF_DIR: &str = "/sys/kernel/btf";

/// Size of the part of the header this reader understands.
const HEADER_MIN_LEN: usize = 24;
/// Size of `struct btf_type`, the fixed part of every type record.
const TYPE_RECORD_LEN: usize = 12;
/// Bound on nested anonymous members, typedef/modifier chains and array
/// nesting. Real kernels need a handful; the bound only stops cyclic
/// (corrupt) data from recursing forever.
const MAX_DEPTH: u32 = 64;

/// `BTF_KIND_*` values.
mod kind {
    pub const INT: u32 = 1;
    pub const PTR: u32 = 2;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const FWD: u32 = 7;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC: u32 = 12;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const FLOAT: u32 = 16;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
}

fn kind_name(k: u32) -> &'static str {
    match k {
        kind::INT => "INT",
        kind::PTR => "PTR",
        kind::ARRAY => "ARRAY",
        kind::STRUCT => "STRUCT",
        kind::UNION => "UNION",
        kind::ENUM => "ENUM",
        kind::FWD => "FWD",
        kind::TYPEDEF => "TYPEDEF",
        kind::VOLATILE => "VOLATILE",
        kind::CONST => "CONST",
        kind::RESTRICT => "RESTRICT",
        kind::FUNC => "FUNC",
        kind::FUNC_PROTO => "FUNC_PROTO",
        kind::VAR => "VAR",
        kind::DATASEC => "DATASEC",
        kind::FLOAT => "FLOAT",
        kind::DECL_TAG => "DECL_TAG",
        kind::TYPE_TAG => "TYPE_TAG",
        kind::ENUM64 => "ENUM64",
        _ => "UNKNOWN",
    }
}

/// Errors from reading or querying BTF.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BtfError {
    /// The BTF file could not be read.
    #[error("cannot read BTF from {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The blob is not valid BTF (bad header, truncated, unknown kind, ...).
    #[error("malformed BTF: {0}")]
    Malformed(String),
    /// `Btf::module` was given something that is not a plain module name.
    #[error("invalid kernel module name {0:?}")]
    InvalidModuleName(String),
    /// No struct, union, or typedef of one, has this name. `member` is the
    /// member path that was being looked up, if any.
    #[error(
        "struct or union `{struct_name}` not found in BTF{}",
        .member.as_ref().map(|m| format!(" (looking up member `{m}`)")).unwrap_or_default()
    )]
    StructNotFound {
        struct_name: String,
        member: Option<String>,
    },
    /// The struct exists but the member path does not resolve.
    #[error("member `{path}` not found in struct `{struct_name}` (no member named `{component}`)")]
    MemberNotFound {
        struct_name: String,
        path: String,
        component: String,
    },
    /// A member path descends into a member that is not a struct or union.
    #[error(
        "member `{path}` of struct `{struct_name}`: `{component}` is a {kind}, not a struct or union"
    )]
    NotComposite {
        struct_name: String,
        path: String,
        component: String,
        kind: &'static str,
    },
    /// The member is a bitfield that does not start and end on byte
    /// boundaries, so it has no byte offset or byte size.
    #[error(
        "member `{path}` of struct `{struct_name}` is a bitfield at bit offset {bit_offset} \
         ({bit_size} bits) that is not byte aligned"
    )]
    UnalignedBitfield {
        struct_name: String,
        path: String,
        bit_offset: u32,
        bit_size: u32,
    },
    /// The member path is empty or has an empty component (`"a..b"`).
    #[error("invalid member path `{0}`")]
    InvalidPath(String),
    /// The type has no size (function, forward declaration, void, ...).
    #[error("type `{name}` ({kind}) has no size")]
    Unsized { name: String, kind: &'static str },
    /// No ENUM or ENUM64 has this name.
    #[error("enum `{0}` not found in BTF")]
    EnumNotFound(String),
}

fn malformed(msg: impl Into<String>) -> BtfError {
    BtfError::Malformed(msg.into())
}

/// Where a member lives inside the struct it was looked up in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberInfo {
    /// Offset in bits from the start of the outermost struct.
    pub bit_offset: u32,
    /// Width in bits when the member is a bitfield, `None` otherwise.
    pub bitfield_size: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endian {
    Little,
    Big,
}

fn read_u32(data: &[u8], off: usize, endian: Endian) -> Option<u32> {
    let bytes: [u8; 4] = data.get(off..off.checked_add(4)?)?.try_into().ok()?;
    Some(match endian {
        Endian::Little => u32::from_le_bytes(bytes),
        Endian::Big => u32::from_be_bytes(bytes),
    })
}

/// The fixed part of one type record, plus where its trailing data starts.
#[derive(Debug, Clone, Copy)]
struct RawType {
    name_off: u32,
    info: u32,
    /// `size` for INT, ENUM, ENUM64, STRUCT, UNION, DATASEC, FLOAT;
    /// the referenced type id for the other kinds (0 for FWD).
    size_or_type: u32,
    /// Absolute offset in the blob of the data following the record.
    extra: u32,
}

impl RawType {
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }
    fn vlen(&self) -> u32 {
        self.info & 0xffff
    }
    fn kind_flag(&self) -> bool {
        self.info >> 31 == 1
    }
    /// Length of the data following the record, `None` for unknown kinds.
    fn extra_len(&self) -> Option<usize> {
        let vlen = self.vlen() as usize;
        Some(match self.kind() {
            // u32 with encoding, bit offset and bit width.
            kind::INT => 4,
            // struct btf_array { type, index_type, nelems }.
            kind::ARRAY => 12,
            // struct btf_member { name_off, type, offset } per member.
            kind::STRUCT | kind::UNION => vlen * 12,
            // struct btf_enum { name_off, val } per value.
            kind::ENUM => vlen * 8,
            // struct btf_param { name_off, type } per parameter.
            kind::FUNC_PROTO => vlen * 8,
            // struct btf_var { linkage }.
            kind::VAR => 4,
            // struct btf_var_secinfo { type, offset, size } per variable.
            kind::DATASEC => vlen * 12,
            // struct btf_decl_tag { component_idx }.
            kind::DECL_TAG => 4,
            // struct btf_enum64 { name_off, val_lo32, val_hi32 } per value.
            kind::ENUM64 => vlen * 12,
            // For FUNC, vlen is the linkage and nothing follows.
            kind::PTR
            | kind::FWD
            | kind::TYPEDEF
            | kind::VOLATILE
            | kind::CONST
            | kind::RESTRICT
            | kind::FUNC
            | kind::FLOAT
            | kind::TYPE_TAG => 0,
            _ => return None,
        })
    }
}

/// One parsed blob: vmlinux, or a module's split BTF on top of it.
struct Layer {
    data: Vec<u8>,
    endian: Endian,
    /// Absolute range of the string section in `data`.
    strings: Range<usize>,
    types: Vec<RawType>,
    /// Type id of `types[0]`: 1 for base BTF, base's last id + 1 for split.
    first_id: u32,
    /// String offset of this layer's first string: 0 for base BTF, the
    /// base's total string section length for split BTF.
    str_base: u32,
}

impl Layer {
    fn parse(data: Vec<u8>, first_id: u32, str_base: u32, split: bool) -> Result<Layer, BtfError> {
        let len = data.len();
        if u32::try_from(len).is_err() {
            return Err(malformed(format!("blob of {len} bytes is too large")));
        }
        let endian = match data.get(0..2) {
            Some(&[a, b]) if u16::from_le_bytes([a, b]) == BTF_MAGIC => Endian::Little,
            Some(&[a, b]) if u16::from_be_bytes([a, b]) == BTF_MAGIC => Endian::Big,
            Some(&[a, b]) => {
                return Err(malformed(format!(
                    "bad magic {:#06x}, expected {BTF_MAGIC:#06x}",
                    u16::from_le_bytes([a, b])
                )))
            }
            _ => {
                return Err(malformed(format!(
                    "{len} bytes is too short for a BTF header"
                )))
            }
        };
        if len < HEADER_MIN_LEN {
            return Err(malformed(format!(
                "{len} bytes is too short for a BTF header"
            )));
        }
        let version = data.get(2).copied().unwrap_or(0);
        if version != 1 {
            return Err(malformed(format!("unsupported BTF version {version}")));
        }
        let word = |off: usize| {
            read_u32(&data, off, endian)
                .map(|v| v as usize)
                .ok_or_else(|| malformed("truncated header"))
        };
        let hdr_len = word(4)?;
        if hdr_len < HEADER_MIN_LEN || hdr_len > len {
            return Err(malformed(format!(
                "header length {hdr_len} is outside 24..={len}"
            )));
        }
        let section = |what: &str, off: usize, size: usize| -> Result<Range<usize>, BtfError> {
            let start = hdr_len.checked_add(off);
            let end = start.and_then(|s| s.checked_add(size));
            match (start, end) {
                (Some(start), Some(end)) if end <= len => Ok(start..end),
                _ => Err(malformed(format!(
                    "{what} section (offset {off}, length {size}) extends past the end of the \
                     {len}-byte blob"
                ))),
            }
        };
        let types_range = section("type", word(8)?, word(12)?)?;
        let strings = section("string", word(16)?, word(20)?)?;

        let str_bytes = data.get(strings.clone()).unwrap_or_default();
        if !split && str_bytes.first() != Some(&0) {
            return Err(malformed(
                "string section does not start with the empty string",
            ));
        }
        if str_bytes.last().is_some_and(|&b| b != 0) {
            return Err(malformed("string section is not NUL terminated"));
        }
        if str_base.checked_add(str_bytes.len() as u32).is_none() {
            return Err(malformed("string offsets overflow u32"));
        }

        let mut types = Vec::new();
        let mut pos = types_range.start;
        while pos < types_range.end {
            let id = u64::from(first_id) + types.len() as u64;
            let truncated = || malformed(format!("type id {id} is truncated"));
            if types_range.end - pos < TYPE_RECORD_LEN {
                return Err(truncated());
            }
            let field = |i: usize| read_u32(&data, pos + 4 * i, endian).ok_or_else(truncated);
            let raw = RawType {
                name_off: field(0)?,
                info: field(1)?,
                size_or_type: field(2)?,
                extra: (pos + TYPE_RECORD_LEN) as u32,
            };
            let extra_len = raw.extra_len().ok_or_else(|| {
                malformed(format!("type id {id} has unknown kind {}", raw.kind()))
            })?;
            let next = pos + TYPE_RECORD_LEN + extra_len;
            if next > types_range.end {
                return Err(truncated());
            }
            if id >= u64::from(u32::MAX) {
                return Err(malformed("too many types"));
            }
            types.push(raw);
            pos = next;
        }
        Ok(Layer {
            data,
            endian,
            strings,
            types,
            first_id,
            str_base,
        })
    }

    fn str_len(&self) -> u32 {
        (self.strings.end - self.strings.start) as u32
    }

    /// `index`-th u32 of the data following `raw`.
    fn extra_word(&self, raw: &RawType, index: usize) -> Option<u32> {
        let off = (raw.extra as usize).checked_add(index.checked_mul(4)?)?;
        read_u32(&self.data, off, self.endian)
    }
}

/// A type record together with its id and the layer holding it.
#[derive(Clone, Copy)]
struct Ty<'a> {
    id: u32,
    layer: &'a Layer,
    raw: RawType,
}

impl Ty<'_> {
    fn kind(&self) -> u32 {
        self.raw.kind()
    }
    fn is_composite(&self) -> bool {
        matches!(self.kind(), kind::STRUCT | kind::UNION)
    }
    fn word(&self, index: usize) -> Result<u32, BtfError> {
        self.layer
            .extra_word(&self.raw, index)
            .ok_or_else(|| malformed(format!("type id {} is truncated", self.id)))
    }
    /// The `i`-th member of a STRUCT or UNION.
    fn member(&self, i: u32) -> Result<RawMember, BtfError> {
        let base = i as usize * 3;
        let name_off = self.word(base)?;
        let type_id = self.word(base + 1)?;
        let offset = self.word(base + 2)?;
        let (bit_offset, bitfield_size) = if self.raw.kind_flag() {
            (offset & 0x00ff_ffff, offset >> 24)
        } else {
            (offset, 0)
        };
        Ok(RawMember {
            name_off,
            type_id,
            bit_offset,
            bitfield_size,
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct RawMember {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    /// Only meaningful when the parent's kind_flag is set; 0 = not a bitfield.
    bitfield_size: u32,
}

/// Parsed BTF: the kernel's (vmlinux) or a module's split BTF together with
/// the vmlinux BTF it builds on.
///
/// Cloning is cheap (the parsed blobs are shared).
#[derive(Clone)]
pub struct Btf {
    /// Base first; each later layer is split BTF on top of the previous ones.
    layers: Vec<Arc<Layer>>,
    /// Pointer size in bytes, from the `long` INT type when present.
    ptr_size: u32,
}

impl fmt::Debug for Btf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Btf")
            .field("layers", &self.layers.len())
            .field("last_type_id", &self.last_type_id())
            .field("ptr_size", &self.ptr_size)
            .finish()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, BtfError> {
    std::fs::read(path).map_err(|source| BtfError::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl Btf {
    /// The running kernel's BTF, parsed once per process (about 5 MiB of types: every command
    /// needs some of it, and parsing it again for each use showed in start-up time and peak
    /// memory).
    pub fn vmlinux() -> Result<&'static Btf, String> {
        static VMLINUX: std::sync::OnceLock<Result<Btf, String>> = std::sync::OnceLock::new();
        VMLINUX
            .get_or_init(|| Btf::from_sys_vmlinux().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| e.clone())
    }

    /// Reads the running kernel's BTF from `/sys/kernel/btf/vmlinux`.
    pub fn from_sys_vmlinux() -> Result<Btf, BtfError> {
        Btf::from_file(Path::new(SYS_BTF_DIR).join("vmlinux"))
    }

    /// Reads a standalone (base) BTF file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Btf, BtfError> {
        Btf::from_layer(Layer::parse(read_file(path.as_ref())?, 1, 0, false)?)
    }

    /// Reads a module's split BTF from `/sys/kernel/btf/<name>` on top of
    /// `base` (the vmlinux BTF).
    pub fn module(name: &str, base: &Btf) -> Result<Btf, BtfError> {
        if name.is_empty() || name.starts_with('.') || name.contains('/') || name.contains('\0') {
            return Err(BtfError::InvalidModuleName(name.to_string()));
        }
        let data = read_file(&Path::new(SYS_BTF_DIR).join(name))?;
        Btf::split_owned(data, base)
    }

    /// Parses a standalone (base) BTF blob.
    pub fn parse(bytes: &[u8]) -> Result<Btf, BtfError> {
        Btf::from_layer(Layer::parse(bytes.to_vec(), 1, 0, false)?)
    }

    /// Parses split BTF (e.g. a module's) on top of `base`: its type ids
    /// start after `base`'s last id and its string offsets after the end of
    /// `base`'s strings. The result resolves names and types of both.
    pub fn parse_split(bytes: &[u8], base: &Btf) -> Result<Btf, BtfError> {
        Btf::split_owned(bytes.to_vec(), base)
    }

    fn split_owned(data: Vec<u8>, base: &Btf) -> Result<Btf, BtfError> {
        let first_id = base
            .last_type_id()
            .checked_add(1)
            .ok_or_else(|| malformed("too many types"))?;
        let str_base = base
            .layers
            .last()
            .and_then(|l| l.str_base.checked_add(l.str_len()))
            .ok_or_else(|| malformed("string offsets overflow u32"))?;
        let layer = Layer::parse(data, first_id, str_base, true)?;
        let mut layers = base.layers.clone();
        layers.push(Arc::new(layer));
        Ok(Btf {
            layers,
            ptr_size: base.ptr_size,
        })
    }

    fn from_layer(layer: Layer) -> Result<Btf, BtfError> {
        let mut btf = Btf {
            layers: vec![Arc::new(layer)],
            ptr_size: std::mem::size_of::<usize>() as u32,
        };
        // BTF has no explicit pointer size; like libbpf, take it from `long`.
        let long = btf
            .types()
            .filter(|t| t.kind() == kind::INT)
            .find(|t| {
                matches!(
                    btf.name_bytes(t.raw.name_off),
                    Some(b"long int" | b"long unsigned int" | b"long" | b"unsigned long")
                )
            })
            .map(|t| t.raw.size_or_type);
        if let Some(size @ (4 | 8)) = long {
            btf.ptr_size = size;
        }
        Ok(btf)
    }

    /// The highest type id (the number of types, including the base's).
    pub fn last_type_id(&self) -> u32 {
        self.layers
            .last()
            .map_or(0, |l| l.first_id + l.types.len() as u32 - 1)
    }

    /// Byte offset of a member of struct (or union, or typedef of either)
    /// `struct_name`. `path` is a member name or a dotted path through
    /// nested structs (`"ns.inum"`); members of anonymous structs and unions
    /// are found as if they were direct members, as in C. Typedefs and
    /// const/volatile qualifiers are followed when descending, pointers are
    /// not. Bitfields are refused unless they start and end on byte
    /// boundaries.
    pub fn member_offset(&self, struct_name: &str, path: &str) -> Result<u32, BtfError> {
        let (info, _) = self.byte_member(struct_name, path)?;
        Ok(info.bit_offset / 8)
    }

    /// Byte size of a member's type (following typedefs; arrays count all
    /// their elements), or of a byte aligned bitfield.
    pub fn member_size(&self, struct_name: &str, path: &str) -> Result<u32, BtfError> {
        let (info, type_id) = self.byte_member(struct_name, path)?;
        match info.bitfield_size {
            Some(bits) => Ok(bits / 8),
            None => self.type_size(type_id),
        }
    }

    /// Location of a member, as for [`Btf::member_offset`], but reporting
    /// bitfields instead of refusing them.
    pub fn member(&self, struct_name: &str, path: &str) -> Result<MemberInfo, BtfError> {
        self.resolve_member(struct_name, path).map(|(info, _)| info)
    }

    /// Size in bytes of the struct or union (or typedef of one) `name`.
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        let ty = self
            .composites_named(name)?
            .into_iter()
            .next()
            .ok_or_else(|| BtfError::StructNotFound {
                struct_name: name.to_string(),
                member: None,
            })?;
        Ok(ty.raw.size_or_type)
    }

    /// The constants of the ENUM or ENUM64 type `name`, in declaration
    /// order. Values are reported as `i64`; an unsigned 64-bit value above
    /// `i64::MAX` is reinterpreted (two's complement), 32-bit enums are
    /// sign-extended only when BTF marks them signed (`kind_flag`).
    pub fn enum_values(&self, name: &str) -> Result<Vec<(String, i64)>, BtfError> {
        let mut candidates = self
            .types()
            .filter(|t| matches!(t.kind(), kind::ENUM | kind::ENUM64))
            .filter(|t| self.name_is(t.raw.name_off, name));
        let first = candidates
            .next()
            .ok_or_else(|| BtfError::EnumNotFound(name.to_string()))?;
        // An empty enum is a forward declaration; prefer a full definition.
        let ty = if first.raw.vlen() == 0 {
            candidates.find(|t| t.raw.vlen() > 0).unwrap_or(first)
        } else {
            first
        };
        self.enum_values_of(&ty)
    }

    /// Whether a function (BTF_KIND_FUNC) named exactly `name` exists.
    pub fn has_func(&self, name: &str) -> bool {
        self.has_kind_named(kind::FUNC, name)
    }

    /// The type id of the function (BTF_KIND_FUNC) named exactly `name`, absolute: for a
    /// module's split BTF it counts on from vmlinux's last id, as the kernel numbers it. The
    /// top layer is searched first, so a module's own function wins over a vmlinux function
    /// of the same name (static functions are not unique). This is the `attach_btf_id` an
    /// fentry program on that function is loaded with.
    pub fn func_id(&self, name: &str) -> Option<u32> {
        self.id_of(kind::FUNC, name)
    }

    /// The type id of the typedef named `name`, top layer first (as [`Btf::func_id`]). A
    /// tp_btf program's `attach_btf_id` is the id of `btf_trace_<event>`.
    pub fn typedef_id(&self, name: &str) -> Option<u32> {
        self.id_of(kind::TYPEDEF, name)
    }

    /// Whether a typedef named `name` exists. The kernel declares a typedef
    /// `btf_trace_<event>` for every tracepoint usable as `tp_btf`.
    pub fn has_typedef(&self, name: &str) -> bool {
        self.has_kind_named(kind::TYPEDEF, name)
    }

    /// Names of functions (BTF_KIND_FUNC) that are `base_name` itself or a
    /// compiler-made variant of it (`base_name.constprop.0`,
    /// `base_name.isra.0`, `base_name.cold`, ...): a `.` cannot occur in a
    /// C identifier, so anything after one is a compiler suffix. The exact
    /// name comes first, then the variants sorted.
    pub fn func_names_matching(&self, base_name: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .types()
            .filter(|t| t.kind() == kind::FUNC)
            .filter_map(|t| self.name_bytes(t.raw.name_off))
            .filter(|n| is_name_or_variant(n, base_name.as_bytes()))
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        names.sort_by(|a, b| (a != base_name).cmp(&(b != base_name)).then(a.cmp(b)));
        names.dedup();
        names
    }

    /// The parameter types of function `name` (BTF_KIND_FUNC → FUNC_PROTO), rendered short:
    /// `sk_buff*` for `struct sk_buff *`, `sk_buff**`, `int`; qualifiers and tags dropped,
    /// typedefs by name. vtrace checks the argument positions its function hooks read against
    /// this, so a kernel whose signature moved is caught, not misread.
    pub fn func_param_types(&self, name: &str) -> Result<Vec<String>, BtfError> {
        let proto = self.func_proto(name)?;
        (0..proto.raw.vlen() as usize)
            .map(|i| Ok(self.short_type_name(proto.word(i * 2 + 1)?, 0)))
            .collect()
    }

    /// The return type of function `name`, rendered as [`Btf::func_param_types`] renders
    /// parameters (`void`, `int`, `bool`, `ssize_t`, ...). vtrace's exit programs read the
    /// return register as the type they were written for: checked against this first.
    pub fn func_return_type(&self, name: &str) -> Result<String, BtfError> {
        let proto = self.func_proto(name)?;
        Ok(self.short_type_name(proto.raw.size_or_type, 0))
    }

    /// The FUNC_PROTO of function `name`; a module's own function first, as fentry attaches
    /// to it (see `func_id`).
    fn func_proto(&self, name: &str) -> Result<Ty<'_>, BtfError> {
        let func = self
            .func_id(name)
            .and_then(|id| self.ty(id))
            .ok_or_else(|| BtfError::StructNotFound {
                struct_name: name.to_string(),
                member: None,
            })?;
        self.ty(func.raw.size_or_type)
            .filter(|t| t.kind() == kind::FUNC_PROTO)
            .ok_or_else(|| malformed(format!("function {name} has no prototype")))
    }

    fn short_type_name(&self, id: u32, depth: u32) -> String {
        if id == 0 {
            return "void".into();
        }
        let Some(t) = self.ty(id) else {
            return "?".into();
        };
        if depth > 16 {
            return "?".into();
        }
        match t.kind() {
            kind::PTR => format!("{}*", self.short_type_name(t.raw.size_or_type, depth + 1)),
            kind::CONST | kind::VOLATILE | kind::RESTRICT | kind::TYPE_TAG => {
                self.short_type_name(t.raw.size_or_type, depth + 1)
            }
            _ => self.type_name(&t).into_owned(),
        }
    }

    // ---- internals ----

    /// Decodes the constants of an ENUM (`struct btf_enum { name_off, val }`)
    /// or ENUM64 (`struct btf_enum64 { name_off, val_lo32, val_hi32 }`).
    fn enum_values_of(&self, ty: &Ty<'_>) -> Result<Vec<(String, i64)>, BtfError> {
        let is64 = ty.kind() == kind::ENUM64;
        let stride = if is64 { 3 } else { 2 };
        let mut values = Vec::with_capacity(ty.raw.vlen() as usize);
        for i in 0..ty.raw.vlen() as usize {
            let name_off = ty.word(i * stride)?;
            let lo = ty.word(i * stride + 1)?;
            let value = if is64 {
                let hi = ty.word(i * stride + 2)?;
                ((u64::from(hi) << 32) | u64::from(lo)) as i64
            } else if ty.raw.kind_flag() {
                i64::from(lo as i32)
            } else {
                i64::from(lo)
            };
            let name = self.name_bytes(name_off).ok_or_else(|| {
                malformed(format!(
                    "bad string offset {name_off} in enum type id {}",
                    ty.id
                ))
            })?;
            values.push((String::from_utf8_lossy(name).into_owned(), value));
        }
        Ok(values)
    }

    fn types(&self) -> impl Iterator<Item = Ty<'_>> + '_ {
        self.layers.iter().flat_map(|layer| {
            let layer: &Layer = layer;
            layer.types.iter().enumerate().map(move |(i, raw)| Ty {
                id: layer.first_id + i as u32,
                layer,
                raw: *raw,
            })
        })
    }

    /// The type with id `id`; `None` for void (0) and unknown ids.
    fn ty(&self, id: u32) -> Option<Ty<'_>> {
        let layer = self.layers.iter().rev().find(|l| l.first_id <= id)?;
        let raw = *layer.types.get((id - layer.first_id) as usize)?;
        Some(Ty { id, layer, raw })
    }

    /// The string at `off` (without its NUL), in whichever layer holds it.
    fn name_bytes(&self, off: u32) -> Option<&[u8]> {
        let layer = self.layers.iter().rev().find(|l| l.str_base <= off)?;
        let strings = layer.data.get(layer.strings.clone())?;
        let rest = strings.get((off - layer.str_base) as usize..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        rest.get(..end)
    }

    fn name_is(&self, off: u32, name: &str) -> bool {
        self.name_bytes(off) == Some(name.as_bytes())
    }

    fn type_name(&self, ty: &Ty<'_>) -> Cow<'_, str> {
        match self.name_bytes(ty.raw.name_off) {
            Some(n) if !n.is_empty() => String::from_utf8_lossy(n),
            _ => Cow::Owned(format!("(anon {} #{})", kind_name(ty.kind()), ty.id)),
        }
    }

    fn id_of(&self, k: u32, name: &str) -> Option<u32> {
        self.layers.iter().rev().find_map(|layer| {
            layer.types.iter().enumerate().find_map(|(i, raw)| {
                (raw.kind() == k && self.name_is(raw.name_off, name))
                    .then(|| layer.first_id + i as u32)
            })
        })
    }

    fn has_kind_named(&self, k: u32, name: &str) -> bool {
        self.types()
            .any(|t| t.kind() == k && self.name_is(t.raw.name_off, name))
    }

    /// Follows typedefs and qualifiers (const, volatile, restrict, type tags)
    /// to the underlying type. `Ok(None)` is void.
    fn skip_modifiers(&self, mut id: u32) -> Result<Option<Ty<'_>>, BtfError> {
        for _ in 0..MAX_DEPTH {
            if id == 0 {
                return Ok(None);
            }
            let ty = self
                .ty(id)
                .ok_or_else(|| malformed(format!("reference to unknown type id {id}")))?;
            match ty.kind() {
                kind::TYPEDEF | kind::CONST | kind::VOLATILE | kind::RESTRICT | kind::TYPE_TAG => {
                    id = ty.raw.size_or_type
                }
                _ => return Ok(Some(ty)),
            }
        }
        Err(malformed(format!(
            "type chain from id {id} is too long or cyclic"
        )))
    }

    /// Structs and unions named `name`, then typedefs named `name` that
    /// resolve to a struct or union.
    fn composites_named(&self, name: &str) -> Result<Vec<Ty<'_>>, BtfError> {
        let mut found: Vec<Ty<'_>> = self
            .types()
            .filter(|t| t.is_composite() && self.name_is(t.raw.name_off, name))
            .collect();
        let typedefs: Vec<Ty<'_>> = self
            .types()
            .filter(|t| t.kind() == kind::TYPEDEF && self.name_is(t.raw.name_off, name))
            .collect();
        for td in typedefs {
            if let Some(ty) = self.skip_modifiers(td.raw.size_or_type)? {
                if ty.is_composite() {
                    found.push(ty);
                }
            }
        }
        Ok(found)
    }

    /// Size in bytes of type `id`.
    fn type_size(&self, id: u32) -> Result<u32, BtfError> {
        let mut id = id;
        let mut count: u32 = 1;
        for _ in 0..MAX_DEPTH {
            let Some(ty) = self.skip_modifiers(id)? else {
                return Err(BtfError::Unsized {
                    name: "void".into(),
                    kind: "void",
                });
            };
            let size = match ty.kind() {
                kind::INT
                | kind::STRUCT
                | kind::UNION
                | kind::ENUM
                | kind::ENUM64
                | kind::FLOAT
                | kind::DATASEC => ty.raw.size_or_type,
                kind::PTR => self.ptr_size,
                kind::VAR => {
                    id = ty.raw.size_or_type;
                    continue;
                }
                kind::ARRAY => {
                    // struct btf_array { type, index_type, nelems }
                    let elem = ty.word(0)?;
                    let nelems = ty.word(2)?;
                    count = count.checked_mul(nelems).ok_or_else(|| {
                        malformed(format!("array type id {} is too large", ty.id))
                    })?;
                    id = elem;
                    continue;
                }
                k => {
                    return Err(BtfError::Unsized {
                        name: self.type_name(&ty).into_owned(),
                        kind: kind_name(k),
                    })
                }
            };
            return size
                .checked_mul(count)
                .ok_or_else(|| malformed(format!("size of type id {} overflows", ty.id)));
        }
        Err(malformed(format!(
            "type chain from id {id} is too long or cyclic"
        )))
    }

    /// Finds member `name` in composite `ty`, looking through anonymous
    /// struct/union members. Returns the bit offset relative to `ty` and
    /// the member record.
    fn find_member(
        &self,
        ty: &Ty<'_>,
        name: &str,
        depth: u32,
    ) -> Result<Option<(u32, RawMember)>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(malformed(format!(
                "anonymous members nested too deeply (cyclic?) below type id {}",
                ty.id
            )));
        }
        for i in 0..ty.raw.vlen() {
            let m = ty.member(i)?;
            let member_name = self.name_bytes(m.name_off).unwrap_or_default();
            if member_name == name.as_bytes() {
                return Ok(Some((m.bit_offset, m)));
            }
            if member_name.is_empty() {
                if let Some(inner) = self.skip_modifiers(m.type_id)? {
                    if inner.is_composite() {
                        if let Some((off, found)) = self.find_member(&inner, name, depth + 1)? {
                            let total = m.bit_offset.checked_add(off).ok_or_else(|| {
                                malformed(format!("member offset overflow in type id {}", ty.id))
                            })?;
                            return Ok(Some((total, found)));
                        }
                    }
                }
            }
        }
        Ok(None)
    }

    /// Resolves `path` in each struct named `struct_name` until one works.
    /// Returns the location and the member's declared type id.
    fn resolve_member(&self, struct_name: &str, path: &str) -> Result<(MemberInfo, u32), BtfError> {
        if path.is_empty() || path.split('.').any(str::is_empty) {
            return Err(BtfError::InvalidPath(path.to_string()));
        }
        let candidates = self.composites_named(struct_name)?;
        let mut first_err = None;
        for ty in candidates {
            match self.resolve_in(ty, struct_name, path) {
                Ok(found) => return Ok(found),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| BtfError::StructNotFound {
            struct_name: struct_name.to_string(),
            member: Some(path.to_string()),
        }))
    }

    fn resolve_in(
        &self,
        outer: Ty<'_>,
        struct_name: &str,
        path: &str,
    ) -> Result<(MemberInfo, u32), BtfError> {
        let mut current = outer;
        let mut bit_offset: u32 = 0;
        let mut components = path.split('.').peekable();
        while let Some(component) = components.next() {
            let (off, m) = self.find_member(&current, component, 0)?.ok_or_else(|| {
                BtfError::MemberNotFound {
                    struct_name: struct_name.to_string(),
                    path: path.to_string(),
                    component: component.to_string(),
                }
            })?;
            bit_offset = bit_offset
                .checked_add(off)
                .ok_or_else(|| malformed(format!("offset of `{path}` overflows")))?;
            let target = self.skip_modifiers(m.type_id)?;
            if components.peek().is_none() {
                let mut bitfield_size = (m.bitfield_size != 0).then_some(m.bitfield_size);
                // Without kind_flag a bitfield is an INT narrower than its
                // size; its own bit offset adds to the member's.
                if !current.raw.kind_flag() {
                    if let Some(int) = target.filter(|t| t.kind() == kind::INT) {
                        let enc = int.word(0)?;
                        let (int_off, bits) = ((enc >> 16) & 0xff, enc & 0xff);
                        if int_off != 0 || u64::from(bits) != u64::from(int.raw.size_or_type) * 8 {
                            bitfield_size = Some(bits);
                            bit_offset = bit_offset.checked_add(int_off).ok_or_else(|| {
                                malformed(format!("offset of `{path}` overflows"))
                            })?;
                        }
                    }
                }
                return Ok((
                    MemberInfo {
                        bit_offset,
                        bitfield_size,
                    },
                    m.type_id,
                ));
            }
            match target {
                Some(t) if t.is_composite() => current = t,
                other => {
                    return Err(BtfError::NotComposite {
                        struct_name: struct_name.to_string(),
                        path: path.to_string(),
                        component: component.to_string(),
                        kind: other.map_or("void", |t| kind_name(t.kind())),
                    })
                }
            }
        }
        // `path` has at least one component, so the loop returned.
        Err(BtfError::InvalidPath(path.to_string()))
    }

    /// Like `resolve_member`, but refuses members without a byte offset.
    fn byte_member(&self, struct_name: &str, path: &str) -> Result<(MemberInfo, u32), BtfError> {
        let (info, type_id) = self.resolve_member(struct_name, path)?;
        let bits = info.bitfield_size.unwrap_or(8);
        if info.bit_offset % 8 != 0 || bits % 8 != 0 {
            return Err(BtfError::UnalignedBitfield {
                struct_name: struct_name.to_string(),
                path: path.to_string(),
                bit_offset: info.bit_offset,
                bit_size: bits,
            });
        }
        Ok((info, type_id))
    }
}

/// `name` is `base` or `base.<compiler suffix>`.
fn is_name_or_variant(name: &[u8], base: &[u8]) -> bool {
    match name.strip_prefix(base) {
        Some(rest) => rest.is_empty() || (rest.len() > 1 && rest.first() == Some(&b'.')),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::OnceLock;

    // ---- a tiny BTF writer for synthetic blobs ----

    struct Builder {
        types: Vec<u32>,
        strings: Vec<u8>,
        next_id: u32,
        str_base: u32,
        big_endian: bool,
    }

    impl Builder {
        fn new() -> Builder {
            Builder {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
                str_base: 0,
                big_endian: false,
            }
        }

        /// Split BTF on top of `base`.
        fn split(base: &Btf) -> Builder {
            let last = base.layers.last().unwrap();
            Builder {
                types: Vec::new(),
                strings: Vec::new(),
                next_id: base.last_type_id() + 1,
                str_base: last.str_base + last.str_len(),
                big_endian: false,
            }
        }

        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.str_base + self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }

        fn add(
            &mut self,
            name: &str,
            k: u32,
            vlen: u32,
            kflag: bool,
            st: u32,
            extra: &[u32],
        ) -> u32 {
            let name_off = self.s(name);
            let info = (u32::from(kflag) << 31) | (k << 24) | vlen;
            self.types.extend([name_off, info, st]);
            self.types.extend_from_slice(extra);
            self.next_id += 1;
            self.next_id - 1
        }

        fn int(&mut self, name: &str, size: u32, bits: u32) -> u32 {
            self.add(name, kind::INT, 0, false, size, &[bits])
        }

        fn ptr(&mut self, target: u32) -> u32 {
            self.add("", kind::PTR, 0, false, target, &[])
        }

        fn modifier(&mut self, k: u32, name: &str, target: u32) -> u32 {
            self.add(name, k, 0, false, target, &[])
        }

        /// `members`: (name, type, bit offset, bitfield size); bitfield
        /// sizes are encoded only when `kflag`.
        fn composite(
            &mut self,
            k: u32,
            name: &str,
            size: u32,
            kflag: bool,
            members: &[(&str, u32, u32, u32)],
        ) -> u32 {
            let mut extra = Vec::new();
            for &(n, ty, off, bits) in members {
                let off = if kflag { (bits << 24) | off } else { off };
                extra.extend([self.s(n), ty, off]);
            }
            self.add(name, k, members.len() as u32, kflag, size, &extra)
        }

        fn enum32(&mut self, name: &str, signed: bool, values: &[(&str, i32)]) -> u32 {
            let mut extra = Vec::new();
            for &(n, v) in values {
                extra.extend([self.s(n), v as u32]);
            }
            self.add(name, kind::ENUM, values.len() as u32, signed, 4, &extra)
        }

        fn enum64(&mut self, name: &str, values: &[(&str, u64)]) -> u32 {
            let mut extra = Vec::new();
            for &(n, v) in values {
                extra.extend([self.s(n), v as u32, (v >> 32) as u32]);
            }
            self.add(name, kind::ENUM64, values.len() as u32, false, 8, &extra)
        }

        fn finish(&self) -> Vec<u8> {
            let w = |v: u32| {
                if self.big_endian {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                }
            };
            let type_len = self.types.len() as u32 * 4;
            let mut out = Vec::new();
            let magic = if self.big_endian {
                BTF_MAGIC.to_be_bytes()
            } else {
                BTF_MAGIC.to_le_bytes()
            };
            out.extend(magic);
            out.extend([1, 0]);
            for v in [24, 0, type_len, type_len, self.strings.len() as u32] {
                out.extend(w(v));
            }
            for &v in &self.types {
                out.extend(w(v));
            }
            out.extend(&self.strings);
            out
        }
    }

    /// A blob with every kind, an anonymous union inside a struct, typedef
    /// and qualifier chains, both bitfield encodings and enums.
    fn sample(big_endian: bool) -> Vec<u8> {
        let mut b = Builder::new();
        b.big_endian = big_endian;
        let int = b.int("int", 4, (1 << 24) | 32); // 1
        let uchar = b.int("unsigned char", 1, 8); // 2
        let long = b.int("long int", 8, (1 << 24) | 64); // 3
        let pint = b.ptr(int); // 4
        let arr = b.add("", kind::ARRAY, 0, false, 0, &[uchar, int, 16]); // 5
        let inner = b.composite(
            kind::STRUCT,
            "inner",
            8,
            false,
            &[("a", int, 0, 0), ("b", int, 32, 0)],
        ); // 6
        let anon_union = b.composite(
            kind::UNION,
            "",
            8,
            false,
            &[("u_ptr", pint, 0, 0), ("u_inner", inner, 0, 0)],
        ); // 7
        let cinner = b.modifier(kind::CONST, "", inner); // 8
        let vinner = b.modifier(kind::VOLATILE, "", cinner); // 9
        let inner_t = b.modifier(kind::TYPEDEF, "inner_t", vinner); // 10
        let anon_struct = b.composite(
            kind::STRUCT,
            "",
            16,
            false,
            &[("x", long, 0, 0), ("", anon_union, 64, 0)],
        ); // 11
        b.composite(
            kind::STRUCT,
            "outer",
            56,
            false,
            &[
                ("first", int, 0, 0),
                ("", anon_struct, 64, 0),
                ("name", arr, 192, 0),
                ("tail", inner_t, 320, 0),
                ("p", pint, 384, 0),
            ],
        ); // 12
        b.composite(
            kind::STRUCT,
            "bits",
            8,
            true,
            &[
                ("x", int, 0, 3),
                ("y", int, 3, 5),
                ("z", uchar, 8, 8),
                ("h", int, 16, 16),
                ("w", int, 32, 0),
            ],
        ); // 13
        let bf3 = b.int("int", 4, (1 << 24) | 3); // 14: old-style bitfield
        b.composite(
            kind::STRUCT,
            "oldbits",
            4,
            false,
            &[("q", bf3, 0, 0), ("r", uchar, 8, 0)],
        ); // 15
        b.enum32("color", false, &[("RED", 0), ("GREEN", 1), ("BLUE", 7)]); // 16
        b.enum32("sgn", true, &[("NEG", -5), ("POS", 5)]); // 17
        b.enum64("big", &[("SMALL", 1), ("HUGE", 1 << 40), ("MAX", u64::MAX)]); // 18
        b.add("fwd_thing", kind::FWD, 0, false, 0, &[]); // 19
        b.modifier(kind::RESTRICT, "", pint); // 20
        let proto = b.add("", kind::FUNC_PROTO, 2, false, int, &[0, int, 0, pint]); // 21
        b.add("do_thing", kind::FUNC, 0, false, proto, &[]); // 22
        b.add("do_thing.isra.0", kind::FUNC, 0, false, proto, &[]); // 23
        b.add("do_thing_more", kind::FUNC, 0, false, proto, &[]); // 24
        let var = b.add("some_var", kind::VAR, 0, false, int, &[1]); // 25
        b.add(".data", kind::DATASEC, 1, false, 4, &[var, 0, 4]); // 26
        b.add("double", kind::FLOAT, 0, false, 8, &[]); // 27
        b.add("tag", kind::DECL_TAG, 0, false, var, &[u32::MAX]); // 28
        b.modifier(kind::TYPE_TAG, "user", int); // 29
        b.modifier(kind::TYPEDEF, "outer_t", 12); // 30
        b.composite(kind::STRUCT, "with_arr", 0, false, &[("grid", 32, 0, 0)]); // 31
        b.add("", kind::ARRAY, 0, false, 0, &[arr, int, 3]); // 32: uchar[3][16]
        b.composite(kind::STRUCT, "last", 4, false, &[("v", int, 0, 0)]); // 33
        b.finish()
    }

    #[test]
    fn synthetic_layout() {
        for big_endian in [false, true] {
            let btf = Btf::parse(&sample(big_endian)).unwrap();
            assert_eq!(btf.last_type_id(), 33);
            assert_eq!(btf.ptr_size, 8);
            // Direct, inside anon struct, inside anon union inside anon struct.
            assert_eq!(btf.member_offset("outer", "first").unwrap(), 0);
            assert_eq!(btf.member_offset("outer", "x").unwrap(), 8);
            assert_eq!(btf.member_offset("outer", "u_ptr").unwrap(), 16);
            assert_eq!(btf.member_offset("outer", "u_inner").unwrap(), 16);
            assert_eq!(btf.member_offset("outer", "u_inner.b").unwrap(), 20);
            assert_eq!(btf.member_offset("outer", "name").unwrap(), 24);
            // Through typedef -> volatile -> const -> struct.
            assert_eq!(btf.member_offset("outer", "tail.b").unwrap(), 44);
            assert_eq!(btf.member_offset("outer_t", "tail.a").unwrap(), 40);
            assert_eq!(btf.member_offset("last", "v").unwrap(), 0);

            assert_eq!(btf.member_size("outer", "name").unwrap(), 16);
            assert_eq!(btf.member_size("outer", "u_ptr").unwrap(), 8);
            assert_eq!(btf.member_size("outer", "tail").unwrap(), 8);
            assert_eq!(btf.member_size("outer", "x").unwrap(), 8);
            assert_eq!(btf.member_size("with_arr", "grid").unwrap(), 48);
            assert_eq!(btf.struct_size("outer").unwrap(), 56);
            assert_eq!(btf.struct_size("outer_t").unwrap(), 56);
        }
    }

    #[test]
    fn synthetic_bitfields() {
        let btf = Btf::parse(&sample(false)).unwrap();
        let err = btf.member_offset("bits", "y").unwrap_err();
        assert!(matches!(
            err,
            BtfError::UnalignedBitfield {
                bit_offset: 3,
                bit_size: 5,
                ..
            }
        ));
        assert!(err.to_string().contains("`y`") && err.to_string().contains("`bits`"));
        assert!(btf.member_offset("bits", "x").is_err());
        assert_eq!(
            btf.member("bits", "y").unwrap(),
            MemberInfo {
                bit_offset: 3,
                bitfield_size: Some(5)
            }
        );
        // Byte aligned bitfields have a byte offset and size.
        assert_eq!(btf.member_offset("bits", "z").unwrap(), 1);
        assert_eq!(btf.member_size("bits", "z").unwrap(), 1);
        assert_eq!(btf.member_offset("bits", "h").unwrap(), 2);
        assert_eq!(btf.member_size("bits", "h").unwrap(), 2);
        assert_eq!(btf.member_offset("bits", "w").unwrap(), 4);
        assert_eq!(btf.member_size("bits", "w").unwrap(), 4);
        // Encoding without kind_flag: the INT's width says "bitfield".
        assert_eq!(btf.member("oldbits", "q").unwrap().bitfield_size, Some(3));
        assert!(matches!(
            btf.member_offset("oldbits", "q"),
            Err(BtfError::UnalignedBitfield { .. })
        ));
        assert_eq!(btf.member_offset("oldbits", "r").unwrap(), 1);
    }

    #[test]
    fn synthetic_errors_name_struct_and_member() {
        let btf = Btf::parse(&sample(false)).unwrap();
        let err = btf.member_offset("nosuch", "a").unwrap_err();
        assert!(matches!(err, BtfError::StructNotFound { .. }));
        assert_eq!(
            err.to_string(),
            "struct or union `nosuch` not found in BTF (looking up member `a`)"
        );
        let err = btf.member_offset("outer", "tail.nope").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("outer") && msg.contains("tail.nope") && msg.contains("`nope`"));
        // Pointers are not descended through.
        let err = btf.member_offset("outer", "p.a").unwrap_err();
        assert!(matches!(err, BtfError::NotComposite { kind: "PTR", .. }));
        assert!(matches!(
            btf.member_offset("outer", "tail..a"),
            Err(BtfError::InvalidPath(_))
        ));
        assert!(matches!(
            btf.member_offset("outer", ""),
            Err(BtfError::InvalidPath(_))
        ));
        // Anonymous members cannot be named by the empty string.
        assert!(btf.member_offset("outer", "a").is_err());
        assert!(matches!(
            btf.enum_values("nosuch"),
            Err(BtfError::EnumNotFound(_))
        ));
        assert!(matches!(
            btf.struct_size("color"),
            Err(BtfError::StructNotFound { member: None, .. })
        ));
    }

    #[test]
    fn synthetic_enums_funcs_typedefs() {
        let btf = Btf::parse(&sample(false)).unwrap();
        assert_eq!(
            btf.enum_values("color").unwrap(),
            vec![("RED".into(), 0), ("GREEN".into(), 1), ("BLUE".into(), 7)]
        );
        assert_eq!(
            btf.enum_values("sgn").unwrap(),
            vec![("NEG".into(), -5), ("POS".into(), 5)]
        );
        assert_eq!(
            btf.enum_values("big").unwrap(),
            vec![
                ("SMALL".into(), 1),
                ("HUGE".into(), 1 << 40),
                ("MAX".into(), -1)
            ]
        );
        assert!(btf.has_func("do_thing"));
        assert!(!btf.has_func("do_thin"));
        assert!(!btf.has_func("some_var"));
        assert_eq!(
            btf.func_names_matching("do_thing"),
            vec!["do_thing".to_string(), "do_thing.isra.0".to_string()]
        );
        assert!(btf.func_names_matching("do").is_empty());
        assert!(btf.has_typedef("inner_t"));
        assert!(!btf.has_typedef("inner"));
    }

    #[test]
    fn synthetic_split() {
        let base = Btf::parse(&sample(false)).unwrap();
        let mut b = Builder::split(&base);
        let u16_t = b.int("u16", 2, 16); // 34
        assert_eq!(u16_t, 34);
        b.composite(
            kind::STRUCT,
            "mod_struct",
            16,
            false,
            // "hdr" of base type `inner` (6), an anonymous member of base
            // type `inner_t` (10, typedef of a struct), then a split type.
            &[("hdr", 6, 0, 0), ("", 10, 64, 0), ("port", u16_t, 96, 0)],
        ); // 35
           // A base name referenced from split BTF by its base offset.
        let int_name = base.types().next().unwrap().raw.name_off;
        b.types.extend([int_name, kind::TYPEDEF << 24, 1]); // 36: typedef "int"
        b.next_id += 1;
        b.add("mod_func", kind::FUNC, 0, false, 21, &[]); // 37
        let split = Btf::parse_split(&b.finish(), &base).unwrap();
        assert_eq!(split.last_type_id(), 37);
        assert_eq!(split.member_offset("mod_struct", "hdr.b").unwrap(), 4);
        assert_eq!(split.member_offset("mod_struct", "a").unwrap(), 8);
        assert_eq!(split.member_offset("mod_struct", "b").unwrap(), 12);
        assert_eq!(split.member_offset("mod_struct", "port").unwrap(), 12);
        assert_eq!(split.member_size("mod_struct", "port").unwrap(), 2);
        assert!(split.has_func("mod_func") && split.has_func("do_thing"));
        assert!(split.has_typedef("int"));
        assert!(!base.has_func("mod_func"));
        // Base queries still work through the split view.
        assert_eq!(split.member_offset("outer", "u_inner.b").unwrap(), 20);
        // A split blob is not valid as base BTF (its strings start mid-way).
        assert!(Btf::parse(&b.finish()).is_err());
    }

    /// `func_id` gives the absolute id an fentry program's `attach_btf_id` needs: in split BTF
    /// the module's ids count on from the base's last id, and the module's own function wins
    /// over a base function of the same name (module statics such as virtio-net's
    /// `start_xmit` are not unique kernel-wide).
    #[test]
    fn synthetic_split_func_ids() {
        let base = Btf::parse(&sample(false)).unwrap();
        let first = base.last_type_id() + 1;
        let mut b = Builder::split(&base);
        let proto = b.add("", kind::FUNC_PROTO, 1, false, 1, &[0, 4]); // first
        let mod_func = b.add("mod_func", kind::FUNC, 0, false, proto, &[]); // first + 1
        let shadow = b.add("do_thing", kind::FUNC, 0, false, proto, &[]); // first + 2
        b.add("btf_trace_mod_event", kind::TYPEDEF, 0, false, 4, &[]); // first + 3
        assert_eq!((proto, mod_func, shadow), (first, first + 1, first + 2));
        let split = Btf::parse_split(&b.finish(), &base).unwrap();
        assert_eq!(split.func_id("mod_func"), Some(first + 1));
        assert_eq!(
            split.func_id("do_thing"),
            Some(first + 2),
            "the module's own first"
        );
        assert_eq!(base.func_id("do_thing"), Some(22), "the base keeps its id");
        assert_eq!(
            split.func_id("do_thing_more"),
            Some(24),
            "base functions still found"
        );
        assert_eq!(split.func_id("do_thing.isra.0"), Some(23));
        assert_eq!(split.typedef_id("btf_trace_mod_event"), Some(first + 3));
        assert_eq!(split.typedef_id("inner_t"), Some(10));
        // Only FUNCs: a variable, a typedef and an absent name are not functions.
        assert_eq!(split.func_id("some_var"), None);
        assert_eq!(split.func_id("inner_t"), None);
        assert_eq!(split.func_id("vtrace_absent"), None);
        assert_eq!(base.func_id("mod_func"), None);
        // The parameter check reads the module's prototype: `int (int *)`.
        assert_eq!(split.func_param_types("mod_func").unwrap(), vec!["int*"]);
        assert_eq!(split.func_param_types("do_thing").unwrap(), vec!["int*"]);
        assert_eq!(
            base.func_param_types("do_thing").unwrap(),
            vec!["int", "int*"]
        );
    }

    /// On this kernel's BTF, the ids agree with aya's own BTF parser (the ids the kernel
    /// resolves `attach_btf_id` with).
    #[test]
    fn kernel_func_ids_match_ayas() {
        let Some(btf) = vmlinux() else { return };
        let aya_btf = aya::Btf::from_sys_fs().expect("aya parses the kernel's BTF");
        use aya_obj::btf::BtfKind;
        for f in [
            "netif_receive_skb",
            "br_handle_frame",
            "veth_xmit",
            "kfree_skb_reason",
        ] {
            assert_eq!(
                btf.func_id(f),
                aya_btf.id_by_type_name_kind(f, BtfKind::Func).ok(),
                "{f}"
            );
        }
        let t = "btf_trace_netif_receive_skb";
        assert_eq!(
            btf.typedef_id(t),
            aya_btf.id_by_type_name_kind(t, BtfKind::Typedef).ok()
        );
        assert!(btf.typedef_id(t).is_some());
    }

    #[test]
    fn corrupt_input_is_an_error() {
        let blob = sample(false);
        for len in 0..blob.len() {
            assert!(
                Btf::parse(&blob[..len]).is_err(),
                "prefix of {len} bytes parsed"
            );
        }
        let patched = |off: usize, v: u32| {
            let mut b = blob.clone();
            b[off..off + 4].copy_from_slice(&v.to_le_bytes());
            b
        };
        let mut bad_magic = blob.clone();
        bad_magic[0] = 0;
        assert!(Btf::parse(&bad_magic).is_err());
        let mut bad_version = blob.clone();
        bad_version[2] = 2;
        assert!(Btf::parse(&bad_version).is_err());
        assert!(Btf::parse(&patched(4, 8)).is_err()); // hdr_len < 24
        assert!(Btf::parse(&patched(4, u32::MAX)).is_err()); // hdr_len past end
        assert!(Btf::parse(&patched(8, u32::MAX)).is_err()); // type_off overflow
        assert!(Btf::parse(&patched(20, u32::MAX)).is_err()); // str_len
                                                              // Unknown kind in the first record.
        assert!(Btf::parse(&patched(24 + 4, 25 << 24)).is_err());
        // A struct claiming more members than the section holds.
        let mut b = Builder::new();
        b.add("s", kind::STRUCT, 1000, false, 4, &[0, 0, 0]);
        assert!(Btf::parse(&b.finish()).is_err());
        // Strings not NUL terminated.
        let mut b = Builder::new();
        b.int("int", 4, 32);
        let mut bytes = b.finish();
        let last = bytes.len() - 1;
        bytes[last] = b'x';
        assert!(Btf::parse(&bytes).is_err());
    }

    #[test]
    fn corrupt_input_never_panics() {
        let blob = sample(false);
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let mut b = blob.clone();
            for _ in 0..(next() % 4 + 1) {
                let pos = (next() as usize) % b.len();
                b[pos] = next() as u8;
            }
            if let Ok(btf) = Btf::parse(&b) {
                for (s, m) in [
                    ("outer", "u_inner.b"),
                    ("outer", "tail.a"),
                    ("outer", "name"),
                    ("bits", "z"),
                    ("with_arr", "grid"),
                    ("oldbits", "q"),
                ] {
                    let _ = btf.member_offset(s, m);
                    let _ = btf.member_size(s, m);
                }
                let _ = btf.enum_values("big");
                let _ = btf.enum_values("color");
                let _ = btf.func_names_matching("do_thing");
                let _ = btf.struct_size("outer");
            }
        }
    }

    #[test]
    fn cyclic_types_are_errors() {
        let mut b = Builder::new();
        b.modifier(kind::TYPEDEF, "loop_t", 2); // 1 -> 2
        b.modifier(kind::CONST, "", 1); // 2 -> 1
                                        // struct self { struct self; } through an anonymous member.
        b.composite(kind::STRUCT, "selfish", 8, false, &[("", 3, 0, 0)]); // 3
        b.composite(kind::STRUCT, "holder", 8, false, &[("l", 1, 0, 0)]); // 4
        b.add("", kind::ARRAY, 0, false, 0, &[5, 5, 2]); // 5: array of itself
        b.composite(kind::STRUCT, "arrs", 8, false, &[("a", 5, 0, 0)]); // 6
        let btf = Btf::parse(&b.finish()).unwrap();
        assert!(btf.member_offset("selfish", "zzz").is_err());
        assert!(btf.member_size("holder", "l").is_err());
        assert!(btf.member_offset("holder", "l.x").is_err());
        assert!(btf.member_size("arrs", "a").is_err());
        assert!(btf.member_offset("loop_t", "x").is_err());
    }

    // ---- the running kernel's BTF, cross-checked with bpftool ----

    const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

    fn vmlinux() -> Option<&'static Btf> {
        static BTF: OnceLock<Option<Btf>> = OnceLock::new();
        BTF.get_or_init(|| {
            if !Path::new(VMLINUX).exists() {
                eprintln!("{VMLINUX} not present; skipping kernel BTF checks");
                return None;
            }
            Some(Btf::from_sys_vmlinux().expect("parse /sys/kernel/btf/vmlinux"))
        })
        .as_ref()
    }

    /// One type from `bpftool btf dump ... format raw`.
    #[derive(Debug, Default)]
    struct DumpType {
        kind: String,
        name: String,
        /// `type_id=` of the header line, when present.
        type_id: Option<u32>,
        /// STRUCT/UNION: (name, type_id, bits_offset, bitfield_size).
        members: Vec<(String, u32, u32, u32)>,
        /// ENUM/ENUM64: (name, value).
        values: Vec<(String, i64)>,
    }

    /// bpftool's view of the kernel BTF, to check this reader against an
    /// independent parser. `None` when bpftool is not installed.
    fn bpftool() -> Option<&'static Vec<DumpType>> {
        static DUMP: OnceLock<Option<Vec<DumpType>>> = OnceLock::new();
        DUMP.get_or_init(|| {
            let out = std::process::Command::new("bpftool")
                .args(["btf", "dump", "file", VMLINUX, "format", "raw"])
                .output()
                .ok()
                .filter(|o| o.status.success());
            let Some(out) = out else {
                eprintln!("bpftool not available; skipping the cross-check");
                return None;
            };
            Some(parse_bpftool(&String::from_utf8_lossy(&out.stdout)))
        })
        .as_ref()
    }

    fn quoted(s: &str) -> Option<(&str, &str)> {
        let s = s.strip_prefix('\'')?;
        let end = s.find('\'')?;
        Some((&s[..end], &s[end + 1..]))
    }

    fn key(rest: &str, k: &str) -> Option<u32> {
        rest.split([' ', ','])
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
    }

    /// Index i holds type id i (0 is a placeholder for void).
    fn parse_bpftool(text: &str) -> Vec<DumpType> {
        let mut types = vec![DumpType::default()];
        for line in text.lines() {
            if let Some(body) = line.strip_prefix('\t') {
                let cur = types.last_mut().unwrap();
                let Some((name, rest)) = quoted(body) else {
                    continue;
                };
                let name = if name == "(anon)" { "" } else { name };
                if let Some(v) = rest.trim().strip_prefix("val=") {
                    let v = v.trim_end_matches("ULL").trim_end_matches("LL");
                    let v: i128 = v.parse().unwrap();
                    cur.values.push((name.to_string(), v as i64));
                } else if let (Some(t), Some(o)) = (key(rest, "type_id"), key(rest, "bits_offset"))
                {
                    let bits = key(rest, "bitfield_size").unwrap_or(0);
                    cur.members.push((name.to_string(), t, o, bits));
                }
            } else if let Some(rest) = line.strip_prefix('[') {
                let (id, rest) = rest.split_once("] ").unwrap();
                let id: usize = id.parse().unwrap();
                assert_eq!(id, types.len(), "bpftool ids are dense");
                let (kind, rest) = rest.split_once(' ').unwrap();
                let (name, rest) = quoted(rest).unwrap();
                types.push(DumpType {
                    kind: kind.to_string(),
                    name: if name == "(anon)" {
                        String::new()
                    } else {
                        name.to_string()
                    },
                    type_id: key(rest, "type_id"),
                    ..DumpType::default()
                });
            }
        }
        types
    }

    /// Member path resolution on bpftool's data, independent of the reader.
    fn dump_offset(dump: &[DumpType], struct_name: &str, path: &str) -> Option<u32> {
        fn skip(dump: &[DumpType], mut id: u32) -> u32 {
            while let Some(t) = dump.get(id as usize) {
                match t.kind.as_str() {
                    "TYPEDEF" | "CONST" | "VOLATILE" | "RESTRICT" | "TYPE_TAG" => {
                        id = t.type_id.unwrap()
                    }
                    _ => break,
                }
            }
            id
        }
        /// (bit offset, type id) of member `name` of type `id`.
        fn find(dump: &[DumpType], id: u32, name: &str) -> Option<(u32, u32)> {
            for (n, t, off, _) in &dump[id as usize].members {
                if n == name {
                    return Some((*off, *t));
                }
                let inner = skip(dump, *t);
                if n.is_empty() && matches!(dump[inner as usize].kind.as_str(), "STRUCT" | "UNION")
                {
                    if let Some((o, t)) = find(dump, inner, name) {
                        return Some((off + o, t));
                    }
                }
            }
            None
        }
        let id = dump.iter().position(|t| {
            t.name == struct_name && matches!(t.kind.as_str(), "STRUCT" | "UNION" | "TYPEDEF")
        })?;
        let mut id = skip(dump, id as u32);
        let mut total = 0;
        for c in path.split('.') {
            let (off, t) = find(dump, id, c)?;
            total += off;
            id = skip(dump, t);
        }
        Some(total / 8)
    }

    const KERNEL_MEMBERS: &[(&str, &str)] = &[
        ("sk_buff", "dev"),
        ("sk_buff", "len"),
        ("sk_buff", "head"),
        ("sk_buff", "data"),
        ("sk_buff", "mac_header"),
        ("sk_buff", "network_header"),
        ("sk_buff", "transport_header"),
        ("sk_buff", "protocol"),
        ("net_device", "name"),
        ("net_device", "ifindex"),
        ("net_device", "nd_net"),
        ("net_device", "nd_net.net"),
        ("possible_net_t", "net"),
        ("net", "ns"),
        ("ns_common", "inum"),
        ("net", "ns.inum"),
    ];

    #[test]
    fn kernel_offsets_are_consistent() {
        let Some(btf) = vmlinux() else { return };
        let off = |s: &str, m: &str| {
            btf.member_offset(s, m)
                .unwrap_or_else(|e| panic!("{s}.{m}: {e}"))
        };
        let size = |s: &str, m: &str| {
            btf.member_size(s, m)
                .unwrap_or_else(|e| panic!("size of {s}.{m}: {e}"))
        };
        let skb_size = btf.struct_size("sk_buff").unwrap();
        for (s, m) in KERNEL_MEMBERS {
            let o = off(s, m);
            let sz = size(s, m);
            eprintln!("{s}.{m}: offset {o}, size {sz}");
            assert!(o + sz <= btf.struct_size(s).unwrap(), "{s}.{m} outside {s}");
            if *m != "name" {
                assert_eq!(o % sz.min(8), 0, "{s}.{m} is not naturally aligned");
            }
        }
        for m in ["dev", "len", "head", "data", "protocol", "mac_header"] {
            assert!(off("sk_buff", m) < skb_size);
        }
        let ptr = btf.ptr_size;
        assert_eq!(size("sk_buff", "dev"), ptr);
        assert_eq!(size("sk_buff", "head"), ptr);
        assert_eq!(size("sk_buff", "data"), ptr);
        assert_eq!(size("sk_buff", "len"), 4);
        assert_eq!(size("sk_buff", "protocol"), 2);
        // Kernel order: head then data; transport, network, mac headers.
        assert!(off("sk_buff", "head") < off("sk_buff", "data"));
        assert!(off("sk_buff", "transport_header") < off("sk_buff", "network_header"));
        assert!(off("sk_buff", "network_header") < off("sk_buff", "mac_header"));
        for h in ["mac_header", "network_header", "transport_header"] {
            assert_eq!(size("sk_buff", h), 2);
        }
        assert_eq!(size("net_device", "name"), 16); // IFNAMSIZ
        let (_, name_ty) = btf.resolve_member("net_device", "name").unwrap();
        let name_ty = btf.skip_modifiers(name_ty).unwrap().unwrap();
        assert_eq!(
            name_ty.kind(),
            kind::ARRAY,
            "net_device.name is a char array"
        );
        assert_eq!(size("net_device", "ifindex"), 4);
        assert_eq!(size("ns_common", "inum"), 4);
        assert_eq!(size("possible_net_t", "net"), ptr);
        assert_eq!(
            off("net_device", "nd_net.net"),
            off("net_device", "nd_net") + off("possible_net_t", "net")
        );
        assert_eq!(
            off("net", "ns.inum"),
            off("net", "ns") + off("ns_common", "inum")
        );
        // sk_buff.dev lives in an anonymous union inside an anonymous struct
        // on recent kernels; the lookup must see through both.
        assert!(btf.member_offset("sk_buff", "next").is_ok());
        let err = btf.member_offset("sk_buff", "no_such_member").unwrap_err();
        assert!(err.to_string().contains("sk_buff") && err.to_string().contains("no_such_member"));
    }

    #[test]
    fn kernel_offsets_match_bpftool() {
        let (Some(btf), Some(dump)) = (vmlinux(), bpftool()) else {
            return;
        };
        for (s, m) in KERNEL_MEMBERS {
            let theirs = dump_offset(dump, s, m).unwrap_or_else(|| panic!("bpftool: no {s}.{m}"));
            assert_eq!(btf.member_offset(s, m).unwrap(), theirs, "{s}.{m}");
        }
    }

    /// Every type record decoded by this reader matches bpftool's dump:
    /// kind, name, referenced type, struct members and enum values.
    #[test]
    fn kernel_types_match_bpftool() {
        let (Some(btf), Some(dump)) = (vmlinux(), bpftool()) else {
            return;
        };
        assert_eq!(btf.last_type_id() as usize, dump.len() - 1);
        let mut kinds: HashMap<&str, usize> = HashMap::new();
        for ty in btf.types() {
            let theirs = &dump[ty.id as usize];
            *kinds.entry(kind_name(ty.kind())).or_default() += 1;
            assert_eq!(kind_name(ty.kind()), theirs.kind, "kind of id {}", ty.id);
            let name = String::from_utf8_lossy(btf.name_bytes(ty.raw.name_off).unwrap());
            assert_eq!(name, theirs.name, "name of id {}", ty.id);
            if matches!(
                ty.kind(),
                kind::PTR | kind::TYPEDEF | kind::CONST | kind::VOLATILE | kind::FUNC | kind::VAR
            ) {
                assert_eq!(
                    Some(ty.raw.size_or_type),
                    theirs.type_id,
                    "type of id {}",
                    ty.id
                );
            }
            if ty.is_composite() {
                let ours: Vec<_> = (0..ty.raw.vlen())
                    .map(|i| {
                        let m = ty.member(i).unwrap();
                        let n = btf.name_bytes(m.name_off).unwrap();
                        (
                            String::from_utf8_lossy(n).into_owned(),
                            m.type_id,
                            m.bit_offset,
                            m.bitfield_size,
                        )
                    })
                    .collect();
                assert_eq!(ours, theirs.members, "members of id {}", ty.id);
            }
            if matches!(ty.kind(), kind::ENUM | kind::ENUM64) {
                assert_eq!(
                    btf.enum_values_of(&ty).unwrap(),
                    theirs.values,
                    "enum id {}",
                    ty.id
                );
            }
        }
        // The kernel BTF exercises every kind this reader skips over.
        eprintln!("kinds seen: {kinds:?}");
        assert!(
            kinds.len() >= 17,
            "expected nearly every kind, saw {kinds:?}"
        );
    }

    #[test]
    fn kernel_drop_reasons() {
        let Some(btf) = vmlinux() else { return };
        let values = btf.enum_values("skb_drop_reason").unwrap();
        let get = |n: &str| values.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
        let not_specified = get("SKB_DROP_REASON_NOT_SPECIFIED").expect("NOT_SPECIFIED");
        let no_socket = get("SKB_DROP_REASON_NO_SOCKET").expect("NO_SOCKET");
        let full_ring = get("SKB_DROP_REASON_FULL_RING").expect("FULL_RING");
        eprintln!("NOT_SPECIFIED={not_specified} NO_SOCKET={no_socket} FULL_RING={full_ring}");
        assert!(not_specified < no_socket && no_socket < full_ring);
        if let Some(dump) = bpftool() {
            let theirs = dump
                .iter()
                .find(|t| t.name == "skb_drop_reason" && t.kind.starts_with("ENUM"))
                .unwrap();
            assert_eq!(values, theirs.values);
        }
    }

    #[test]
    fn kernel_functions_and_tracepoints() {
        let Some(btf) = vmlinux() else { return };
        for f in [
            "br_handle_frame",
            "br_forward",
            "tun_net_xmit",
            "tun_get_user",
            "veth_xmit",
        ] {
            let found = btf.func_names_matching(f);
            eprintln!("{f}: {found:?}");
            assert!(!found.is_empty(), "{f} not in BTF");
            assert!(found
                .iter()
                .all(|n| n == f || n.starts_with(&format!("{f}."))));
        }
        // virtio-net is built in here; other kernels may have it as a module
        // (then its functions are in the module's split BTF).
        if btf.has_func("virtnet_poll") {
            for f in ["start_xmit", "virtnet_poll"] {
                let found = btf.func_names_matching(f);
                eprintln!("{f}: {found:?}");
                assert!(found.iter().any(|n| n == f), "{f} not in BTF");
            }
        }
        assert!(btf.has_func("netif_receive_skb"));
        assert!(!btf.has_func("vtrace_no_such_function"));
        let dump_has = |kind: &str, name: &str| {
            bpftool().map(|d| d.iter().any(|t| t.kind == kind && t.name == name))
        };
        let has_tp = btf.has_typedef("btf_trace_net_dev_xmit");
        if let Some(theirs) = dump_has("TYPEDEF", "btf_trace_net_dev_xmit") {
            assert_eq!(has_tp, theirs);
        }
        assert!(!btf.has_typedef("btf_trace_vtrace_no_such_event"));
    }

    #[test]
    fn split_on_kernel_btf() {
        let Some(base) = vmlinux() else { return };
        let ns_common = base
            .types()
            .find(|t| t.kind() == kind::STRUCT && base.name_is(t.raw.name_off, "ns_common"))
            .unwrap();
        let mut b = Builder::split(base);
        let first = b.next_id;
        b.composite(
            kind::STRUCT,
            "vtrace_test_mod_struct",
            64,
            false,
            &[("", ns_common.id, 0, 0)],
        );
        let split = Btf::parse_split(&b.finish(), base).unwrap();
        assert_eq!(split.last_type_id(), first);
        assert_eq!(
            split
                .member_offset("vtrace_test_mod_struct", "inum")
                .unwrap(),
            base.member_offset("ns_common", "inum").unwrap()
        );
        assert_eq!(
            split.member_offset("sk_buff", "dev").unwrap(),
            base.member_offset("sk_buff", "dev").unwrap()
        );
        // Real module BTF, when any module exposes it.
        if let Ok(dir) = std::fs::read_dir(SYS_BTF_DIR) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name != "vmlinux" {
                    let m = Btf::module(&name, base).unwrap_or_else(|e| panic!("{name}: {e}"));
                    assert!(m.last_type_id() >= base.last_type_id());
                }
            }
        }
        assert!(matches!(
            Btf::module("../vmlinux", base),
            Err(BtfError::InvalidModuleName(_))
        ));
        assert!(matches!(
            Btf::module("vtrace_no_such_module", base),
            Err(BtfError::Io { .. })
        ));
    }
}
