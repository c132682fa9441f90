//! The bpf(2) system call, for the few commands vtrace issues itself rather than through aya:
//! walking the kernel's BTF objects (`btf_object`) and loading a program against a module's BTF
//! (`prog_load`). `union bpf_attr` and the info structs are the uapi bindings aya-obj generates
//! from include/uapi/linux/bpf.h, so their layout is the kernel's.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

pub use aya_obj::generated::{bpf_attr, bpf_cmd};

/// bpf(cmd, attr, sizeof(attr)). The kernel accepts an attr shorter or longer than its own as
/// long as the part it does not know is zero (`bpf_check_uarg_tail_zero`), so the whole
/// (zero-initialised) union is passed.
pub fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, initialised `union bpf_attr` of the size passed; the kernel
    // reads it and writes only within it (and into buffers the caller put in it).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A zeroed `union bpf_attr`: every command expects the members it does not use to be zero.
pub fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is plain integers and arrays of them; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// Runs a command that returns a new file descriptor (BPF_PROG_LOAD, BPF_BTF_GET_FD_BY_ID,
/// BPF_RAW_TRACEPOINT_OPEN, ...) and takes ownership of it: the kernel object lives as long
/// as this fd (and whatever else references it).
pub fn bpf_fd(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    let fd = i32::try_from(fd)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{cmd:?}: bad fd {fd}")))?;
    // SAFETY: these commands return a fresh fd (O_CLOEXEC, set by the kernel) that nothing
    // else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The next id after `start` of a kind of bpf object (BPF_PROG_GET_NEXT_ID,
/// BPF_BTF_GET_NEXT_ID, ...); `None` at the end. These commands need CAP_SYS_ADMIN.
pub fn next_id(cmd: bpf_cmd, start: u32) -> io::Result<Option<u32>> {
    let mut attr = zeroed_attr();
    // BPF_*_GET_NEXT_ID: `start_id` in, `next_id` out.
    attr.__bindgen_anon_6.__bindgen_anon_1.start_id = start;
    match bpf(cmd, &mut attr) {
        // SAFETY: the kernel filled `next_id` of the member it was given.
        Ok(_) => Ok(Some(unsafe { attr.__bindgen_anon_6.next_id })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every id of one kind of bpf object (BPF_PROG_GET_NEXT_ID, BPF_BTF_GET_NEXT_ID, ...).
pub fn ids(cmd: bpf_cmd) -> io::Result<Vec<u32>> {
    let mut out = Vec::new();
    let mut id = 0;
    while let Some(next) = next_id(cmd, id)? {
        out.push(next);
        id = next;
    }
    Ok(out)
}

/// BPF_OBJ_GET_INFO_BY_FD into `info` (`bpf_prog_info`, `bpf_btf_info`, ...). Returns how many
/// bytes the kernel filled: an older kernel fills fewer (its struct is shorter), and the rest
/// of `info` keeps the caller's zeros.
pub fn obj_info<T>(fd: BorrowedFd<'_>, info: &mut T) -> io::Result<u32> {
    let mut attr = zeroed_attr();
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = std::mem::size_of::<T>() as u32;
    attr.info.info = info as *mut T as u64;
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    // SAFETY: the kernel wrote the length it filled back into the `info` member.
    Ok(unsafe { attr.info.info_len })
}

/// An fd for the program with id `id` (BPF_PROG_GET_FD_BY_ID); `ENOENT` once it is freed.
#[cfg(test)]
pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_6.__bindgen_anon_1.prog_id = id;
    bpf_fd(bpf_cmd::BPF_PROG_GET_FD_BY_ID, &mut attr)
}

/// Id, name, run count and run time of a loaded program (run count and time are counted only
/// while BPF statistics are on, see `cost::enable_stats`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgInfo {
    pub id: u32,
    /// As the kernel keeps it: at most 15 bytes.
    pub name: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

pub fn prog_info(fd: BorrowedFd<'_>) -> io::Result<ProgInfo> {
    // SAFETY: bpf_prog_info is plain integers; all-zero is valid (and the pointers in it,
    // zero, ask the kernel for no arrays).
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    obj_info(fd, &mut info)?;
    let name: Vec<u8> = info
        .name
        .iter()
        .map(|&c| c as u8)
        .take_while(|&c| c != 0)
        .collect();
    Ok(ProgInfo {
        id: info.id,
        name: String::from_utf8_lossy(&name).into_owned(),
        run_cnt: info.run_cnt,
        run_time_ns: info.run_time_ns,
    })
}

/// Names of the loaded programs with ids in `ids` that still exist.
#[cfg(test)]
pub fn prog_names(ids: &[u32]) -> Vec<(u32, String)> {
    ids.iter()
        .filter_map(|&id| {
            let fd = prog_fd_by_id(id).ok()?;
            prog_info(std::os::fd::AsFd::as_fd(&fd))
                .ok()
                .map(|i| (id, i.name))
        })
        .collect()
}

/// The ids of every program loaded now (tests compare it with what is loaded later).
#[cfg(test)]
pub fn program_ids() -> std::collections::HashSet<u32> {
    ids(bpf_cmd::BPF_PROG_GET_NEXT_ID)
        .expect("listing BPF programs")
        .into_iter()
        .collect()
}

/// Programs loaded since `before` (a set of program ids) whose names start with `prefix`,
/// after waiting up to 5 s for them to go (the kernel frees programs asynchronously).
#[cfg(test)]
pub fn programs_left(before: &std::collections::HashSet<u32>, prefix: &str) -> Vec<(u32, String)> {
    let left = || -> Vec<(u32, String)> {
        let new: Vec<u32> = ids(bpf_cmd::BPF_PROG_GET_NEXT_ID)
            .unwrap_or_default()
            .into_iter()
            .filter(|id| !before.contains(id))
            .collect();
        prog_names(&new)
            .into_iter()
            .filter(|(_, n)| n.starts_with(prefix))
            .collect()
    };
    for _ in 0..50 {
        if left().is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    left()
}

/// The name of an errno, as the kernel's headers spell it.
pub fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => crate::hooks::errno_name(n),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields vtrace fills sit where include/uapi/linux/bpf.h puts them (the offsets libbpf
    /// and the kernel agree on); the bindings are generated, this guards against a mix-up of
    /// the anonymous members.
    #[test]
    fn attr_layout_is_the_uapi_one() {
        let a = zeroed_attr();
        let base = &a as *const bpf_attr as usize;
        // SAFETY: only addresses are taken, no union member is read.
        let (load, info, ids, raw_tp) = unsafe {
            (
                &a.__bindgen_anon_3 as *const _ as usize - base,
                &a.info as *const _ as usize - base,
                &a.__bindgen_anon_6 as *const _ as usize - base,
                &a.raw_tracepoint as *const _ as usize - base,
            )
        };
        assert_eq!((load, info, ids, raw_tp), (0, 0, 0, 0));
        use aya_obj::generated::bpf_attr__bindgen_ty_4 as ProgLoad;
        assert_eq!(std::mem::offset_of!(ProgLoad, expected_attach_type), 68);
        assert_eq!(std::mem::offset_of!(ProgLoad, attach_btf_id), 108);
        assert_eq!(std::mem::offset_of!(ProgLoad, __bindgen_anon_1), 112);
        use aya_obj::generated::bpf_btf_info;
        assert_eq!(std::mem::offset_of!(bpf_btf_info, name), 16);
        assert_eq!(std::mem::offset_of!(bpf_btf_info, kernel_btf), 28);
    }
}
