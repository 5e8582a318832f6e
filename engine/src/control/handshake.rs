//! The opening exchange of a session: version, mutual authentication, region table and
//! transport, each refused with a clear error message to the peer when it does not fit.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::auth::{self, Key, SessionAuth};
use crate::protocol::{codec, Message, TransportKind};
use crate::region::{self, RegionDesc};
use crate::EngineError;

/// What the handshake settled.
#[derive(Debug, Clone)]
pub struct Agreed {
    /// Protocol version.
    pub version: u16,
    /// Authentication state (for lanes).
    pub auth: SessionAuth,
    /// Transport.
    pub transport: TransportKind,
    /// Lanes.
    pub lanes: u16,
    /// What the destination verifies.
    pub verify: crate::verify::VerifyMode,
    /// Why the destination did not pick the source's first choice (empty if it did).
    pub note: String,
}

/// What a source proposes.
#[derive(Debug, Clone)]
pub struct SourceOffer {
    /// Versions spoken, lowest and highest.
    pub versions: (u16, u16),
    /// Key.
    pub key: Key,
    /// Regions, in table order.
    pub regions: Vec<RegionDesc>,
    /// Transports, best first.
    pub transports: Vec<TransportKind>,
    /// Lanes wanted.
    pub lanes: u16,
    /// End-to-end verification.
    pub verify: crate::verify::VerifyMode,
}

/// What a destination accepts.
#[derive(Debug, Clone)]
pub struct DestAccept {
    /// Versions spoken, lowest and highest.
    pub versions: (u16, u16),
    /// Key.
    pub key: Key,
    /// Its own regions, in table order.
    pub regions: Vec<RegionDesc>,
    /// Transports it can use.
    pub transports: Vec<TransportKind>,
    /// Most lanes it accepts.
    pub max_lanes: u16,
    /// Why a transport is missing from `transports` (told to the source).
    pub note: String,
}

/// Writes `m` and flushes it (a TLS session may hold back what the socket did not take).
pub async fn write<S: AsyncWrite + Unpin>(s: &mut S, m: &Message) -> Result<(), EngineError> {
    use tokio::io::AsyncWriteExt;
    codec::write_async(s, m).await?;
    s.flush().await?;
    Ok(())
}

/// Reads the next message; a timeout or a malformed frame is reported to the peer too.
pub async fn recv<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    d: Duration,
    what: &str,
) -> Result<Message, EngineError> {
    match tokio::time::timeout(d, codec::read_async(s)).await {
        Err(_) => {
            let e = EngineError::Protocol(format!("no {what} within {} ms", d.as_millis()));
            refuse(s, e).await
        }
        Ok(Ok(Some(Message::Error { message }))) => Err(EngineError::PeerError(message)),
        Ok(Ok(Some(Message::Cancel { reason }))) => Err(EngineError::PeerCancelled(reason)),
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err(EngineError::PeerClosed),
        Ok(Err(e @ EngineError::Protocol(_))) => refuse(s, e).await,
        Ok(Err(e)) => Err(e),
    }
}

fn unexpected(what: &str, m: &Message) -> EngineError {
    EngineError::Protocol(format!("expected {what}, got {}", m.name()))
}

/// Tells the peer why we give up (best effort), then returns the error.
pub async fn refuse<T, S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    e: EngineError,
) -> Result<T, EngineError> {
    let _ = write(
        s,
        &Message::Error {
            message: e.to_string(),
        },
    )
    .await;
    Err(e)
}

/// The source's side of the handshake on a cleartext connection.
pub async fn source<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    offer: &SourceOffer,
    timeout: Duration,
) -> Result<Agreed, EngineError> {
    source_bound(s, offer, None, timeout).await
}

