//! What both kinds of source lane do with the destination's replies on the lane socket: a
//! helper thread reads them as fixed-size records until the socket ends, so that sending never
//! waits for them, and leaves the reason it stopped for the sender to report.

use std::io::Read;
use std::net::TcpStream;
use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the state over from a thread that panicked while holding it (reply state
/// is plain counters, valid after any panic).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads `N`-byte records from `rd` and hands each to `on` until the socket ends or fails, or
/// `on` refuses a record; returns why it stopped.
pub(crate) fn read_records<const N: usize>(
    rd: &mut TcpStream,
    mut on: impl FnMut(&[u8; N]) -> Result<(), String>,
) -> String {
    let mut b = [0u8; N];
    loop {
        match rd.read_exact(&mut b) {
            Ok(()) => {
                if let Err(e) = on(&b) {
                    return e;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return "peer closed the lane".to_string()
            }
            Err(e) => return e.to_string(),
        }
    }
}
