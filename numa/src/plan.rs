//! The placement plan: which lane runs on which node and which memory it serves, as a plain
//! value that can be printed, compared in tests and reported with the statistics.
//!
//! On TCP a lane's thread scans, hashes and sends its pages, so lanes go where the memory is:
//! each node that holds guest memory gets lanes in proportion to its share (at least one each
//! when there are enough lanes), lanes left over go to the NIC's node, and every span of memory
//! is served first by the lanes of its own node. Memory whose node is unknown (not populated
//! yet) is served by every lane. When all memory sits on the NIC's node, everything runs
//! there.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{MemSpan, Topology};

/// Where one lane runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LanePlacement {
    /// Lane number.
    pub lane: usize,
    /// Its NUMA node.
    pub node: usize,
    /// The CPUs it may run on (its node's).
    pub cpus: Vec<usize>,
}

/// Which lanes serve a span of memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpanAssignment {
    /// The memory.
    pub span: MemSpan,
    /// Lanes that serve it first.
    pub lanes: Vec<usize>,
}

/// A placement plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The NIC's node, if known.
    pub nic_node: Option<usize>,
    /// Every lane, in lane order.
    pub lanes: Vec<LanePlacement>,
    /// Every span, in memory order.
    pub spans: Vec<SpanAssignment>,
}

impl Plan {
    /// Plans `lanes` lanes over `topo` for memory `spans` and a NIC on `nic_node`.
    pub fn build(
        topo: &Topology,
        lanes: usize,
        spans: &[MemSpan],
        nic_node: Option<usize>,
    ) -> Plan {
        let lanes = lanes.max(1);
        let known = |n: usize| topo.node(n).is_some_and(|x| !x.cpus.is_empty());
        let nic_node = nic_node.filter(|&n| known(n));
        let mut weight: BTreeMap<usize, u64> = BTreeMap::new();
        for s in spans {
            if let Some(n) = s.node.filter(|&n| known(n)) {
                *weight.entry(n).or_default() += s.npages;
            }
        }
        if weight.is_empty() {
            match nic_node {
                Some(n) => {
                    weight.insert(n, 1);
                }
                None => {
                    for n in topo.nodes.iter().filter(|n| !n.cpus.is_empty()) {
                        weight.insert(n.os_index, 1);
                    }
                }
            }
        }
        // Nodes in preference order: the NIC's first, then by memory, then by number.
        let mut order: Vec<(usize, u64)> = weight.into_iter().collect();
        order.sort_by_key(|&(n, w)| (Some(n) != nic_node, std::cmp::Reverse(w), n));
        let mut count: Vec<usize> = vec![0; order.len()];
        for c in count.iter_mut().take(lanes) {
            *c = 1;
        }
        // The rest by highest averages (D'Hondt): proportional, deterministic.
        for _ in order.len().min(lanes)..lanes {
            let (i, _) = order
                .iter()
                .enumerate()
                .map(|(i, &(_, w))| (i, w as f64 / (count[i] + 1) as f64))
                .fold((0, f64::MIN), |best, x| if x.1 > best.1 { x } else { best });
            count[i] += 1;
        }
        let mut placements = Vec::new();
        for (i, &(node, _)) in order.iter().enumerate() {
            let cpus = topo.node(node).map(|n| n.cpus.clone()).unwrap_or_default();
            for _ in 0..count[i] {
                placements.push(LanePlacement {
                    lane: placements.len(),
                    node,
                    cpus: cpus.clone(),
                });
            }
        }
        let all: Vec<usize> = (0..placements.len()).collect();
        let spans = spans
            .iter()
            .map(|s| {
                let local: Vec<usize> = placements
                    .iter()
                    .filter(|l| Some(l.node) == s.node)
                    .map(|l| l.lane)
                    .collect();
                SpanAssignment {
                    span: *s,
                    lanes: if local.is_empty() { all.clone() } else { local },
                }
            })
            .collect();
        Plan {
            nic_node,
            lanes: placements,
            spans,
        }
    }

    /// Lanes placed on `node`.
    pub fn lanes_on(&self, node: usize) -> Vec<usize> {
        self.lanes
            .iter()
            .filter(|l| l.node == node)
            .map(|l| l.lane)
            .collect()
    }
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "plan: {} lane(s), NIC on node {}",
            self.lanes.len(),
            self.nic_node.map_or("unknown".into(), |n| n.to_string())
        )?;
        for l in &self.lanes {
            writeln!(
                f,
                "  lane {} on node {} (CPUs {:?})",
                l.lane, l.node, l.cpus
            )?;
        }
        for s in &self.spans {
            writeln!(
                f,
                "  region {} pages {}..{} on node {}: lanes {:?}",
                s.span.region,
                s.span.first_page,
                s.span.first_page + s.span.npages,
                s.span.node.map_or("?".into(), |n| n.to_string()),
                s.lanes
            )?;
        }
        Ok(())
    }
}
