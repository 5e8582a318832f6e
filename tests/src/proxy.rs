//! A relay between a source and a destination that breaks the link at a chosen point of the
//! protocol, for fault tests.
//!
//! The source connects to the relay instead of the destination. The first connection is the
//! control connection: the relay parses its frames (length prefix, then a type byte) in both
//! directions. The others are data lanes, forwarded as bytes. When the trigger fires (a frame
//! of a given type has just been forwarded in a given direction, or a number of lane bytes has
//! reached the destination), the relay either cuts every connection at once (what a process
//! that dies looks like: both ends see the connection end) or freezes them (what `kill -STOP`
//! or a silent network looks like: nothing more passes, nothing ends).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// When the relay breaks the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Right after the `nth` (from 1) control frame of this type byte has been forwarded;
    /// `to_dest` says in which direction.
    Frame {
        /// Source to destination (else destination to source).
        to_dest: bool,
        /// The frame's type byte.
        tag: u8,
        /// Which occurrence.
        nth: u32,
    },
    /// Once this many bytes have gone to the destination on the data lanes.
    LaneBytes(u64),
    /// Never.
    Never,
}

/// What the relay does when the trigger fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Break {
    /// Shut every connection down, both ways, and refuse new ones.
    Cut,
    /// Forward nothing more, but keep every connection open.
    Freeze,
    /// Forward nothing for this long (new connections wait too), then reset the connections
    /// that were open when it began and forward normally: a link that comes back after the
    /// ends gave up on their connections.
    Outage(Duration),
    /// Reset every open connection once (`ss -K`); new connections pass.
    Reset,
}

/// One relayed connection: both sockets, and whether the relay has ended it.
struct Conn {
    sockets: [TcpStream; 2],
    dead: Arc<AtomicBool>,
}

impl Conn {
    fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        for s in &self.sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

struct State {
    trigger: Trigger,
    action: Break,
    fired: AtomicBool,
    fired_at: Mutex<Option<Instant>>,
    lane_bytes: AtomicU64,
    /// Frames of the trigger's type seen in the trigger's direction.
    seen: AtomicU64,
    conns: Mutex<Vec<Conn>>,
    stop: AtomicBool,
    /// End of an outage in progress.
    outage_until: Mutex<Option<Instant>>,
}

impl State {
    fn fire(self: &Arc<Self>) {
        if self.fired.swap(true, Ordering::AcqRel) {
            return;
        }
        let now = Instant::now();
        *self.fired_at.lock().unwrap() = Some(now);
        match self.action {
            Break::Cut | Break::Reset => self.conns.lock().unwrap().iter().for_each(Conn::kill),
            Break::Freeze => {}
            Break::Outage(d) => {
                *self.outage_until.lock().unwrap() = Some(now + d);
                let old: Vec<Arc<AtomicBool>> = self
                    .conns
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|c| c.dead.clone())
                    .collect();
                let st = self.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(d);
                    for c in st.conns.lock().unwrap().iter() {
                        if old.iter().any(|o| Arc::ptr_eq(o, &c.dead)) {
                            c.kill();
                        }
                    }
                });
            }
        }
    }

    /// Whether a connection's data must wait (frozen, or an outage in progress).
    fn held(&self) -> bool {
        if self.stop.load(Ordering::Acquire) {
            return false;
        }
        match self.action {
            Break::Freeze => self.fired.load(Ordering::Acquire),
            Break::Outage(_) => self
                .outage_until
                .lock()
                .unwrap()
                .is_some_and(|t| Instant::now() < t),
            Break::Cut | Break::Reset => false,
        }
    }

    /// Whether a connection may still carry data.
    fn open(&self, dead: &AtomicBool) -> bool {
        !dead.load(Ordering::Acquire)
            && !self.stop.load(Ordering::Acquire)
            && !(self.action == Break::Cut && self.fired.load(Ordering::Acquire))
    }
}

