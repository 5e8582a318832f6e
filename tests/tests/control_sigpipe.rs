//! A control connection whose peer has closed fails with an error; it does not kill the
//! process with SIGPIPE.
//!
//! librmig runs inside C embedders (QEMU) that may keep SIGPIPE's default action, which ends
//! the process on a write to a connection whose peer is gone. Every test of this binary
//! restores that default first (the binary is its own process, and every test in it wants
//! the default), so a write that raised SIGPIPE ends the binary with signal 13 and
//! `cargo test` reports it. The tests write on control connections made the engine's way
//! (TLS through `ClientTls::connector` and `ServerTls::acceptor`; cleartext on a plain tokio
//! `TcpStream`) after the peer closed, until the kernel answers EPIPE: the error that comes
//! with SIGPIPE unless the write says `MSG_NOSIGNAL`. Before the fix, the TLS ones died here
//! (tokio-rustls writes records with `writev`).

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use rmig_engine::control::handshake;
use rmig_engine::control::link::{ControlLink, Liveness};
use rmig_engine::control::tls::{ClientStream, ClientTls, ServerStream, ServerTls};
use rmig_engine::protocol::codec::Limits;
use rmig_engine::protocol::Message;
use rmig_engine::{Encryption, EngineError};
use rmig_tests::Deadline;
use tokio::io::AsyncWrite;
use tokio::net::{TcpListener, TcpStream};

/// Restores SIGPIPE's default action (process-wide: see the module doc).
fn default_sigpipe() {
    // SAFETY: setting the disposition of SIGPIPE to its default has no memory effects; the
    // whole test binary wants the default (module doc).
    let old = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    assert_ne!(old, libc::SIG_ERR);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A TCP connection over loopback: (the connecting end, the accepting end).
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (c, a) = tokio::join!(TcpStream::connect(addr), l.accept());
    (c.unwrap(), a.unwrap().0)
}

/// An encrypted control connection after its TLS handshake, made as a source and a
/// destination make theirs: (the source's end, the destination's end).
async fn tls_pair(enc: &Encryption) -> (ClientStream, ServerStream) {
    let (c, s) = tcp_pair().await;
    let client = ClientTls::new(enc, "127.0.0.1:1").unwrap().expect("TLS on");
    let server = ServerTls::new(enc).unwrap().expect("TLS on");
    let (connector, name) = client.connector();
    let acceptor = server.acceptor();
    let (c, s) = tokio::join!(connector.connect(name, c), acceptor.accept(s));
    (c.expect("client handshake"), s.expect("server handshake"))
}

/// Writes control messages on `s`, whose peer has closed, until a write fails with EPIPE;
/// other write errors on the way (ECONNRESET, when the peer's reset is reported first) are
/// passed over. Fails the test when no EPIPE comes within 10 s.
async fn write_until_epipe<S: AsyncWrite + Unpin>(s: &mut S) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        match handshake::write(s, &Message::Heartbeat).await {
            Ok(()) => {}
            Err(e) if e.io_kind() == Some(ErrorKind::BrokenPipe) => return,
            Err(e) => {
                assert!(e.io_kind().is_some(), "not an I/O error: {e}");
                seen.push(e.to_string());
            }
        }
        assert!(
            Instant::now() < deadline,
            "no EPIPE within 10 s; errors: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn encrypted_source_end_gets_epipe_not_sigpipe() {
    default_sigpipe();
    let _deadline = Deadline::secs(30);
    runtime().block_on(async {
        let (mut source, dest) = tls_pair(&Encryption::Psk).await;
        drop(dest);
        write_until_epipe(&mut source).await;
    });
}

#[test]
fn encrypted_destination_end_gets_epipe_not_sigpipe() {
    default_sigpipe();
    let _deadline = Deadline::secs(30);
    runtime().block_on(async {
        let (source, mut dest) = tls_pair(&Encryption::Psk).await;
        drop(source);
        write_until_epipe(&mut dest).await;
    });
}

#[test]
fn cleartext_control_gets_epipe_not_sigpipe() {
    default_sigpipe();
    let _deadline = Deadline::secs(30);
    runtime().block_on(async {
        let (mut source, dest) = tcp_pair().await;
        drop(dest);
        write_until_epipe(&mut source).await;
    });
}

/// A running control link (heartbeats every 10 ms) whose peer closed: the link reports the
/// failed connection, and closing it afterwards (TLS's close_notify goes to a connection
/// the kernel has already reset) is no signal either.
#[test]
fn encrypted_control_link_reports_a_closed_peer() {
    default_sigpipe();
    let _deadline = Deadline::secs(30);
    let rt = runtime();
    let (source, dest) = rt.block_on(tls_pair(&Encryption::Psk));
    drop(dest);
    let live = Liveness {
        heartbeat: Duration::from_millis(10),
        peer_timeout: Duration::from_secs(5),
    };
    let mut link = ControlLink::start(rt.handle(), source, live, Limits::default());
    // The reader sees the end of the stream; the writer's heartbeats then meet the reset.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut errors = Vec::new();
    while !errors.iter().any(|e: &EngineError| {
        matches!(
            e.io_kind(),
            Some(ErrorKind::ConnectionReset | ErrorKind::BrokenPipe)
        )
    }) {
        assert!(
            Instant::now() < deadline,
            "the link reported no failed write within 10 s: {errors:?}"
        );
        match link.recv_timeout(Duration::from_millis(100)) {
            Err(e) => errors.push(e),
            Ok(Some(m)) => panic!("a closed peer sent {}", m.name()),
            Ok(None) => {}
        }
    }
    // The writer now shuts the session down: close_notify to a reset connection (EPIPE).
    link.close(Duration::from_secs(2));
}
