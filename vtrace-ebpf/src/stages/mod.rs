//! One file per data-path stage. Program names are `vt_<stage>_<hook>`; the `_raw` twin is the
//! raw-tracepoint fallback for kernels without `tp_btf` for that tracepoint.

mod free;
mod functions;
mod napi;
mod probe;
mod rx;
mod socket;
mod work;
mod xmit;
