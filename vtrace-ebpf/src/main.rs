//! vtrace's eBPF programs. One file per data-path stage under `stages/`; the shared hop logic in
//! `hop.rs`; kernel struct access in `kernel.rs`; maps in `maps.rs`.
//!
//! Every hook has two entry points over the same body: a BTF-typed tracepoint (`tp_btf`, the
//! cheapest) and a raw tracepoint fallback. Both receive the tracepoint's `TP_PROTO` arguments
//! as an array of u64, so the bodies are shared. The loader tries them in that order.
#![no_std]
#![no_main]

mod config;
mod drivers;
mod hop;
mod kernel;
mod maps;
mod stages;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: unreachable in a verified program; the verifier rejects paths that could get here.
    unsafe { core::hint::unreachable_unchecked() }
}
