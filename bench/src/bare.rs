//! `bare`: the honest TCP limit of this machine for a migration-sized transfer.
//!
//! rmig's rate means little without the rate of the simplest program that moves the same
//! bytes the same way: N bytes of guest-like memory into another mapping over the same number
//! of loopback TCP connections, one thread per connection doing plain large `write`s and
//! `read`s straight from and into the memory, with no checksums, no pages, no rounds. The
//! only protocol is a 4-byte connection index, so that each receiver knows its slice.
//!
//! Memory is far larger than the caches, so it is cold in the cache sense (iperf3's buffer
//! stays in cache), whichever mode runs. By default it is also *unfaulted* (freshly mapped,
//! never touched): the receiver pays the page faults of first touch inside the transfer, as a
//! real destination without preallocation does, and that cost is large on some hosts.
//! `--prefault` faults both mappings in first (and
//! asks for huge pages, as `loopback` does for memory it faults in beforehand), which is what
//! `rmig-bench loopback` measures by default (source filled, destination preallocated).

use std::hash::Hasher;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::args::BareArgs;
use crate::mem::{self, Fill, Mapping};
use crate::parse;

/// How long any one connection, read or write may stall before the run fails.
const STALL: Duration = Duration::from_secs(60);

/// The result of one bare transfer, as `--json` prints it.
#[derive(serde::Serialize)]
struct BareResult {
    mode: &'static str,
    bytes: u64,
    connections: usize,
    /// `unfaulted` (neither mapping touched before the transfer) or `prefaulted` (both).
    memory: &'static str,
    /// Whether the source was filled with random bytes (`--check`), which touches it.
    source_filled: bool,
    seconds: f64,
    /// Bytes per second.
    data_rate: f64,
    source_hash: Option<String>,
    dest_hash: Option<String>,
    memory_equal: Option<bool>,
}

/// Runs `rmig-bench bare`.
pub fn bare(a: &BareArgs) -> Result<()> {
    let len = usize::try_from(a.size).context("--size does not fit this machine")?;
    let lanes = a.lanes.map_or_else(
        || crate::args::default_lanes(thread::available_parallelism().map_or(1, |n| n.get())),
        usize::from,
    );
    let mut src = Mapping::new(len, a.prefault, a.prefault)?;
    let mut dst = Mapping::new(len, a.prefault, a.prefault)?;
    if a.check {
        mem::fill(src.bytes_mut(), 4096, Fill::Random, 0.0, a.seed);
    }
    let (secs, connections) = transfer(src.bytes(), dst.bytes_mut(), lanes)?;
    let (source_hash, dest_hash, memory_equal) = if a.check {
        let (h1, h2) = (hash(src.bytes()), hash(dst.bytes()));
        (Some(h1), Some(h2), Some(src.bytes() == dst.bytes()))
    } else {
        (None, None, None)
    };
    let r = BareResult {
        mode: "bare",
        bytes: a.size,
        connections,
        memory: if a.prefault {
            "prefaulted"
        } else {
            "unfaulted"
        },
        source_filled: a.check,
        seconds: secs,
        data_rate: a.size as f64 / secs,
        source_hash,
        dest_hash,
        memory_equal,
    };
    print(&r, a.json)?;
    if r.memory_equal == Some(false) {
        bail!("the destination's bytes differ from the source's");
    }
    Ok(())
}

fn print(r: &BareResult, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    let memory = if r.memory == "prefaulted" {
        "prefaulted (both ends)"
    } else if r.source_filled {
        "source filled for --check, destination unfaulted"
    } else {
        "unfaulted (neither end touched before)"
    };
    println!(
        "bare TCP: {} over {} connections in {:.3} s: {}",
        parse::iec(r.bytes),
        r.connections,
        r.seconds,
        parse::si_rate(r.data_rate)
    );
    println!("memory: {memory}");
    if let (Some(s), Some(d), Some(eq)) = (&r.source_hash, &r.dest_hash, r.memory_equal) {
        println!("hash: source {s}, destination {d}, equal {eq}");
    }
    Ok(())
}

/// FNV-1a over the bytes, as 16 hex digits: enough to show two ends agree.
fn hash(b: &[u8]) -> String {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    h.write(b);
    format!("{:016x}", h.finish())
}

/// 64-bit FNV-1a, eight bytes at a time (a fingerprint, not a security measure).
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let v = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
            self.0 = (self.0 ^ v).wrapping_mul(0x0000_0100_0000_01b3);
        }
        for &b in words.remainder() {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Moves `src` into `dst` over `lanes` loopback connections; returns the seconds from the
/// first connect to the last byte received, and the number of connections used.
fn transfer(src: &[u8], dst: &mut [u8], lanes: usize) -> Result<(f64, usize)> {
    if src.is_empty() {
        bail!("nothing to transfer (--size 0)");
    }
    let chunk = src.len().div_ceil(lanes.max(1));
    let slots: Vec<Mutex<Option<&mut [u8]>>> =
        dst.chunks_mut(chunk).map(|c| Mutex::new(Some(c))).collect();
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    let addr = listener.local_addr()?;
    let t = Instant::now();
    let results: Vec<Result<()>> = thread::scope(|s| {
        let mut handles = Vec::new();
        for (i, part) in src.chunks(chunk).enumerate() {
            handles.push(s.spawn(move || send(addr, i, part)));
        }
        match accept_all(&listener, slots.len()) {
            Ok(streams) => {
                for st in streams {
                    let slots = &slots;
                    handles.push(s.spawn(move || receive(st, slots)));
                }
            }
            Err(e) => return vec![Err(e)],
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a thread panicked")))
            })
            .collect()
    });
    let secs = t.elapsed().as_secs_f64();
    for r in results {
        r?;
    }
    Ok((secs, slots.len()))
}

/// Accepts `n` connections, failing if they do not all arrive within [`STALL`].
fn accept_all(listener: &TcpListener, n: usize) -> Result<Vec<TcpStream>> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + STALL;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match listener.accept() {
            Ok((st, _)) => {
                st.set_nonblocking(false)?;
                out.push(st);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).context("accepting the bare transfer's connections"),
        }
    }
    Ok(out)
}

fn send(addr: SocketAddr, index: usize, part: &[u8]) -> Result<()> {
    let mut st = TcpStream::connect_timeout(&addr, STALL).context("connecting")?;
    st.set_write_timeout(Some(STALL))?;
    let index = u32::try_from(index).context("too many connections")?;
    st.write_all(&index.to_le_bytes())?;
    st.write_all(part).context("sending")
}

fn receive(mut st: TcpStream, slots: &[Mutex<Option<&mut [u8]>>]) -> Result<()> {
    st.set_read_timeout(Some(STALL))?;
    let mut index = [0u8; 4];
    st.read_exact(&mut index)?;
    let i = u32::from_le_bytes(index) as usize;
    let slot = slots
        .get(i)
        .ok_or_else(|| anyhow!("bad connection index {i}"))?;
    let part = slot
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .ok_or_else(|| anyhow!("connection index {i} came twice"))?;
    st.read_exact(part).context("receiving")
}