/// The source's side of the handshake: version, mutual proof of the key (bound to the TLS
/// connection's `binding` when there is one), region table, transport, each answer checked and
/// a wrong one refused with its reason.
pub async fn source_bound<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    offer: &SourceOffer,
    binding: Option<[u8; 32]>,
    timeout: Duration,
) -> Result<Agreed, EngineError> {
    let (version, dnonce) = source_version(s, offer, timeout).await?;
    let auth = source_auth(s, offer, dnonce, binding, timeout).await?;
    let regions = Message::RegionTable {
        regions: offer.regions.clone(),
    };
    write(s, &regions).await?;
    match recv(s, timeout, "RegionsOk").await? {
        Message::RegionsOk => {}
        m => return refuse(s, unexpected("RegionsOk", &m)).await,
    }
    let (transport, lanes, note) = source_transport(s, offer, timeout).await?;
    Ok(Agreed {
        version,
        auth,
        transport,
        lanes,
        verify: offer.verify,
        note,
    })
}

/// `Hello` with our versions; returns the version the destination picked (one we speak) and
/// its challenge.
async fn source_version<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    offer: &SourceOffer,
    timeout: Duration,
) -> Result<(u16, [u8; 32]), EngineError> {
    let hello = Message::Hello {
        min_version: offer.versions.0,
        max_version: offer.versions.1,
    };
    write(s, &hello).await?;
    let (version, dnonce) = match recv(s, timeout, "HelloAck").await? {
        Message::HelloAck { version, nonce } => (version, nonce),
        m => return refuse(s, unexpected("HelloAck", &m)).await,
    };
    if version < offer.versions.0 || version > offer.versions.1 {
        let e = EngineError::Protocol(format!(
            "peer picked version {version}, which we do not speak"
        ));
        return refuse(s, e).await;
    }
    Ok((version, dnonce))
}

/// Answers the destination's challenge `dnonce` and checks its proof of the key.
async fn source_auth<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    offer: &SourceOffer,
    dnonce: [u8; 32],
    binding: Option<[u8; 32]>,
    timeout: Duration,
) -> Result<SessionAuth, EngineError> {
    let snonce = auth::nonce()?;
    let a = match SessionAuth::new(offer.key.clone(), dnonce, snonce, binding) {
        Ok(a) => a,
        Err(e) => return refuse(s, e).await,
    };
    let proof = Message::AuthProof {
        nonce: snonce,
        mac: a.source_proof(),
    };
    write(s, &proof).await?;
    match recv(s, timeout, "AuthOk").await? {
        Message::AuthOk { mac } if a.check_dest(&mac) => Ok(a),
        Message::AuthOk { .. } => refuse(s, unproven("destination", &offer.key)).await,
        m => refuse(s, unexpected("AuthOk", &m)).await,
    }
}

/// Offers the transports and lanes; returns what the destination picked, if it is one we
/// offered, with its note.
async fn source_transport<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    offer: &SourceOffer,
    timeout: Duration,
) -> Result<(TransportKind, u16, String), EngineError> {
    let m = Message::TransportOffer {
        kinds: offer.transports.clone(),
        lanes: offer.lanes,
        verify: offer.verify,
    };
    write(s, &m).await?;
    match recv(s, timeout, "TransportAccept").await? {
        Message::TransportAccept { kind, lanes, note }
            if offer.transports.contains(&kind) && lanes >= 1 && lanes <= offer.lanes =>
        {
            Ok((kind, lanes, note))
        }
        m => refuse(s, unexpected("an acceptable TransportAccept", &m)).await,
    }
}

/// The destination's side of the handshake.
pub async fn dest<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    acc: &DestAccept,
    timeout: Duration,
) -> Result<Agreed, EngineError> {
    let hello = recv(s, timeout, "Hello").await?;
    dest_after(s, hello, acc, None, timeout).await
}

/// The destination's side of the handshake, once the connection's first message (`first`,
/// which must be `Hello`) has been read: version, mutual proof of the key, region table,
/// transport, each step refused with its reason. Over TLS, the proofs are bound to the
/// connection's `binding`.
pub async fn dest_after<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    first: Message,
    acc: &DestAccept,
    binding: Option<[u8; 32]>,
    timeout: Duration,
) -> Result<Agreed, EngineError> {
    let (version, dnonce) = pick_version(s, first, acc).await?;
    let auth = prove_key(s, acc, dnonce, binding, timeout).await?;
    match recv(s, timeout, "RegionTable").await? {
        Message::RegionTable { regions } => {
            if let Err(e) = region::compare(&acc.regions, &regions) {
                return refuse(s, e).await;
            }
        }
        m => return refuse(s, unexpected("RegionTable", &m)).await,
    }
    write(s, &Message::RegionsOk).await?;
    let (transport, lanes, verify) = pick_transport(s, acc, timeout).await?;
    Ok(Agreed {
        version,
        auth,
        transport,
        lanes,
        verify,
        note: String::new(),
    })
}

