//! `rmig-bench topology`: the machine's NUMA layout and the plan a migration would follow.

use anyhow::Result;
use rmig_engine::PAGE_4K;

use crate::args::{topology_usage, TopologyArgs};

/// Prints the topology and the plan for `a`; a memory node the machine lacks is a usage
/// error (exit 2), found before anything is planned.
pub fn topology(a: TopologyArgs) -> Result<()> {
    use rmig_numa::{MemSpan, Plan, Topology, TopologySource};
    let (topo, why) = match (&a.hwloc_xml, &a.hwloc_synthetic) {
        (Some(x), _) => (Topology::load(&TopologySource::Xml(x.clone()))?, None),
        (_, Some(s)) => (Topology::load(&TopologySource::Synthetic(s.clone()))?, None),
        _ => Topology::detect(),
    };
    if let Some(n) = a.memory_node {
        let have: Vec<usize> = topo.nodes.iter().map(|n| n.os_index).collect();
        if !have.contains(&n) {
            topology_usage(format!(
                "--memory-node {n}: this topology has no node {n} (its nodes: {have:?})"
            ))
            .exit();
        }
    }
    let pages = a.size / PAGE_4K;
    let spans: Vec<MemSpan> = match a.memory_node {
        Some(n) => vec![MemSpan {
            region: 0,
            first_page: 0,
            npages: pages,
            node: Some(n),
        }],
        None => {
            let k = topo.nodes.len().max(1) as u64;
            topo.nodes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let first = pages * i as u64 / k;
                    MemSpan {
                        region: 0,
                        first_page: first,
                        npages: pages * (i as u64 + 1) / k - first,
                        node: Some(n.os_index),
                    }
                })
                .collect()
        }
    };
    let lanes = a
        .lanes
        .map(usize::from)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let nic_node = a.nic.as_deref().and_then(|n| topo.nic_node(n));
    let plan = Plan::build(&topo, lanes, &spans, nic_node);
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "topology": topo, "fallback": why, "plan": plan })
        );
    } else {
        if let Some(w) = why {
            println!("NUMA: falling back to a flat pool: {w}");
        }
        print!("{topo}{plan}");
    }
    Ok(())
}
