//! Placement plans for synthetic topologies, with exact assertions.

use rmig_numa::{MemSpan, Plan, Topology, TopologySource};

fn synthetic(s: &str) -> Topology {
    Topology::load(&TopologySource::Synthetic(s.into())).unwrap()
}

fn span(first: u64, n: u64, node: Option<usize>) -> MemSpan {
    MemSpan {
        region: 0,
        first_page: first,
        npages: n,
        node,
    }
}

fn lane_nodes(p: &Plan) -> Vec<usize> {
    p.lanes.iter().map(|l| l.node).collect()
}

#[test]
fn one_node() {
    let t = synthetic("numa:1 core:4 pu:1");
    assert_eq!((t.packages, t.nodes.len(), t.cores, t.pus), (0, 1, 4, 4));
    let p = Plan::build(&t, 4, &[span(0, 1000, Some(0))], None);
    assert_eq!(lane_nodes(&p), vec![0, 0, 0, 0]);
    assert!(p.lanes.iter().all(|l| l.cpus == vec![0, 1, 2, 3]));
    assert_eq!(p.spans[0].lanes, vec![0, 1, 2, 3]);
}

#[test]
fn two_packages_with_two_nodes_each() {
    let t = synthetic("pack:2 numa:2 core:2 pu:1");
    assert_eq!((t.packages, t.nodes.len(), t.cores, t.pus), (2, 4, 8, 8));
    assert_eq!(t.nodes[2].cpus, vec![4, 5]);
    assert_eq!(t.nodes[2].package, Some(1));
    let spans: Vec<MemSpan> = (0..4)
        .map(|n| span(n * 1000, 1000, Some(n as usize)))
        .collect();
    let p = Plan::build(&t, 6, &spans, None);
    assert_eq!(lane_nodes(&p), vec![0, 0, 1, 1, 2, 3]);
    assert_eq!(p.lanes[4].cpus, vec![4, 5]);
    assert_eq!(p.spans[0].lanes, vec![0, 1]);
    assert_eq!(p.spans[2].lanes, vec![4]);
    assert_eq!(p.spans[3].lanes, vec![5]);
    // Fewer lanes than nodes: the nodes with the most memory get one each.
    let skewed = vec![
        span(0, 100, Some(0)),
        span(100, 5000, Some(3)),
        span(5100, 2000, Some(1)),
    ];
    let p = Plan::build(&t, 2, &skewed, None);
    assert_eq!(lane_nodes(&p), vec![3, 1]);
    assert_eq!(
        p.spans[0].lanes,
        vec![0, 1],
        "a node without a lane is served by all"
    );
    // Memory not populated yet: spread over all nodes.
    let p = Plan::build(&t, 4, &[span(0, 4000, None)], None);
    assert_eq!(lane_nodes(&p), vec![0, 1, 2, 3]);
}

#[test]
fn nic_on_node_1_from_xml() {
    let xml = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/nic-on-node1.xml");
    let t = Topology::load(&TopologySource::Xml(xml.into())).unwrap();
    assert_eq!((t.packages, t.nodes.len(), t.cores, t.pus), (2, 2, 4, 4));
    assert_eq!(t.nic_node("eth1"), Some(1));
    assert_eq!(t.nic_node("eth9"), None);
    let nic = t.nic_node("eth1");
    // Memory not known: everything goes next to the NIC.
    let p = Plan::build(&t, 3, &[span(0, 100, None)], nic);
    assert_eq!(p.nic_node, Some(1));
    assert_eq!(lane_nodes(&p), vec![1, 1, 1]);
    assert!(p.lanes.iter().all(|l| l.cpus == vec![2, 3]));
    // Memory split evenly: the NIC's node comes first and takes the odd lane.
    let p = Plan::build(
        &t,
        3,
        &[span(0, 100, Some(0)), span(100, 100, Some(1))],
        nic,
    );
    assert_eq!(lane_nodes(&p), vec![1, 1, 0]);
    assert_eq!(p.spans[0].lanes, vec![2]);
    assert_eq!(p.spans[1].lanes, vec![0, 1]);
    // All memory on node 0: lanes go to the memory.
    let p = Plan::build(&t, 2, &[span(0, 100, Some(0))], nic);
    assert_eq!(lane_nodes(&p), vec![0, 0]);
    let text = p.to_string();
    assert!(text.contains("lane 0 on node 0 (CPUs [0, 1])"), "{text}");
}

