//! The post-copy fetch lane: the destination asks for the pages its running guest touched
//! and does not hold yet; the source answers each request at once.
//!
//! It is a connection of its own, next to the data lanes, so that an answer never queues
//! behind the megabytes of background pages the data lanes keep in flight: a fault waits for
//! one round trip and its own pages, not for a socket buffer to drain. Requests and answers
//! are small fixed frames, read and written by one thread at each end (a TLS session is one
//! object for both directions, so one thread owning it needs no lock):
//!
//! ```text
//! request (D→S): u8 kind=1 | u32 region | u64 first page | u32 pages        17 bytes, LE
//! answer  (S→D): u8 kind=2 | u32 region | u64 first page | u32 pages | pages × page size
//! ```
//!
//! The source reads guest memory that is paused for good (the guest runs on the destination),
//! so what it sends is final. The transport decides nothing: which page to ask for, and
//! what to do with what arrives, are the engine's.

use std::io::{Read, Write};
use std::net::TcpStream;

use super::sendmsg::SocketOut;
use crate::{LaneError, MemRegion, MemoryMap};

/// Bytes of a request, and of an answer's header.
pub const FRAME_LEN: usize = 17;
/// Most pages one request may ask for.
pub const MAX_FETCH_PAGES: u32 = 256;
const KIND_REQUEST: u8 = 1;
const KIND_PAGES: u8 = 2;

/// Pages asked for (request) or carried (answer's header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetch {
    /// Region index.
    pub region: u32,
    /// First page.
    pub first_page: u64,
    /// Pages (at most [`MAX_FETCH_PAGES`]).
    pub pages: u32,
}

impl Fetch {
    fn encode(&self, kind: u8) -> [u8; FRAME_LEN] {
        let mut b = [0u8; FRAME_LEN];
        b[0] = kind;
        b[1..5].copy_from_slice(&self.region.to_le_bytes());
        b[5..13].copy_from_slice(&self.first_page.to_le_bytes());
        b[13..17].copy_from_slice(&self.pages.to_le_bytes());
        b
    }

    /// Decodes a frame of `kind`, checked against the region table.
    fn decode(
        b: &[u8; FRAME_LEN],
        kind: u8,
        map: &MemoryMap,
    ) -> Result<(Fetch, MemRegion), LaneError> {
        if b[0] != kind {
            return Err(LaneError::Malformed(format!(
                "fetch lane: frame kind {} where {kind} was expected",
                b[0]
            )));
        }
        let f = Fetch {
            region: u32::from_le_bytes(b[1..5].try_into().expect("4 bytes")),
            first_page: u64::from_le_bytes(b[5..13].try_into().expect("8 bytes")),
            pages: u32::from_le_bytes(b[13..17].try_into().expect("4 bytes")),
        };
        let region = *map.get(f.region as usize).ok_or_else(|| {
            LaneError::Malformed(format!("fetch lane: unknown region {}", f.region))
        })?;
        if f.pages == 0
            || f.pages > MAX_FETCH_PAGES
            || !region.contains(f.first_page, f.pages as u64)
        {
            return Err(LaneError::Malformed(format!(
                "fetch lane: {} pages at page {} do not fit region {} ({} pages, at most {} per fetch)",
                f.pages,
                f.first_page,
                f.region,
                region.pages(),
                MAX_FETCH_PAGES
            )));
        }
        Ok((f, region))
    }
}

/// The request frame for `f` (for tests of the wire).
pub fn encode_request(f: &Fetch) -> [u8; FRAME_LEN] {
    f.encode(KIND_REQUEST)
}

/// A lane socket whose writes never raise SIGPIPE (`sendmsg` with `MSG_NOSIGNAL`), for use
/// under a TLS session or alone.
#[derive(Debug)]
pub struct QuietSocket(pub TcpStream);

impl Read for QuietSocket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.0).read(buf)
    }
}

impl Write for QuietSocket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        SocketOut(&self.0).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        SocketOut(&self.0).write_vectored(bufs)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The fetch lane's connection: the socket, or a TLS session over it (the source is the TLS
/// client, the destination the server, as on every lane).
pub enum FetchConn {
    /// Cleartext.
    Plain(QuietSocket),
    /// The source's end of an encrypted lane.
    TlsClient(Box<rustls::StreamOwned<rustls::ClientConnection, QuietSocket>>),
    /// The destination's end of an encrypted lane.
    TlsServer(Box<rustls::StreamOwned<rustls::ServerConnection, QuietSocket>>),
}

