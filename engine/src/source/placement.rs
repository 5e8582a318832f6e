//! NUMA placement of a source's lanes: the plan, the work queues it implies, and what the
//! lanes actually did.

use std::net::IpAddr;

use rmig_numa::{region_spans, Plan, Topology};

use crate::config::NumaMode;
use crate::region::Region;
use crate::stats::{LaneObserved, NumaReport};

/// Probe one page in this many when looking for a region's nodes.
const SAMPLE_PAGES: u64 = 64;

pub(crate) struct Placement {
    pub topo: Topology,
    pub plan: Plan,
    pub pin: bool,
    nic: Option<String>,
    fallback: Option<String>,
    /// Queue 0 is shared; queue k serves node `queue_nodes[k - 1]`.
    queue_nodes: Vec<usize>,
}

impl Placement {
    pub fn new(
        mode: NumaMode,
        regions: &[Region],
        lanes: usize,
        local: Option<IpAddr>,
    ) -> Placement {
        let (topo, fallback) = match mode {
            NumaMode::Off => (Topology::flat("placement off"), None),
            NumaMode::Auto => Topology::system().clone(),
        };
        let spans: Vec<_> = if mode == NumaMode::Auto {
            regions
                .iter()
                .enumerate()
                .flat_map(|(i, r)| {
                    region_spans(
                        i as u32,
                        r.mem.as_ptr(),
                        r.len() as usize,
                        r.page_size() as usize,
                        SAMPLE_PAGES,
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        let nic = local.and_then(rmig_numa::netdev_of);
        let nic_node = nic.as_deref().and_then(|n| topo.nic_node(n));
        let plan = Plan::build(&topo, lanes, &spans, nic_node);
        let mut queue_nodes: Vec<usize> = plan.lanes.iter().map(|l| l.node).collect();
        queue_nodes.dedup();
        queue_nodes.sort_unstable();
        queue_nodes.dedup();
        Placement {
            pin: mode == NumaMode::Auto && fallback.is_none(),
            topo,
            plan,
            nic,
            fallback,
            queue_nodes,
        }
    }

    /// Number of work queues per round.
    pub fn queues(&self) -> usize {
        self.queue_nodes.len() + 1
    }

    /// The queue for work on `node` (0, the shared one, when no lane sits there).
    pub fn queue_of(&self, node: Option<usize>) -> usize {
        node.and_then(|n| self.queue_nodes.iter().position(|&q| q == n))
            .map_or(0, |i| i + 1)
    }

    /// The page spans `[first, end)` of region `region` (`pages` long) with the node each sits
    /// on, as planned; the whole region on no node when the plan has none of it.
    pub fn spans_of(&self, region: u32, pages: u64) -> Vec<(u64, u64, Option<usize>)> {
        let mut spans: Vec<_> = self
            .plan
            .spans
            .iter()
            .filter(|a| a.span.region == region)
            .map(|a| {
                (
                    a.span.first_page,
                    a.span.first_page + a.span.npages,
                    a.span.node,
                )
            })
            .collect();
        if spans.is_empty() {
            spans.push((0, pages, None));
        }
        spans
    }

    /// The order in which lane `lane` takes from the queues: its node's, the shared one, the
    /// others'.
    pub fn order_for(&self, lane: usize) -> Vec<usize> {
        let own = self
            .plan
            .lanes
            .get(lane)
            .map(|l| self.queue_of(Some(l.node)))
            .unwrap_or(0);
        let mut o = vec![own];
        for q in 0..self.queues() {
            if !o.contains(&q) {
                o.push(q);
            }
        }
        o
    }

    /// The CPUs lane `lane` is pinned to (none: anywhere).
    pub fn cpus_for(&self, lane: usize) -> Vec<usize> {
        if !self.pin {
            return Vec::new();
        }
        self.plan
            .lanes
            .get(lane)
            .map(|l| l.cpus.clone())
            .unwrap_or_default()
    }

    /// The report for the statistics, with the CPUs each lane was seen on.
    pub fn report(&self, seen: &[Vec<usize>]) -> NumaReport {
        NumaReport {
            topology: self.topo.source.clone(),
            nodes: self.topo.nodes.len(),
            nic: self.nic.clone(),
            fallback: self.fallback.clone(),
            plan: self.plan.clone(),
            observed: self
                .plan
                .lanes
                .iter()
                .map(|l| {
                    let cpus = seen.get(l.lane).cloned().unwrap_or_default();
                    let mut nodes: Vec<usize> = cpus
                        .iter()
                        .filter_map(|&c| self.topo.node_of_cpu(c))
                        .collect();
                    nodes.sort_unstable();
                    nodes.dedup();
                    LaneObserved {
                        lane: l.lane,
                        planned_node: l.node,
                        cpus,
                        nodes,
                    }
                })
                .collect(),
        }
    }
}
