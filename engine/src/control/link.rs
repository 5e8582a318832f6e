//! A running control connection: a writer task (messages and heartbeats) and a reader task
//! (frames, silence detection), bridged to the engine's threads by channels.
//!
//! The inbox is bounded ([`INBOX`] messages): when the engine is busy elsewhere (joining lanes,
//! registering memory, a slow embedder callback), the reader stops reading and TCP pushes back
//! on the peer, so a peer cannot grow our memory by sending faster than we consume. Each frame
//! is held to its type's size limit before its body is allocated ([`codec::Limits`]).

use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::protocol::codec::{self, Limits};
use crate::protocol::Message;
use crate::stats::EndFigures;
use crate::EngineError;

/// Heartbeat timing of a control connection.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    /// How often we send a heartbeat.
    pub heartbeat: Duration,
    /// How long the peer may stay silent before it is declared gone.
    pub peer_timeout: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            heartbeat: Duration::from_millis(500),
            peer_timeout: Duration::from_secs(5),
        }
    }
}

/// What a control connection runs on: a TCP connection, or a TLS session over one.
pub trait ControlIo: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> ControlIo for T {}

/// A control connection of either kind.
pub type ControlStream = Box<dyn ControlIo>;

/// Most messages waiting in a control connection's inbox.
pub const INBOX: usize = 8;

/// A control connection after its handshake.
pub struct ControlLink {
    out: Option<mpsc::UnboundedSender<Message>>,
    inbox: Receiver<Result<Message, EngineError>>,
    reader: JoinHandle<()>,
    writer_done: Receiver<()>,
}

impl ControlLink {
    /// Starts the reader and writer tasks on `rt` for `stream` (a TCP connection, or a TLS
    /// session over one); frames are held to `limits`.
    pub fn start<S>(rt: &Handle, stream: S, live: Liveness, limits: Limits) -> ControlLink
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let (in_tx, inbox) = crossbeam_channel::bounded(INBOX);
        let (out, out_rx) = mpsc::unbounded_channel();
        let (done_tx, writer_done) = crossbeam_channel::bounded(1);
        let reader = rt.spawn(read_loop(rd, in_tx.clone(), live, limits));
        rt.spawn(write_loop(wr, out_rx, in_tx, live, done_tx));
        ControlLink {
            out: Some(out),
            inbox,
            reader,
            writer_done,
        }
    }

    /// After a completed handover: sends this end's `figures` and waits up to `wait` for the
    /// peer's. The exchange comes after `Done`, when the destination's guest already runs, so
    /// it cannot lengthen the downtime; a peer that sends none (an older build, or a
    /// connection that closed) costs at most `wait` and leaves `None`, never a failure.
    pub fn exchange_figures(&self, figures: EndFigures, wait: Duration) -> Option<EndFigures> {
        self.send(Message::Figures { figures });
        let deadline = std::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.recv_timeout(left) {
                Ok(Some(Message::Figures { figures })) => return Some(figures),
                // Nothing else is expected now; what a newer peer may add is not ours to judge.
                Ok(Some(_)) if !left.is_zero() => continue,
                _ => return None,
            }
        }
    }

    /// Queues a message for the peer.
    pub fn send(&self, m: Message) {
        if let Some(o) = &self.out {
            let _ = o.send(m);
        }
    }

    /// The channel of what arrives (for `select!` with other channels).
    pub fn inbox(&self) -> &Receiver<Result<Message, EngineError>> {
        &self.inbox
    }

    /// Waits up to `d` for a message. `Ok(None)` on timeout. A `Cancel` or `Error` from the
    /// peer, and a failed connection, come back as errors.
    pub fn recv_timeout(&self, d: Duration) -> Result<Option<Message>, EngineError> {
        match self.inbox.recv_timeout(d) {
            Ok(r) => Self::screen(r).map(Some),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(EngineError::PeerClosed),
        }
    }

    /// Turns the peer's `Cancel` and `Error` into errors.
    pub fn screen(r: Result<Message, EngineError>) -> Result<Message, EngineError> {
        match r? {
            Message::Cancel { reason } => Err(EngineError::PeerCancelled(reason)),
            Message::Error { message } => Err(EngineError::PeerError(message)),
            m => Ok(m),
        }
    }

    /// Waits up to `d` for the message that `want` accepts; anything else is a protocol error.
    pub fn expect<T>(
        &self,
        d: Duration,
        what: &str,
        want: impl FnOnce(Message) -> Result<T, Message>,
    ) -> Result<T, EngineError> {
        match self.recv_timeout(d)? {
            None => Err(EngineError::Protocol(format!(
                "no {what} within {} ms",
                d.as_millis()
            ))),
            Some(m) => want(m)
                .map_err(|m| EngineError::Protocol(format!("expected {what}, got {}", m.name()))),
        }
    }

    /// Sends what is queued, then closes the connection (waits at most `d`).
    pub fn close(&mut self, d: Duration) {
        self.out = None;
        let _ = self.writer_done.recv_timeout(d);
        self.reader.abort();
    }
}

impl Drop for ControlLink {
    fn drop(&mut self) {
        self.close(Duration::from_millis(500));
    }
}

/// Hands `r` to the engine, waiting (without blocking the runtime) while the inbox is full.
/// False once the engine has gone.
async fn deliver(
    tx: &Sender<Result<Message, EngineError>>,
    mut r: Result<Message, EngineError>,
) -> bool {
    loop {
        match tx.try_send(r) {
            Ok(()) => return true,
            Err(TrySendError::Disconnected(_)) => return false,
            Err(TrySendError::Full(back)) => {
                r = back;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
}

async fn read_loop<S: AsyncRead>(
    mut rd: ReadHalf<S>,
    tx: Sender<Result<Message, EngineError>>,
    live: Liveness,
    limits: Limits,
) {
    loop {
        let read = codec::read_async_limited(&mut rd, &limits);
        let r = match tokio::time::timeout(live.peer_timeout, read).await {
            Err(_) => Err(EngineError::PeerSilent(live.peer_timeout.as_millis() as u64)),
            Ok(Ok(Some(Message::Heartbeat))) => continue,
            Ok(Ok(Some(m))) => Ok(m),
            Ok(Ok(None)) => Err(EngineError::PeerClosed),
            Ok(Err(e)) => Err(e),
        };
        let end = r.is_err();
        if !deliver(&tx, r).await || end {
            return;
        }
    }
}

async fn write_loop<S: AsyncWrite>(
    mut wr: WriteHalf<S>,
    mut rx: mpsc::UnboundedReceiver<Message>,
    errs: Sender<Result<Message, EngineError>>,
    live: Liveness,
    done: Sender<()>,
) {
    use tokio::io::AsyncWriteExt;
    let mut tick = tokio::time::interval(live.heartbeat);
    loop {
        let m = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => m,
                None => break,
            },
            _ = tick.tick() => Message::Heartbeat,
        };
        if let Err(e) = super::handshake::write(&mut wr, &m).await {
            deliver(&errs, Err(e)).await;
            break;
        }
    }
    let _ = wr.shutdown().await;
    let _ = done.send(());
}
