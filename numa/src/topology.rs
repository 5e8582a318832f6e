//! The machine as hwloc sees it: packages, NUMA nodes, cores, PUs, and the NUMA node of each
//! network device.

use std::path::PathBuf;

use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::types::{OSDeviceType, ObjectType};
use hwlocality::topology::builder::TypeFilter;
use serde::Serialize;

use crate::NumaError;

/// Where the topology comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopologySource {
    /// This machine.
    System,
    /// An hwloc XML export (`lstopo --of xml`).
    Xml(PathBuf),
    /// An hwloc synthetic description (`pack:2 numa:2 core:4 pu:2`).
    Synthetic(String),
}

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    /// The OS's number of the node.
    pub os_index: usize,
    /// The package (socket) holding it, by OS index.
    pub package: Option<usize>,
    /// OS indices of its processing units (hardware threads).
    pub cpus: Vec<usize>,
    /// Its memory in bytes, if known.
    pub memory: u64,
}

/// A network device and the NUMA node it is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nic {
    /// Interface name (`eth0`) or RDMA device name (`mlx5_0`).
    pub name: String,
    /// Its NUMA node, if it has one.
    pub node: Option<usize>,
}

/// The machine's topology, reduced to what placement needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Topology {
    /// What it was read from.
    pub source: String,
    /// Packages (sockets).
    pub packages: usize,
    /// Cores.
    pub cores: usize,
    /// Processing units (hardware threads).
    pub pus: usize,
    /// NUMA nodes, by OS index.
    pub nodes: Vec<Node>,
    /// Network and RDMA devices.
    pub nics: Vec<Nic>,
}

fn hw<E: std::fmt::Display>(e: E) -> NumaError {
    NumaError::Hwloc(e.to_string())
}

impl Topology {
    /// Reads the topology from `src` with hwloc.
    pub fn load(src: &TopologySource) -> Result<Topology, NumaError> {
        let (t, name) = build_hwloc(src)?;
        let count = |ty| t.objects_with_type(ty).count();
        // Network devices come from sysfs on a live system (see `build_hwloc`), from the file
        // otherwise.
        let nics = if *src == TopologySource::System {
            sysfs_nics()
        } else {
            hwloc_nics(&t)
        };
        Ok(Topology {
            source: name,
            packages: count(ObjectType::Package),
            cores: count(ObjectType::Core),
            pus: count(ObjectType::PU),
            nodes: hwloc_nodes(&t),
            nics,
        })
    }

    /// One node holding every CPU: the fallback when hwloc or NUMA is missing.
    pub fn flat(why: &str) -> Topology {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        Topology {
            source: format!("flat ({why})"),
            packages: 1,
            cores: n,
            pus: n,
            nodes: vec![Node {
                os_index: 0,
                package: Some(0),
                cpus: (0..n).collect(),
                memory: 0,
            }],
            nics: Vec::new(),
        }
    }

    /// This machine's topology, or a flat one (with the reason) when hwloc cannot tell.
    pub fn detect() -> (Topology, Option<String>) {
        match Topology::load(&TopologySource::System) {
            Ok(t) if !t.nodes.is_empty() && t.nodes.iter().all(|n| !n.cpus.is_empty()) => (t, None),
            Ok(_) => {
                let why = "hwloc found no NUMA node with CPUs".to_string();
                (Topology::flat(&why), Some(why))
            }
            Err(e) => {
                let why = e.to_string();
                (Topology::flat(&why), Some(why))
            }
        }
    }

    /// This machine's topology, detected once per process and kept: loading it costs
    /// milliseconds that a migration's setup should not pay, so an embedder may call this at
    /// start-up to have it ready.
    pub fn system() -> &'static (Topology, Option<String>) {
        static SYSTEM: std::sync::OnceLock<(Topology, Option<String>)> = std::sync::OnceLock::new();
        SYSTEM.get_or_init(Topology::detect)
    }

    /// The NUMA node of network or RDMA device `name`.
    pub fn nic_node(&self, name: &str) -> Option<usize> {
        self.nics
            .iter()
            .find(|n| n.name == name)
            .and_then(|n| n.node)
    }

    /// The node of CPU `cpu`.
    pub fn node_of_cpu(&self, cpu: usize) -> Option<usize> {
        self.nodes
            .iter()
            .find(|n| n.cpus.contains(&cpu))
            .map(|n| n.os_index)
    }

    /// The node with OS index `os_index`.
    pub fn node(&self, os_index: usize) -> Option<&Node> {
        self.nodes.iter().find(|n| n.os_index == os_index)
    }
}

impl std::fmt::Display for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "topology ({}): {} package(s), {} NUMA node(s), {} core(s), {} PU(s)",
            self.source,
            self.packages,
            self.nodes.len(),
            self.cores,
            self.pus
        )?;
        for n in &self.nodes {
            writeln!(
                f,
                "  node {}: package {}, CPUs {:?}, {} MiB",
                n.os_index,
                n.package.map_or("?".into(), |p| p.to_string()),
                n.cpus,
                n.memory >> 20
            )?;
        }
        for n in &self.nics {
            writeln!(
                f,
                "  device {}: node {}",
                n.name,
                n.node.map_or("none".into(), |x| x.to_string())
            )?;
        }
        Ok(())
    }
}

