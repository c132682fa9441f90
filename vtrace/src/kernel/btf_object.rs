//! The kernel's BTF objects, as bpf objects: `vmlinux` and one per loaded module built with
//! CONFIG_DEBUG_INFO_BTF_MODULES (kernel 5.11+). /sys/kernel/btf/<name> gives the same type
//! data as a file, but a program attached to a function of a module must name the module's
//! BTF *object*: BPF_PROG_LOAD takes the target as `attach_btf_id` (a type id in the module's
//! split BTF) plus `attach_btf_obj_fd`, an fd of that object, which only the bpf syscall
//! hands out. The kernel's module BTF objects have no stable id, so they are found by name:
//! BPF_BTF_GET_NEXT_ID walks every BTF object (the kernel's and those programs loaded),
//! BPF_BTF_GET_FD_BY_ID opens one, and BPF_OBJ_GET_INFO_BY_FD reads its `struct bpf_btf_info`:
//! `name` (the module's name, or "vmlinux") and `kernel_btf` (set for the kernel's own).
//! Listing and opening BTF objects needs CAP_SYS_ADMIN.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
};

use super::bpf_sys::{self, bpf_cmd};

/// Module names are C identifiers (the kernel turns `-` into `_`); /sys/kernel/btf uses them.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The id, name and kernel flag of BTF object `fd`. `None` for the name when the kernel
/// predates named BTF objects (5.11): it then fills fewer bytes of `bpf_btf_info`.
fn describe(fd: &OwnedFd) -> io::Result<(u32, Option<String>, bool)> {
    let mut name = [0u8; 64];
    // SAFETY: bpf_btf_info is plain integers; all-zero is valid.
    let mut info: aya_obj::generated::bpf_btf_info = unsafe { std::mem::zeroed() };
    // The kernel copies at most `name_len` bytes of the name (NUL included) into `name`.
    info.name = name.as_mut_ptr() as u64;
    info.name_len = name.len() as u32;
    let filled = bpf_sys::obj_info(fd.as_fd(), &mut info)?;
    let named =
        filled as usize >= std::mem::offset_of!(aya_obj::generated::bpf_btf_info, kernel_btf) + 4;
    if !named {
        return Ok((info.id, None, false));
    }
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok((
        info.id,
        Some(String::from_utf8_lossy(&name[..len]).into_owned()),
        info.kernel_btf != 0,
    ))
}

/// Every kernel BTF object: (id, name), `vmlinux` first on every kernel so far.
#[cfg(test)]
pub fn list() -> Result<Vec<(u32, String)>, String> {
    let mut out = Vec::new();
    for id in ids()? {
        if let Some(obj) = open(id)? {
            if let (_, Some(name), true) = describe(&obj).map_err(|e| info_error(id, &e))? {
                out.push((id, name));
            }
        }
    }
    Ok(out)
}

/// An fd of the kernel BTF object called `name`: a module's name, or `vmlinux` for the kernel
/// itself. Holding it keeps the object (and so the module's BTF) alive. The error is one line
/// that says what is missing and what a host needs.
pub fn find(name: &str) -> Result<OwnedFd, String> {
    if !valid_name(name) {
        return Err(format!("{name:?} is not a kernel module name"));
    }
    for id in ids()? {
        // A BTF object can go (a module unloaded, a program freed) between the listing and
        // the open: ENOENT there is not an error.
        let Some(fd) = open(id)? else { continue };
        match describe(&fd).map_err(|e| info_error(id, &e))? {
            (_, Some(n), true) if n == name => return Ok(fd),
            (_, None, _) => return Err(
                "this kernel's BTF objects carry no names (kernel before 5.11): no BTF for modules"
                    .into(),
            ),
            _ => {}
        }
    }
    Err(if name == "vmlinux" {
        "the kernel has no BTF object (kernel built without CONFIG_DEBUG_INFO_BTF)".into()
    } else {
        format!(
            "no kernel BTF object for module {name} (not loaded, or the kernel is built without CONFIG_DEBUG_INFO_BTF_MODULES: see /sys/kernel/btf/{name})"
        )
    })
}

fn ids() -> Result<Vec<u32>, String> {
    bpf_sys::ids(bpf_cmd::BPF_BTF_GET_NEXT_ID).map_err(|e| {
        format!(
            "listing the kernel's BTF objects (BPF_BTF_GET_NEXT_ID): {}{}",
            bpf_sys::errno_name(&e),
            if e.raw_os_error() == Some(libc::EPERM) {
                " (needs CAP_SYS_ADMIN)"
            } else {
                ""
            }
        )
    })
}

/// BPF_BTF_GET_FD_BY_ID; `None` when the object has gone since it was listed.
fn open(id: u32) -> Result<Option<OwnedFd>, String> {
    let mut attr = bpf_sys::zeroed_attr();
    attr.__bindgen_anon_6.__bindgen_anon_1.btf_id = id;
    match bpf_sys::bpf_fd(bpf_cmd::BPF_BTF_GET_FD_BY_ID, &mut attr) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(format!(
            "opening BTF object {id} (BPF_BTF_GET_FD_BY_ID): {}",
            bpf_sys::errno_name(&e)
        )),
    }
}

fn info_error(id: u32, e: &io::Error) -> String {
    format!(
        "reading BTF object {id} (BPF_OBJ_GET_INFO_BY_FD): {}",
        bpf_sys::errno_name(e)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// The kernel's own BTF object is found by name, and every module exposing BTF under
    /// /sys/kernel/btf has an object of its name (none on this machine: no modules loaded).
    #[test]
    fn kernel_btf_objects_are_found_by_name() {
        if !is_root() {
            eprintln!("skipped: listing BTF objects needs CAP_SYS_ADMIN (run as root)");
            return;
        }
        let vmlinux = find("vmlinux").expect("vmlinux BTF object");
        let (id, name, kernel) = describe(&vmlinux).unwrap();
        assert_eq!((name.as_deref(), kernel), (Some("vmlinux"), true));
        let listed = list().unwrap();
        assert!(listed.contains(&(id, "vmlinux".to_string())), "{listed:?}");
        let sys: Vec<String> = std::fs::read_dir("/sys/kernel/btf")
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        for m in &sys {
            assert!(
                listed.iter().any(|(_, n)| n == m),
                "{m} in /sys but not listed: {listed:?}"
            );
        }
        assert_eq!(
            listed.len(),
            sys.len(),
            "{listed:?} against /sys/kernel/btf {sys:?}"
        );
    }

    #[test]
    fn missing_and_bad_module_names_are_one_line_errors() {
        for bad in ["", "../vmlinux", "a/b", "x\0y"] {
            let e = find(bad).unwrap_err();
            assert!(
                e.contains("not a kernel module name") && !e.contains('\n'),
                "{e}"
            );
        }
        if !is_root() {
            eprintln!("skipped (the lookup part): listing BTF objects needs CAP_SYS_ADMIN");
            return;
        }
        let e = find("vtrace_no_such_module").unwrap_err();
        assert!(
            e.contains("module vtrace_no_such_module")
                && e.contains("CONFIG_DEBUG_INFO_BTF_MODULES")
                && !e.contains('\n'),
            "{e}"
        );
    }
}