#[test]
fn this_machine_loads_or_falls_back() {
    let (t, why) = Topology::detect();
    assert!(!t.nodes.is_empty());
    assert!(t.nodes.iter().all(|n| !n.cpus.is_empty()), "{t}");
    if let Some(why) = why {
        // Nothing about this machine's NUMA layout can be checked: say so.
        eprintln!("this_machine_loads_or_falls_back: skipped: no NUMA information ({why})");
        assert_eq!(t.nodes.len(), 1, "the fallback is one flat node: {t}");
        return;
    }
    assert!(t.pus >= 1);
    // Every CPU of the machine is on exactly one node.
    let mut cpus: Vec<usize> = t.nodes.iter().flat_map(|n| n.cpus.clone()).collect();
    let n = cpus.len();
    cpus.sort_unstable();
    cpus.dedup();
    assert_eq!(cpus.len(), n, "a CPU on two nodes: {t}");
    assert_eq!(n, t.pus, "{t}");
    for c in cpus {
        assert!(t.node(t.node_of_cpu(c).unwrap()).unwrap().cpus.contains(&c));
    }
}

/// A tiny deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }
}

/// What any plan must do, whatever the heuristic: the lanes asked for, on nodes with CPUs and
/// with those CPUs; every span served by existing lanes, by its own node's lanes when it has
/// any; every node with memory served when there are lanes enough; and lanes beyond each
/// node's first given in proportion to memory (no node could claim another's extra lane by
/// the highest-averages rule).
fn check_properties(t: &Topology, lanes: usize, spans: &[MemSpan], p: &Plan) {
    let ctx = format!("{lanes} lanes over {spans:?}:\n{p}");
    assert_eq!(p.lanes.len(), lanes.max(1), "{ctx}");
    for (i, l) in p.lanes.iter().enumerate() {
        assert_eq!(l.lane, i, "{ctx}");
        assert_eq!(l.cpus, t.node(l.node).unwrap().cpus, "{ctx}");
    }
    assert_eq!(p.spans.len(), spans.len(), "{ctx}");
    let mut weight = std::collections::BTreeMap::<usize, u64>::new();
    for (a, s) in p.spans.iter().zip(spans) {
        assert_eq!(a.span, *s, "{ctx}");
        assert!(!a.lanes.is_empty(), "a span nobody serves: {ctx}");
        assert!(a.lanes.iter().all(|&l| l < p.lanes.len()), "{ctx}");
        let local = s.node.map(|n| p.lanes_on(n)).unwrap_or_default();
        if !local.is_empty() {
            assert_eq!(a.lanes, local, "served by its own node's lanes: {ctx}");
        }
        if let Some(n) = s.node {
            *weight.entry(n).or_default() += s.npages;
        }
    }
    if weight.is_empty() {
        return;
    }
    let count = |n: usize| p.lanes_on(n).len() as f64;
    if lanes >= weight.len() {
        for &n in weight.keys() {
            assert!(count(n) >= 1.0, "node {n} has memory but no lane: {ctx}");
        }
        for l in &p.lanes {
            assert!(
                weight.contains_key(&l.node),
                "a lane far from memory: {ctx}"
            );
        }
    }
    for (&j, &wj) in &weight {
        if count(j) < 2.0 {
            continue;
        }
        for (&i, &wi) in &weight {
            assert!(
                wi as f64 / (count(i) + 1.0) <= wj as f64 / count(j) + 1e-9,
                "node {i} deserved node {j}'s last lane: {ctx}"
            );
        }
    }
}

#[test]
fn plans_have_their_properties_on_random_layouts() {
    let shapes = [
        "numa:1 core:4 pu:1",
        "numa:2 core:2 pu:1",
        "numa:3 core:1 pu:2",
        "pack:2 numa:2 core:2 pu:1",
    ];
    let mut r = Rng(17);
    for shape in shapes {
        let t = synthetic(shape);
        let nodes = t.nodes.len() as u64;
        for _ in 0..200 {
            let lanes = 1 + r.below(12) as usize;
            let mut first = 0;
            let spans: Vec<MemSpan> = (0..1 + r.below(6))
                .map(|_| {
                    let n = 1 + r.below(5000);
                    // Now and then memory whose node is not known.
                    let node = (r.below(5) > 0).then(|| r.below(nodes) as usize);
                    first += n;
                    span(first - n, n, node)
                })
                .collect();
            let nic = (r.below(3) == 0).then(|| r.below(nodes) as usize);
            let p = Plan::build(&t, lanes, &spans, nic);
            check_properties(&t, lanes, &spans, &p);
        }
    }
}
