//! The load-time configuration the loader sets before load (see `vtrace_common::Config`).

use vtrace_common::Config;

/// Set by the loader with `EbpfLoader::set_global("CONFIG", ..)`. It lands in `.rodata`, which
/// the kernel freezes read-only, so the verifier treats its fields as constants and prunes the
/// branches of disabled features.
#[unsafe(no_mangle)]
pub(crate) static CONFIG: Config = Config::zeroed();

/// Reads one field of CONFIG. The volatile read keeps the compiler from folding the zeroed
/// initial value in at build time.
macro_rules! conf {
    ($($field:tt)+) => {
        {
            // SAFETY: CONFIG is a valid static; the read is of a plain integer field.
            #[allow(unused_unsafe)]
            let v = unsafe {
                core::ptr::read_volatile(core::ptr::addr_of!(crate::config::CONFIG.$($field)+))
            };
            v
        }
    };
}
pub(crate) use conf;
