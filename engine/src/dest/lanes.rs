//! Admitting data lanes on the destination: each must prove that it belongs to the session.
//!
//! Lanes `0..n` join during setup. When the session runs over RDMA, lanes `n..2n` may join
//! later: the source opens them as TCP lanes if every RDMA lane has failed.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use tokio::net::{TcpListener, TcpStream};

use crate::control::auth::SessionAuth;
use crate::protocol::{codec, Message};
use crate::EngineError;

/// Reads a connection's `LaneJoin` and checks its proof; the lane number, or why it is refused
/// (`None`: it closed without a word).
async fn proof(s: &mut TcpStream, auth: &SessionAuth) -> Option<Result<u16, String>> {
    let first = tokio::time::timeout(Duration::from_secs(5), codec::read_async(s)).await;
    Some(match first {
        Ok(Ok(Some(Message::LaneJoin { session, lane, mac }))) => {
            if session != auth.session_id() || !auth.check_lane(lane, &mac) {
                Err("lane could not prove that it belongs to the session".to_string())
            } else {
                Ok(lane)
            }
        }
        Ok(Ok(Some(m))) => Err(format!("expected LaneJoin, got {}", m.name())),
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no LaneJoin in time".to_string()),
    })
}

/// Answers a proven lane, or refuses it with an error frame. Returns the lane's socket.
async fn answer(
    mut s: TcpStream,
    verdict: Result<u16, String>,
) -> Result<Option<std::net::TcpStream>, EngineError> {
    match verdict {
        Ok(_) => {
            codec::write_async(&mut s, &Message::LaneAccepted).await?;
            let std = s.into_std()?;
            std.set_nonblocking(false)?;
            Ok(Some(std))
        }
        Err(why) => {
            let _ = codec::write_async(&mut s, &Message::Error { message: why }).await;
            Ok(None)
        }
    }
}

/// Accepts `n` lanes on `listener`; connections that cannot prove membership are refused with
/// an error frame and do not count. Fails if the lanes do not all join within `timeout`.
pub(crate) async fn join(
    listener: &TcpListener,
    auth: &SessionAuth,
    n: u16,
    timeout: Duration,
) -> Result<Vec<std::net::TcpStream>, EngineError> {
    let mut lanes: Vec<Option<std::net::TcpStream>> = (0..n).map(|_| None).collect();
    let deadline = tokio::time::Instant::now() + timeout;
    while lanes.iter().any(Option::is_none) {
        let (mut s, _) = match tokio::time::timeout_at(deadline, listener.accept()).await {
            Err(_) => {
                return Err(EngineError::Protocol(format!(
                    "only {} of {n} data lanes joined within {} ms",
                    lanes.iter().filter(|l| l.is_some()).count(),
                    timeout.as_millis()
                )))
            }
            Ok(r) => r?,
        };
        let Some(verdict) = proof(&mut s, auth).await else {
            continue;
        };
        let verdict = verdict.and_then(|lane| match lanes.get(lane as usize) {
            Some(None) => Ok(lane),
            _ => Err(format!("lane {lane} is not expected")),
        });
        let lane = verdict.as_ref().ok().copied();
        if let (Some(std), Some(l)) = (answer(s, verdict).await?, lane) {
            lanes[l as usize] = Some(std);
        }
    }
    Ok(lanes.into_iter().map(|l| l.expect("all joined")).collect())
}

/// Admits the fallback lanes `n..2n` for as long as the session runs, handing each to `tx`.
pub(crate) async fn fallback(
    listener: Arc<TcpListener>,
    auth: SessionAuth,
    n: u16,
    tx: Sender<(u16, std::net::TcpStream)>,
) {
    let mut taken = vec![false; n as usize];
    while let Ok((mut s, _)) = listener.accept().await {
        let Some(verdict) = proof(&mut s, &auth).await else {
            continue;
        };
        let verdict = verdict.and_then(|lane| {
            match lane.checked_sub(n).and_then(|i| taken.get_mut(i as usize)) {
                Some(t) if !*t => {
                    *t = true;
                    Ok(lane)
                }
                _ => Err(format!("lane {lane} is not expected")),
            }
        });
        let lane = verdict.as_ref().ok().copied();
        if let Ok(Some(std)) = answer(s, verdict).await {
            if tx.send((lane.expect("accepted"), std)).is_err() {
                return;
            }
        }
    }
}