/// The `peer` failed its proof of the session's key: a wrong pre-shared key, a relay, or a
/// key at one end only.
fn unproven(peer: &str, ours: &Key) -> EngineError {
    EngineError::Auth(if ours.is_shared() {
        format!("the {peer} could not prove the pre-shared key")
    } else {
        format!(
            "the {peer} could not prove the session (this end has no pre-shared key; has the \
             {peer} one?)"
        )
    })
}

/// Answers `Hello` with the highest common version and our challenge.
async fn pick_version<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    first: Message,
    acc: &DestAccept,
) -> Result<(u16, [u8; 32]), EngineError> {
    let (pmin, pmax) = match first {
        Message::Hello {
            min_version,
            max_version,
        } => (min_version, max_version),
        m => return refuse(s, unexpected("Hello", &m)).await,
    };
    let version = pmax.min(acc.versions.1);
    if version < pmin.max(acc.versions.0) {
        let e = EngineError::Version {
            ours_min: acc.versions.0,
            ours_max: acc.versions.1,
            peer_min: pmin,
            peer_max: pmax,
        };
        return refuse(s, e).await;
    }
    let dnonce = auth::nonce()?;
    let ack = Message::HelloAck {
        version,
        nonce: dnonce,
    };
    write(s, &ack).await?;
    Ok((version, dnonce))
}

/// Checks the source's proof of the key and proves it back.
async fn prove_key<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    acc: &DestAccept,
    dnonce: [u8; 32],
    binding: Option<[u8; 32]>,
    timeout: Duration,
) -> Result<SessionAuth, EngineError> {
    let a = match recv(s, timeout, "AuthProof").await? {
        Message::AuthProof { nonce, mac } => {
            let a = match SessionAuth::new(acc.key.clone(), dnonce, nonce, binding) {
                Ok(a) => a,
                Err(e) => return refuse(s, e).await,
            };
            if !a.check_source(&mac) {
                return refuse(s, unproven("source", &acc.key)).await;
            }
            a
        }
        m => return refuse(s, unexpected("AuthProof", &m)).await,
    };
    let ok = Message::AuthOk {
        mac: a.dest_proof(),
    };
    write(s, &ok).await?;
    Ok(a)
}

/// Picks the first offered transport we can serve and the number of lanes.
async fn pick_transport<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    acc: &DestAccept,
    timeout: Duration,
) -> Result<(TransportKind, u16, crate::verify::VerifyMode), EngineError> {
    let (kinds, lanes, verify) = match recv(s, timeout, "TransportOffer").await? {
        Message::TransportOffer {
            kinds,
            lanes,
            verify,
        } => (kinds, lanes, verify),
        m => return refuse(s, unexpected("TransportOffer", &m)).await,
    };
    let Some(&transport) = kinds.iter().find(|k| acc.transports.contains(k)) else {
        let why = if acc.note.is_empty() {
            String::new()
        } else {
            format!(" ({})", acc.note)
        };
        let e = EngineError::Protocol(format!("no transport both ends can use{why}"));
        return refuse(s, e).await;
    };
    if lanes == 0 {
        return refuse(s, EngineError::Protocol("zero lanes requested".into())).await;
    }
    let lanes = lanes.min(acc.max_lanes.max(1));
    let note = if kinds.first() == Some(&transport) {
        String::new()
    } else {
        acc.note.clone()
    };
    let accept = Message::TransportAccept {
        kind: transport,
        lanes,
        note,
    };
    write(s, &accept).await?;
    Ok((transport, lanes, verify))
}
