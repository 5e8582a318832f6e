//! Where a region's pages really are: the kernel's answer through `move_pages(2)`.

use serde::Serialize;

/// A span of a region's pages that sit on one NUMA node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemSpan {
    /// Region number in table order.
    pub region: u32,
    /// First page of the span, in the region's page size.
    pub first_page: u64,
    /// Pages in the span.
    pub npages: u64,
    /// The node, or `None` where the pages are not populated yet.
    pub node: Option<usize>,
}

/// Pages probed per `move_pages` call.
const BATCH: usize = 4096;

/// The node of each page at `addrs` (`None` where not populated or unknown).
fn nodes_of(addrs: &[*mut libc::c_void]) -> Vec<Option<usize>> {
    let mut status = vec![0i32; addrs.len()];
    // SAFETY: move_pages with a NULL `nodes` array only reports where the given pages of this
    // process are (it moves nothing); `addrs` and `status` hold `addrs.len()` entries each.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            addrs.len() as libc::c_ulong,
            addrs.as_ptr(),
            std::ptr::null::<i32>(),
            status.as_mut_ptr(),
            0,
        )
    };
    if r != 0 {
        return vec![None; addrs.len()];
    }
    status
        .into_iter()
        .map(|s| (s >= 0).then_some(s as usize))
        .collect()
}

/// Splits region `region` (`len` bytes at `ptr`, pages of `page_size`) into spans by NUMA node,
/// probing one page in every `sample_pages`. A span's boundaries are exact to the sample.
pub fn region_spans(
    region: u32,
    ptr: *const u8,
    len: usize,
    page_size: usize,
    sample_pages: u64,
) -> Vec<MemSpan> {
    let pages = (len / page_size) as u64;
    let step = sample_pages.max(1);
    let samples: Vec<u64> = (0..pages).step_by(step as usize).collect();
    let mut nodes = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(BATCH) {
        let addrs: Vec<*mut libc::c_void> = chunk
            .iter()
            .map(|&p| ptr.wrapping_add(p as usize * page_size) as *mut libc::c_void)
            .collect();
        nodes.extend(nodes_of(&addrs));
    }
    let mut spans: Vec<MemSpan> = Vec::new();
    for (i, (&p, node)) in samples.iter().zip(nodes).enumerate() {
        let end = samples.get(i + 1).copied().unwrap_or(pages);
        match spans.last_mut() {
            Some(s) if s.node == node => s.npages = end - s.first_page,
            _ => spans.push(MemSpan {
                region,
                first_page: p,
                npages: end - p,
                node,
            }),
        }
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn populated_memory_is_on_a_node_and_spans_cover_the_region() {
        let mut v = vec![1u8; 8 << 20];
        let p = v.as_mut_ptr();
        let spans = region_spans(3, p, v.len(), 4096, 64);
        assert_eq!(
            spans.iter().map(|s| s.npages).sum::<u64>(),
            (8 << 20) / 4096
        );
        assert!(spans.iter().all(|s| s.region == 3));
        // This process's populated memory is on some node (node 0 on a one-node machine).
        assert!(spans.iter().any(|s| s.node.is_some()), "{spans:?}");
    }
}
