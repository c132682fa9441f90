//! vtrace's lab: the test topology shared by the tests and the demo.
//!
//! * [`Lab`] builds, and on drop removes, network namespaces joined by two paths:
//!   a *native* one (veth — bridge — veth) and a *virtual* one whose frames cross two
//!   tap devices and a VMM-like forwarder ([`vmm::Vmm`]), the data path QEMU's
//!   virtio-net backend drives for a guest bridging its two NICs.
//! * [`ping()`] runs ping inside a namespace and parses its summary.
//! * [`flood()`] is a 64-byte UDP load generator between two namespaces.
//!
//! All lab addresses are in 198.18.0.0/15 and no traffic leaves the lab's namespaces
//! and bridges. Everything needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN for `setns`).

pub mod cmd;
pub mod flood;
pub mod guest;
pub mod guest_run;
pub mod names;
pub mod netns;
pub mod ping;
pub mod topology;
pub mod vhost;
pub mod vmm;

pub use flood::{flood, FloodOptions, FloodReport};
pub use ping::{ping, PingStats, Rtt};
pub use topology::{is_lab_addr, CleanReport, Lab, LabOptions, NativePath, VirtualPath};
pub use vmm::{VmmOptions, VmmStats};