/// A running relay; dropping it closes everything.
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts a relay to `target` that breaks the link as `trigger` and `action` say.
    pub fn start(target: SocketAddr, trigger: Trigger, action: Break) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(State {
            trigger,
            action,
            fired: AtomicBool::new(false),
            fired_at: Mutex::new(None),
            lane_bytes: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            outage_until: Mutex::new(None),
        });
        let st = state.clone();
        let accept = std::thread::spawn(move || accept_loop(listener, target, st));
        Proxy {
            addr,
            state,
            accept: Some(accept),
        }
    }

    /// The address the source should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// When the trigger fired, if it did.
    pub fn fired_at(&self) -> Option<Instant> {
        *self.state.fired_at.lock().unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Release);
        self.state.conns.lock().unwrap().iter().for_each(Conn::kill);
        if let Some(j) = self.accept.take() {
            let _ = j.join();
        }
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, st: Arc<State>) {
    let mut first = true;
    while !st.stop.load(Ordering::Acquire) {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        if st.fired.load(Ordering::Acquire) && st.action == Break::Cut {
            continue; // dropped: the "dead" end refuses
        }
        client.set_nonblocking(false).unwrap();
        let Ok(server) = TcpStream::connect(target) else {
            continue;
        };
        let dead = Arc::new(AtomicBool::new(false));
        st.conns.lock().unwrap().push(Conn {
            sockets: [client.try_clone().unwrap(), server.try_clone().unwrap()],
            dead: dead.clone(),
        });
        // The first connection is the control connection, and so is a later one that opens
        // with a reconnect: their frames are parsed.
        let control = std::mem::take(&mut first) || opens_with_rejoin(&client);
        for (from, to, to_dest) in [
            (
                client.try_clone().unwrap(),
                server.try_clone().unwrap(),
                true,
            ),
            (
                server.try_clone().unwrap(),
                client.try_clone().unwrap(),
                false,
            ),
        ] {
            let (st, dead) = (st.clone(), dead.clone());
            std::thread::spawn(move || pump(from, to, to_dest, control, &st, &dead));
        }
    }
}

/// Whether a new connection's first frame is a reconnect (`Rejoin`, type byte 26); waits
/// briefly for it.
fn opens_with_rejoin(c: &TcpStream) -> bool {
    let mut head = [0u8; 5];
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    let r = c.peek(&mut head);
    let _ = c.set_read_timeout(None);
    matches!(r, Ok(5)) && head[4] == 26
}

/// Forwards one direction of one connection; frames are parsed on the control connection.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    to_dest: bool,
    control: bool,
    st: &Arc<State>,
    dead: &AtomicBool,
) {
    let mut buf = vec![0u8; 64 << 10];
    let mut pending: Vec<u8> = Vec::new();
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 {
            break;
        }
        while st.held() && st.open(dead) {
            std::thread::sleep(Duration::from_millis(10)); // frozen: hold everything
        }
        if !st.open(dead) {
            break;
        }
        if !control {
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            if to_dest {
                let total = st.lane_bytes.fetch_add(n as u64, Ordering::AcqRel) + n as u64;
                if matches!(st.trigger, Trigger::LaneBytes(b) if total >= b) {
                    st.fire();
                }
            }
            continue;
        }
        pending.extend_from_slice(&buf[..n]);
        if !forward_frames(&mut pending, &mut to, to_dest, st, dead) {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Forwards every whole frame in `pending`, firing the trigger after a matching one (and
/// forwarding nothing after it). False when the connection should end.
fn forward_frames(
    pending: &mut Vec<u8>,
    to: &mut TcpStream,
    to_dest: bool,
    st: &Arc<State>,
    dead: &AtomicBool,
) -> bool {
    loop {
        while st.held() && st.open(dead) {
            std::thread::sleep(Duration::from_millis(10)); // hold what was read
        }
        if !st.open(dead) {
            return false;
        }
        if pending.len() < 5 {
            return true;
        }
        let len = u32::from_le_bytes(pending[..4].try_into().unwrap()) as usize;
        if pending.len() < 4 + len {
            return true;
        }
        let tag = pending[4];
        let frame: Vec<u8> = pending.drain(..4 + len).collect();
        if to.write_all(&frame).is_err() {
            return false;
        }
        if let Trigger::Frame {
            to_dest: d,
            tag: t,
            nth,
        } = st.trigger
        {
            if d == to_dest && t == tag && st.seen.fetch_add(1, Ordering::AcqRel) + 1 == nth as u64
            {
                st.fire();
                continue;
            }
        }
    }
}
