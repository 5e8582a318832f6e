//! Finding the RDMA device, port and GID that serve an IP address.
//!
//! On RoCE the GID table of a port holds its IP addresses (IPv4 ones mapped into IPv6), one
//! entry per RoCE version. rmig picks the device whose table holds the address its control
//! connection uses, and the RoCEv2 entry for it: the GID index is looked up, never assumed.

use std::net::IpAddr;
use std::sync::Arc;

use sideway::ibverbs::address::{Gid, GidType};
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, Mtu};
use sideway::ibverbs::protection_domain::ProtectionDomain;

use super::error::io_of;
use super::RdmaError;

/// An opened RDMA device with the port and GID that serve one address.
pub struct RdmaDevice {
    pub(crate) ctx: Arc<DeviceContext>,
    pub(crate) pd: Arc<ProtectionDomain>,
    name: String,
    pub(crate) port: u8,
    pub(crate) gid_index: u8,
    pub(crate) gid: Gid,
    pub(crate) mtu: Mtu,
    /// Most scatter-gather entries in one work request.
    pub(crate) max_sge: u32,
    /// Most outstanding work requests on one queue.
    pub(crate) max_qp_wr: u32,
    /// Most RDMA READs a queue pair may answer at once (responder resources).
    pub(crate) max_rd_atom: u8,
    /// Most RDMA READs a queue pair may have outstanding as the reader (initiator depth).
    pub(crate) max_init_rd_atom: u8,
}

impl std::fmt::Debug for RdmaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaDevice")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("gid_index", &self.gid_index)
            .finish()
    }
}

/// The GID that RoCE gives an IP address.
fn gid_of(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

impl RdmaDevice {
    /// Opens the device (`name`, or any) whose GID table holds `ip`, on the port and RoCEv2
    /// GID index that hold it.
    pub fn open(name: Option<&str>, ip: IpAddr) -> Result<RdmaDevice, RdmaError> {
        let list = DeviceList::new().map_err(|e| {
            let io = io_of(&e);
            let why = match io.raw_os_error() {
                Some(libc::ENOSYS) => "the kernel has no RDMA support".to_string(),
                Some(libc::EOPNOTSUPP) => "libibverbs.so.1 is not installed".to_string(),
                _ => format!("cannot list devices: {io}"),
            };
            RdmaError::NoDevice(why)
        })?;
        let want = gid_of(ip);
        let mut seen = Vec::new();
        for dev in list.iter() {
            let dname = dev.name();
            if name.is_some_and(|n| n != dname) {
                continue;
            }
            seen.push(dname.clone());
            let ctx = dev
                .open()
                .map_err(|e| RdmaError::verbs(format!("opening {dname}"), io_of(&e)))?;
            let Ok(table) = ctx.query_gid_table() else {
                continue;
            };
            let mut best: Option<(u8, u8, GidType)> = None;
            for e in table {
                if e.gid().raw != want {
                    continue;
                }
                let ty = e.gid_type();
                let (port, idx) = (e.port_num() as u8, e.gid_index() as u8);
                if best.is_none() || ty == GidType::RoceV2 {
                    best = Some((port, idx, ty));
                }
            }
            let Some((port, gid_index, _)) = best else {
                continue;
            };
            let attr = ctx
                .query_device()
                .map_err(|e| RdmaError::verbs("ibv_query_device", io_of(&e)))?;
            let pattr = ctx.query_port(port).map_err(|e| {
                RdmaError::verbs(format!("ibv_query_port {dname}:{port}"), io_of(&e))
            })?;
            let gid = ctx
                .query_gid(port, gid_index as u32)
                .map_err(|e| RdmaError::verbs("ibv_query_gid", io_of(&e)))?;
            let pd = ctx
                .alloc_pd()
                .map_err(|e| RdmaError::verbs("ibv_alloc_pd", io_of(&e)))?;
            return Ok(RdmaDevice {
                pd,
                name: dname,
                port,
                gid_index,
                gid,
                mtu: pattr.active_mtu(),
                max_sge: attr.max_sge().max(1) as u32,
                max_qp_wr: attr.max_qp_wr().max(16) as u32,
                max_rd_atom: attr.max_qp_rd_atom().clamp(0, 255) as u8,
                max_init_rd_atom: attr.max_qp_init_rd_atom().clamp(0, 255) as u8,
                ctx,
            });
        }
        Err(RdmaError::NoDevice(match (name, seen.is_empty()) {
            (Some(n), true) => format!("there is no device named {n}"),
            (_, true) => "no RDMA device is present".to_string(),
            (_, false) => format!(
                "no device among {} has {ip} in its GID table",
                seen.join(", ")
            ),
        }))
    }

    /// The device's name, e.g. `rxe0` or `mlx5_0`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The port used.
    pub fn port(&self) -> u8 {
        self.port
    }

    /// The GID index used (the RoCEv2 entry of the address).
    pub fn gid_index(&self) -> u8 {
        self.gid_index
    }
}