impl FetchConn {
    /// A cleartext lane on `s`.
    pub fn plain(s: TcpStream) -> Self {
        FetchConn::Plain(QuietSocket(s))
    }

    /// The source's end of a lane whose TLS session `c` is established.
    pub fn tls_client(c: rustls::ClientConnection, s: TcpStream) -> Self {
        FetchConn::TlsClient(Box::new(rustls::StreamOwned::new(c, QuietSocket(s))))
    }

    /// The destination's end of a lane whose TLS session `c` is established.
    pub fn tls_server(c: rustls::ServerConnection, s: TcpStream) -> Self {
        FetchConn::TlsServer(Box::new(rustls::StreamOwned::new(c, QuietSocket(s))))
    }

    /// The socket under the connection.
    pub fn socket(&self) -> &TcpStream {
        match self {
            FetchConn::Plain(s) => &s.0,
            FetchConn::TlsClient(t) => &t.sock.0,
            FetchConn::TlsServer(t) => &t.sock.0,
        }
    }

    /// Whether bytes already read from the socket wait to be consumed (a TLS session may
    /// hold opened records that a `poll` on the socket would not announce).
    pub fn has_buffered(&mut self) -> bool {
        match self {
            FetchConn::Plain(_) => false,
            FetchConn::TlsClient(t) => t
                .conn
                .process_new_packets()
                .is_ok_and(|s| s.plaintext_bytes_to_read() > 0),
            FetchConn::TlsServer(t) => t
                .conn
                .process_new_packets()
                .is_ok_and(|s| s.plaintext_bytes_to_read() > 0),
        }
    }