/// Builds the hwloc topology `src` names, with a name saying where it came from.
fn build_hwloc(src: &TopologySource) -> Result<(hwlocality::Topology, String), NumaError> {
    let b = hwlocality::Topology::builder();
    let (b, name) = match src {
        TopologySource::System => (b, "hwloc".to_string()),
        TopologySource::Xml(p) => {
            let xml = std::fs::read_to_string(p).map_err(|err| NumaError::Io {
                path: p.display().to_string(),
                err,
            })?;
            (
                b.from_xml(&xml).map_err(hw)?,
                format!("hwloc-xml {}", p.display()),
            )
        }
        TopologySource::Synthetic(s) => (
            b.from_synthetic(s).map_err(hw)?,
            format!("hwloc-synthetic {s}"),
        ),
    };
    // I/O discovery on a live system goes through plugins (PCI, udev) that leak; sysfs
    // tells the same for network devices. Files carry their I/O objects with them.
    let b = if *src == TopologySource::System {
        b
    } else {
        b.with_io_type_filter(TypeFilter::KeepImportant)
            .map_err(hw)?
    };
    Ok((b.build().map_err(hw)?, name))
}

/// The NUMA nodes of `t`, by OS index, each with its CPUs, package and memory.
fn hwloc_nodes(t: &hwlocality::Topology) -> Vec<Node> {
    let mut nodes: Vec<Node> = t
        .objects_with_type(ObjectType::NUMANode)
        .map(|n| {
            let cpus = n
                .cpuset()
                .map(|c| c.iter_set().map(usize::from).collect())
                .unwrap_or_default();
            let mut package = None;
            let mut a = n.parent();
            while let Some(o) = a {
                if o.object_type() == ObjectType::Package {
                    package = o.os_index();
                    break;
                }
                a = o.parent();
            }
            Node {
                os_index: n.os_index().unwrap_or(0),
                package,
                cpus,
                memory: n.total_memory(),
            }
        })
        .collect();
    nodes.sort_by_key(|n| n.os_index);
    nodes
}

/// The network and RDMA devices hwloc found in `t`, each with the one node it is local to.
fn hwloc_nics(t: &hwlocality::Topology) -> Vec<Nic> {
    t.objects_with_type(ObjectType::OSDevice)
        .filter(|o| {
            matches!(
                o.attributes(),
                Some(ObjectAttributes::OSDevice(d))
                    if matches!(d.device_type(), OSDeviceType::Network | OSDeviceType::OpenFabrics)
            )
        })
        .map(|o| {
            let node = o
                .first_non_io_ancestor()
                .and_then(|a| a.nodeset())
                .and_then(|ns| {
                    // A device local to exactly one node.
                    (ns.weight() == Some(1))
                        .then(|| ns.first_set().map(usize::from))
                        .flatten()
                });
            Nic {
                name: o
                    .name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                node,
            }
        })
        .collect()
}

/// Network and RDMA devices of this machine with their NUMA nodes, from sysfs.
fn sysfs_nics() -> Vec<Nic> {
    let mut out = Vec::new();
    for class in ["/sys/class/net", "/sys/class/infiniband"] {
        let Ok(dir) = std::fs::read_dir(class) else {
            continue;
        };
        for e in dir.flatten() {
            let numa = e.path().join("device/numa_node");
            let Ok(text) = std::fs::read_to_string(&numa) else {
                continue;
            };
            let node = text
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|&n| n >= 0)
                .map(|n| n as usize);
            out.push(Nic {
                name: e.file_name().to_string_lossy().into_owned(),
                node,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The name of the local network interface that holds address `ip` (`None` if none does).
pub fn netdev_of(ip: std::net::IpAddr) -> Option<String> {
    let mut ifa: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifa` with a list that we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut ifa) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = ifa;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let i = unsafe { &*cur };
        cur = i.ifa_next;
        if i.ifa_addr.is_null() || i.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a non-null ifa_addr points to a sockaddr whose family says its real type.
        let addr = unsafe {
            match (*i.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let a = &*(i.ifa_addr as *const libc::sockaddr_in);
                    Some(std::net::IpAddr::from(
                        u32::from_be(a.sin_addr.s_addr).to_be_bytes(),
                    ))
                }
                libc::AF_INET6 => {
                    let a = &*(i.ifa_addr as *const libc::sockaddr_in6);
                    Some(std::net::IpAddr::from(a.sin6_addr.s6_addr))
                }
                _ => None,
            }
        };
        if addr == Some(ip) {
            // SAFETY: ifa_name is a NUL-terminated string inside the list.
            found = Some(
                unsafe { std::ffi::CStr::from_ptr(i.ifa_name) }
                    .to_string_lossy()
                    .into_owned(),
            );
            break;
        }
    }
    // SAFETY: frees the list getifaddrs allocated; no pointer into it is used afterwards.
    unsafe { libc::freeifaddrs(ifa) };
    found
}
