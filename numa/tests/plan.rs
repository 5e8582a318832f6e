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
    if why.is_none() {
        assert!(t.pus >= 1);
    }
}