    fn read_exact_or_end(&mut self, b: &mut [u8]) -> Result<bool, LaneError> {
        let mut got = 0;
        while got < b.len() {
            let r = match self {
                FetchConn::Plain(s) => s.read(&mut b[got..]),
                FetchConn::TlsClient(t) => t.read(&mut b[got..]),
                FetchConn::TlsServer(t) => t.read(&mut b[got..]),
            };
            match r {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(LaneError::Closed),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return if got == 0 {
                        Ok(false)
                    } else {
                        Err(LaneError::Closed)
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    fn write_all_flush(&mut self, parts: &[&[u8]]) -> Result<(), LaneError> {
        match self {
            FetchConn::Plain(s) => {
                for p in parts {
                    s.write_all(p)?;
                }
            }
            FetchConn::TlsClient(t) => {
                for p in parts {
                    t.write_all(p)?;
                }
                t.flush()?;
            }
            FetchConn::TlsServer(t) => {
                for p in parts {
                    t.write_all(p)?;
                }
                t.flush()?;
            }
        }
        Ok(())
    }
}

/// The source's end: answers every request with the pages asked for, read from guest memory
/// (paused for good), until the destination closes the lane (`Ok`, with the pages served).
/// `served` sees each answer's pages first (the engine hashes them and keeps its background
/// sender from sending them again).
pub fn serve(
    conn: &mut FetchConn,
    map: &MemoryMap,
    served: &mut dyn FnMut(&Fetch, &[u8]),
) -> Result<u64, LaneError> {
    let mut pages = 0u64;
    let mut buf = Vec::new();
    loop {
        let mut req = [0u8; FRAME_LEN];
        if !conn.read_exact_or_end(&mut req)? {
            return Ok(pages);
        }
        let (f, region) = Fetch::decode(&req, KIND_REQUEST, map)?;
        let g = region.guest_pages(f.first_page, f.pages as u64);
        buf.resize(g.len(), 0);
        g.copy_to(&mut buf);
        served(&f, &buf);
        conn.write_all_flush(&[&f.encode(KIND_PAGES), &buf])?;
        pages += f.pages as u64;
    }
}

/// The destination's end: sends requests and reads answers, checked against its regions.
pub struct FetchClient {
    conn: FetchConn,
    map: MemoryMap,
}

impl FetchClient {
    /// A client over `conn` for the regions of `map`.
    pub fn new(conn: FetchConn, map: MemoryMap) -> Self {
        FetchClient { conn, map }
    }

    /// The connection (to poll its socket, or shut it down).
    pub fn conn(&mut self) -> &mut FetchConn {
        &mut self.conn
    }

    /// Asks for `f`'s pages.
    pub fn request(&mut self, f: &Fetch) -> Result<(), LaneError> {
        Fetch::decode(&f.encode(KIND_REQUEST), KIND_REQUEST, &self.map)?;
        self.conn.write_all_flush(&[&f.encode(KIND_REQUEST)])
    }

    /// Reads the next answer into `buf` (resized to its pages); `Closed` at the end of the
    /// stream.
    pub fn answer(&mut self, buf: &mut Vec<u8>) -> Result<Fetch, LaneError> {
        let mut h = [0u8; FRAME_LEN];
        if !self.conn.read_exact_or_end(&mut h)? {
            return Err(LaneError::Closed);
        }
        let (f, region) = Fetch::decode(&h, KIND_PAGES, &self.map)?;
        buf.resize(f.pages as usize * region.page_size(), 0);
        if !self.conn.read_exact_or_end(buf)? {
            return Err(LaneError::Closed);
        }
        Ok(f)
    }

    /// Ends the lane (the source's `serve` returns).
    pub fn close(&mut self) {
        let _ = self.conn.socket().shutdown(std::net::Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn region(buf: &mut [u8]) -> MemoryMap {
        // SAFETY: `buf` outlives the map in each test and is only reached through it.
        let r = unsafe { MemRegion::new(buf.as_mut_ptr(), buf.len(), 4096) };
        MemoryMap::new(vec![r])
    }

    #[test]
    fn a_request_is_answered_with_the_pages_and_bad_ones_are_refused() {
        let mut src: Vec<u8> = (0..64 * 4096).map(|i| (i * 7 % 251) as u8).collect();
        let mut dst = vec![0u8; 64 * 4096];
        let smap = region(&mut src);
        let dmap = region(&mut dst);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut conn = FetchConn::plain(s);
            let mut seen = Vec::new();
            let r = serve(&mut conn, &smap, &mut |f, b| seen.push((*f, b.len())));
            (r.map_err(|e| e.to_string()), seen)
        });
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut c = FetchClient::new(FetchConn::plain(s), dmap);
        let want = Fetch {
            region: 0,
            first_page: 5,
            pages: 3,
        };
        c.request(&want).unwrap();
        let mut buf = Vec::new();
        assert_eq!(c.answer(&mut buf).unwrap(), want);
        assert_eq!(buf, src_pages(5, 3));
        // Outside the region: refused before it is sent.
        let bad = Fetch {
            region: 0,
            first_page: 63,
            pages: 2,
        };
        assert!(matches!(c.request(&bad), Err(LaneError::Malformed(_))));
        c.close();
        let (r, seen) = server.join().unwrap();
        assert_eq!(r, Ok(3));
        assert_eq!(seen, vec![(want, 3 * 4096)]);

        fn src_pages(first: usize, n: usize) -> Vec<u8> {
            (first * 4096..(first + n) * 4096)
                .map(|i| (i * 7 % 251) as u8)
                .collect()
        }
    }

    #[test]
    fn a_hostile_request_ends_the_source_side_with_an_error() {
        let mut src = vec![1u8; 8 * 4096];
        let smap = region(&mut src);
        let hostile = [
            (
                Fetch {
                    region: 1,
                    first_page: 0,
                    pages: 1,
                }
                .encode(KIND_REQUEST),
                "unknown region 1",
            ),
            (
                Fetch {
                    region: 0,
                    first_page: 7,
                    pages: 2,
                }
                .encode(KIND_REQUEST),
                "do not fit",
            ),
            (
                Fetch {
                    region: 0,
                    first_page: u64::MAX,
                    pages: 1,
                }
                .encode(KIND_REQUEST),
                "do not fit",
            ),
            (
                Fetch {
                    region: 0,
                    first_page: 0,
                    pages: 0,
                }
                .encode(KIND_REQUEST),
                "do not fit",
            ),
            (
                Fetch {
                    region: 0,
                    first_page: 0,
                    pages: 1,
                }
                .encode(KIND_PAGES),
                "frame kind 2",
            ),
        ];
        for (frame, why) in hostile {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let map = smap.clone();
            let server = std::thread::spawn(move || {
                let (s, _) = l.accept().unwrap();
                s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                    .unwrap();
                serve(&mut FetchConn::plain(s), &map, &mut |_, _| {}).map_err(|e| e.to_string())
            });
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&frame).unwrap();
            let e = server.join().unwrap().unwrap_err();
            assert!(e.contains(why), "{e} (expected {why})");
        }
    }
}
