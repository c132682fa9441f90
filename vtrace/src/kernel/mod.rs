//! What vtrace reads from the running kernel: BTF (struct offsets, drop reasons, functions),
//! /proc/kallsyms, device counters, and the privileges and mounts it needs; and the few bpf(2)
//! commands vtrace issues itself (module BTF objects, loading fentry programs on module functions).

pub mod bpf_sys;
// General-purpose readers of kernel formats: not every accessor is used by every command.
#[allow(dead_code)]
pub mod btf;
pub mod btf_object;
#[allow(dead_code)]
pub mod kallsyms;
pub mod netdev;
pub mod privileges;
pub mod prog_load;

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use vtrace_common::KernelOffsets;

/// Resolves every field offset the eBPF programs read, from the running kernel's BTF.
pub fn resolve_offsets(btf: &btf::Btf) -> Result<KernelOffsets> {
    let off = |s: &str, path: &str| {
        btf.member_offset(s, path)
            .with_context(|| format!("resolving {s}.{path} in the kernel's BTF"))
    };
    Ok(KernelOffsets {
        sk_buff_dev: off("sk_buff", "dev")?,
        sk_buff_len: off("sk_buff", "len")?,
        sk_buff_head: off("sk_buff", "head")?,
        sk_buff_mac_header: off("sk_buff", "mac_header")?,
        sk_buff_network_header: off("sk_buff", "network_header")?,
        sk_buff_protocol: off("sk_buff", "protocol")?,
        net_device_name: off("net_device", "name")?,
        net_device_ifindex: off("net_device", "ifindex")?,
        // possible_net_t is a struct whose only member is `struct net *net` (when
        // CONFIG_NET_NS); nd_net.net is at nd_net's offset either way.
        net_device_nd_net: off("net_device", "nd_net")? + off("possible_net_t", "net").unwrap_or(0),
        net_ns_inum: off("net", "ns.inum")?,
        sk_buff_skb_iif: off("sk_buff", "skb_iif")?,
        sk_buff_sk: off("sk_buff", "sk")?,
        // sock_common's skc_net is a possible_net_t: its `net` pointer is at its start.
        sock_net: off("sock", "__sk_common.skc_net")? + off("possible_net_t", "net").unwrap_or(0),
        // Driver discovery: the device's own function pointers.
        net_device_netdev_ops: off("net_device", "netdev_ops")?,
        net_device_ops_ndo_start_xmit: off("net_device_ops", "ndo_start_xmit")?,
        napi_struct_poll: off("napi_struct", "poll")?,
        napi_struct_dev: off("napi_struct", "dev")?,
        _pad: 0,
    })
}

/// `enum skb_drop_reason` from the running kernel's BTF: value -> name without the
/// `SKB_DROP_REASON_` prefix. The numbers differ between kernels; only the names are stable.
pub fn drop_reasons(btf: &btf::Btf) -> Result<BTreeMap<u32, String>> {
    let values = btf
        .enum_values("skb_drop_reason")
        .context("reading enum skb_drop_reason from the kernel's BTF")?;
    Ok(values
        .into_iter()
        .map(|(name, v)| {
            let short = name
                .strip_prefix("SKB_DROP_REASON_")
                .unwrap_or(&name)
                .to_string();
            (v as u32, short)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against this machine's own BTF: every offset resolves, and the relations the kernel's
    /// struct layout guarantees hold (include/linux/skbuff.h, include/linux/netdevice.h).
    #[test]
    fn offsets_resolve_against_this_kernel() {
        let btf = btf::Btf::from_sys_vmlinux().expect("this machine has /sys/kernel/btf/vmlinux");
        let o = resolve_offsets(&btf).expect("all offsets resolve");
        assert!(o.sk_buff_head < o.sk_buff_len || o.sk_buff_len < o.sk_buff_head);
        assert_ne!(o.sk_buff_mac_header, o.sk_buff_network_header);
        assert_eq!(o.sk_buff_mac_header % 2, 0, "mac_header is a u16");
        assert_eq!(o.sk_buff_head % 8, 0, "head is a pointer");
        assert_eq!(o.sk_buff_dev % 8, 0, "dev is a pointer");
        assert_eq!(o.net_device_nd_net % 8, 0, "nd_net.net is a pointer");
        assert!(o.net_ns_inum > 0);
        assert!(o.net_device_ifindex != o.net_device_name);
    }

    #[test]
    fn drop_reasons_have_the_names_users_see() {
        let btf = btf::Btf::from_sys_vmlinux().expect("BTF");
        let r = drop_reasons(&btf).expect("enum skb_drop_reason");
        let names: Vec<&str> = r.values().map(|s| s.as_str()).collect();
        for n in ["NOT_SPECIFIED", "NO_SOCKET", "FULL_RING"] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        assert!(r.values().all(|n| !n.starts_with("SKB_DROP_REASON_")));
    }
}
