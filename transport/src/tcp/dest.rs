//! The receiving end of a TCP lane: payloads land straight in guest memory.

use std::io::{Read, Write};
use std::net::TcpStream;

use super::wire::{self, Header, HEADER_LEN};
use crate::{DestLane, DestLaneSummary, LaneError, MemoryMap, PageSink};

/// Bytes read ahead when looking for a header. Payload bytes that come along are copied once
/// from here (so this stays small: 16 KiB is under 2 % of a 1 MiB run); the rest of a payload
/// is read straight into guest memory. Runs of single pages still arrive several per read.
const READ_AHEAD: usize = 16 * 1024;

/// A TCP destination lane.
pub struct TcpDestLane {
    stream: TcpStream,
    map: MemoryMap,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl TcpDestLane {
    /// Takes over a connected, authenticated lane socket.
    pub fn new(stream: TcpStream, map: MemoryMap) -> Result<Self, LaneError> {
        stream.set_nodelay(true)?;
        Ok(TcpDestLane {
            stream,
            map,
            buf: vec![0u8; READ_AHEAD],
            start: 0,
            end: 0,
        })
    }

    /// A handle that can shut the lane's socket down from another thread (to stop `run`).
    pub fn shutdown_handle(&self) -> std::io::Result<TcpStream> {
        self.stream.try_clone()
    }

    /// Reads at least `n` buffered bytes. `Ok(false)` on a clean end of stream before any.
    fn fill(&mut self, n: usize) -> Result<bool, LaneError> {
        if self.end - self.start >= n {
            return Ok(true);
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        while self.end < n {
            match self.stream.read(&mut self.buf[self.end..]) {
                Ok(0) if self.end == 0 => return Ok(false),
                Ok(0) => return Err(LaneError::Closed),
                Ok(k) => self.end += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    /// Receives into `dst`: first what is buffered, then straight from the socket.
    fn read_into(&mut self, dst: &mut [u8]) -> Result<(), LaneError> {
        let have = (self.end - self.start).min(dst.len());
        dst[..have].copy_from_slice(&self.buf[self.start..self.start + have]);
        self.start += have;
        let rest = &mut dst[have..];
        if !rest.is_empty() {
            self.stream.read_exact(rest).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    LaneError::Closed
                } else {
                    e.into()
                }
            })?;
        }
        Ok(())
    }

    /// Receives until the source closes the lane, handing every run to `sink`.
    ///
    /// Any header that does not fit the region table ends the lane with
    /// [`LaneError::Malformed`] before a byte of its payload is written.
    pub fn run(&mut self, sink: &dyn PageSink) -> Result<DestLaneSummary, LaneError> {
        let mut sum = DestLaneSummary::default();
        loop {
            if !self.fill(HEADER_LEN)? {
                return Err(LaneError::Closed);
            }
            let hb: [u8; HEADER_LEN] = self.buf[self.start..self.start + HEADER_LEN]
                .try_into()
                .expect("header length");
            self.start += HEADER_LEN;
            let h = Header::decode(&hb).map_err(LaneError::Malformed)?;
            match h.kind {
                wire::KIND_DATA | wire::KIND_ZERO => {
                    let idx = h.region as usize;
                    let region = *self.map.get(idx).ok_or_else(|| {
                        LaneError::Malformed(format!("run names unknown region {}", h.region))
                    })?;
                    if !region.contains(h.first_page, h.count) {
                        return Err(LaneError::Malformed(format!(
                            "run of {} pages at page {} lies outside region {} ({} pages)",
                            h.count,
                            h.first_page,
                            h.region,
                            region.pages()
                        )));
                    }
                    if h.kind == wire::KIND_DATA {
                        // Land the run piece by piece if the sink wants to read each piece
                        // while it is still in cache; else in one read.
                        let piece = sink
                            .piece_bytes()
                            .map_or(h.count, |b| (b / region.page_size() as u64).max(1));
                        let end = h.first_page + h.count;
                        let mut p = h.first_page;
                        while p < end {
                            let n = piece.min(end - p);
                            // SAFETY: rounds are fenced and each page is sent on one lane per
                            // round, so this lane is the only writer of these pages now.
                            let dst = unsafe { region.pages_slice_mut(p, n) };
                            self.read_into(dst)?;
                            sink.data_landed(idx, p, n);
                            sum.data_bytes += dst.len() as u64;
                            p += n;
                        }
                        sum.data_pages += h.count;
                    } else {
                        sink.zero_pages(idx, h.first_page, h.count);
                        sum.zero_pages += h.count;
                    }
                }
                wire::KIND_BATCH_END => {
                    self.stream.write_all(&wire::encode_ack(h.count))?;
                    sum.batches += 1;
                }
                wire::KIND_CLOSE => return Ok(sum),
                _ => unreachable!("Header::decode accepts only known kinds"),
            }
        }
    }
}

impl DestLane for TcpDestLane {
    fn run(&mut self, sink: &dyn PageSink) -> Result<DestLaneSummary, LaneError> {
        TcpDestLane::run(self, sink)
    }

    fn shutdown_handle(&self) -> std::io::Result<TcpStream> {
        TcpDestLane::shutdown_handle(self)
    }
}
