//! A lane whose peer is gone fails with an error, and does not kill the process with SIGPIPE.
//!
//! Rust programs ignore SIGPIPE from `main`, but librmig runs inside a C embedder (QEMU) that
//! may keep the default action, which ends the process. This test binary restores the default
//! action first (it is its own process, so nothing else is affected) and then sends on a lane
//! whose peer has closed: with `writev` the process died here; with `sendmsg(MSG_NOSIGNAL)`
//! the send returns EPIPE/ECONNRESET.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rmig_transport::tcp::TcpSourceLane;
use rmig_transport::{Batch, MemRegion, MemoryMap, Pacer, Run, RunKind, SourceLane};

#[test]
fn sending_to_a_closed_peer_is_an_error_not_a_signal() {
    // SAFETY: restoring the default action of SIGPIPE is async-signal-safe and affects only
    // this test process.
    let old = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    assert_ne!(old, libc::SIG_ERR);
    let mut mem = vec![0x5au64; 256 * 512];
    // SAFETY: `mem` outlives the lane, which is dropped at the end of this test.
    let region = unsafe { MemRegion::new(mem.as_mut_ptr().cast(), mem.len() * 8, 4096) };
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    drop(b);
    let mut lane =
        TcpSourceLane::new(a, MemoryMap::new(vec![region]), Arc::new(Pacer::new(0))).unwrap();
    let batch = Batch {
        seq: 1,
        runs: vec![Run {
            region: 0,
            first_page: 0,
            npages: 256,
            kind: RunKind::Data,
        }],
        data_bytes: 256 * 4096,
    };
    // The first send may still be taken by the kernel (the reset comes back after it); a
    // later one meets the closed connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match lane.send(&batch) {
            Err(e) => break e,
            Ok(_) => {
                assert!(Instant::now() < deadline, "sends never failed");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    assert!(!err.to_string().is_empty());
}
