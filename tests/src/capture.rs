//! A relay that keeps what the source's lanes said first, and the raw peers that misuse it.
//!
//! Hostile joins are only worth testing with the session's real identifiers: a forged MAC on
//! the right session id, a replay of a lane's own `LaneJoin`, a join naming a lane number the
//! source really uses. The source computes those from keys the test never sees, so the test
//! puts this relay between the source and the destination and reads each connection's first
//! frame as it passes; everything after it is forwarded unchanged, both ways.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rmig_engine::protocol::{codec, Message};

/// A relay that forwards every connection to `target` unchanged and keeps the first frame
/// each client sent: the source's own `LaneJoin`s, for a hostile peer to replay or forge.
pub struct Capture {
    addr: SocketAddr,
    first_frames: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Capture {
    /// A relay on `127.0.0.1` in front of `target`.
    pub fn start(target: SocketAddr) -> Capture {
        Capture::start_on("127.0.0.1:0", target)
    }

    /// A relay listening on `bind` (an RDMA device's address, so that the source's control
    /// connection leaves from it and the source opens that device) in front of `target`.
    pub fn start_on(bind: &str, target: SocketAddr) -> Capture {
        let listener = TcpListener::bind(bind).expect("relay bind");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let first_frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (frames, halt) = (first_frames.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            while !halt.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        relay(c, target, &frames);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Capture {
            addr,
            first_frames,
            stop,
            accept: Some(accept),
        }
    }

    /// Where the source should connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The captured `LaneJoin` frames (raw bytes and decoded), in arrival order, waiting up
    /// to `within` for `n` of them.
    pub fn lane_joins_within(&self, n: usize, within: Duration) -> Vec<(Vec<u8>, Message)> {
        let until = Instant::now() + within;
        loop {
            let joins: Vec<_> = self
                .first_frames
                .lock()
                .unwrap()
                .iter()
                .filter_map(|f| match codec::decode(&f[4..]) {
                    Ok(m @ Message::LaneJoin { .. }) => Some((f.clone(), m)),
                    _ => None,
                })
                .collect();
            if joins.len() >= n || Instant::now() > until {
                return joins;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// [`Capture::lane_joins_within`] 10 s.
    pub fn lane_joins(&self, n: usize) -> Vec<(Vec<u8>, Message)> {
        self.lane_joins_within(n, Duration::from_secs(10))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(j) = self.accept.take() {
            let _ = j.join();
        }
    }
}

/// Reads the client's first frame, keeps it, and forwards both ways until either end closes.
fn relay(mut c: TcpStream, target: SocketAddr, frames: &Mutex<Vec<Vec<u8>>>) {
    let mut len = [0u8; 4];
    if c.read_exact(&mut len).is_err() {
        return;
    }
    let mut frame = len.to_vec();
    frame.resize(4 + u32::from_le_bytes(len) as usize, 0);
    if c.read_exact(&mut frame[4..]).is_err() {
        return;
    }
    let Ok(mut up) = TcpStream::connect(target) else {
        return;
    };
    up.write_all(&frame).unwrap();
    frames.lock().unwrap().push(frame);
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        })
    };
    pipe(c.try_clone().unwrap(), up.try_clone().unwrap());
    pipe(up, c);
}

/// Sends `bytes` on a new connection to `addr` and returns what comes back before it closes
/// (within 10 s).
pub fn send_and_read(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back);
    back
}

/// The message of the `Error` frame a refused connection was sent.
pub fn refusal(back: &[u8]) -> String {
    match codec::read_sync(&mut &back[..]) {
        Ok(Message::Error { message }) => message,
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

/// A `LaneJoin` frame.
pub fn lane_join(session: [u8; 16], lane: u16, mac: [u8; 32]) -> Vec<u8> {
    codec::encode(&Message::LaneJoin { session, lane, mac })
}
