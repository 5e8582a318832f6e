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
//!
//! A [`LaneFault`] breaks one data lane alone, the rest of the session carrying on: its
//! destination end closes, or stays connected and never acknowledges.

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

/// What the relay does to one data lane (see [`LaneFault`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneBreak {
    /// The destination's end closes the lane: the connection is shut down both ways.
    PeerCloses,
    /// The destination stays connected and keeps taking the lane's data, but none of what it
    /// sends back (its acknowledgements) reaches the source.
    NeverAcks,
}

/// A fault on one data lane, the other connections going on as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneFault {
    /// Which lane, from 0, in the order lanes connect (a source joins them in lane order).
    pub lane: usize,
    /// Bytes of the lane's connection (its join message included) that reach the destination
    /// before the fault.
    pub after: u64,
    /// What happens then.
    pub action: LaneBreak,
}

/// The connection a [`LaneFault`] applies to.
struct FaultyConn {
    fault: LaneFault,
    /// Bytes forwarded to the destination.
    sent: AtomicU64,
    fired: AtomicBool,
    /// The source's end and the destination's, to shut down.
    ends: [TcpStream; 2],
}

impl FaultyConn {
    /// Counts `n` more bytes forwarded to the destination; breaks the lane once there are
    /// enough.
    fn forwarded(&self, n: usize) {
        let sent = self.sent.fetch_add(n as u64, Ordering::AcqRel) + n as u64;
        if sent < self.fault.after || self.fired.swap(true, Ordering::AcqRel) {
            return;
        }
        if self.fault.action == LaneBreak::PeerCloses {
            for e in &self.ends {
                let _ = e.shutdown(Shutdown::Both);
            }
        }
    }

    /// Whether what the destination sends is dropped.
    fn muted(&self) -> bool {
        self.fault.action == LaneBreak::NeverAcks && self.fired.load(Ordering::Acquire)
    }
}

struct State {
    trigger: Trigger,
    /// No connection is parsed (an encrypted session's frames cannot be read).
    opaque: bool,
    action: Break,
    lane_fault: Option<LaneFault>,
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
        let cut = self.action == Break::Cut && self.fired.load(Ordering::Acquire);
        !(dead.load(Ordering::Acquire) || self.stop.load(Ordering::Acquire) || cut)
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
        Proxy::spawn(target, trigger, action, None, false)
    }

    /// Starts a relay for an encrypted session, whose frames it cannot read: it breaks the
    /// link once `after_bytes` have gone to the destination on any connection (the control
    /// connection's few bytes count with the lanes').
    pub fn start_opaque(target: SocketAddr, after_bytes: u64, action: Break) -> Proxy {
        Proxy::spawn(target, Trigger::LaneBytes(after_bytes), action, None, true)
    }

    /// Starts a relay to `target` that breaks one data lane as `fault` says, and nothing else.
    pub fn with_lane_fault(target: SocketAddr, fault: LaneFault) -> Proxy {
        Proxy::spawn(target, Trigger::Never, Break::Cut, Some(fault), false)
    }

    fn spawn(
        target: SocketAddr,
        trigger: Trigger,
        action: Break,
        lane_fault: Option<LaneFault>,
        opaque: bool,
    ) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(State {
            trigger,
            opaque,
            action,
            lane_fault,
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
    let mut accepted = 0usize;
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
        // with a reconnect: their frames are parsed. Lane k is the (k + 2)th connection.
        let control = !st.opaque && (accepted == 0 || opens_with_rejoin(&client));
        accepted += 1;
        let faulty = st
            .lane_fault
            .filter(|f| accepted == f.lane + 2)
            .map(|fault| {
                Arc::new(FaultyConn {
                    fault,
                    sent: AtomicU64::new(0),
                    fired: AtomicBool::new(false),
                    ends: [client.try_clone().unwrap(), server.try_clone().unwrap()],
                })
            });
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
            let (st, dead, faulty) = (st.clone(), dead.clone(), faulty.clone());
            std::thread::spawn(move || {
                pump(from, to, to_dest, control, faulty.as_deref(), &st, &dead)
            });
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

/// Forwards one direction of one connection; frames are parsed on the control connection,
/// and `faulty` is the lane fault of this connection, if it has one.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    to_dest: bool,
    control: bool,
    faulty: Option<&FaultyConn>,
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
            if !to_dest && faulty.is_some_and(FaultyConn::muted) {
                continue; // what the destination says is lost
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            if let (true, Some(f)) = (to_dest, faulty) {
                f.forwarded(n);
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
