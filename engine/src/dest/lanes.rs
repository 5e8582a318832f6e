//! Admitting data lanes on the destination: each must prove that it belongs to the session.

use std::time::Duration;

use tokio::net::TcpListener;

use crate::control::auth::SessionAuth;
use crate::protocol::{codec, Message};
use crate::EngineError;

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
    let session = auth.session_id();
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
        let first = tokio::time::timeout(Duration::from_secs(5), codec::read_async(&mut s)).await;
        let refusal = match first {
            Ok(Ok(Some(Message::LaneJoin {
                session: sid,
                lane,
                mac,
            }))) => {
                if sid != session || !auth.check_lane(lane, &mac) {
                    Some("lane could not prove that it belongs to the session".to_string())
                } else if lane >= n || lanes[lane as usize].is_some() {
                    Some(format!("lane {lane} is not expected"))
                } else {
                    codec::write_async(&mut s, &Message::LaneAccepted).await?;
                    let std = s.into_std()?;
                    std.set_nonblocking(false)?;
                    lanes[lane as usize] = Some(std);
                    continue;
                }
            }
            Ok(Ok(Some(m))) => Some(format!("expected LaneJoin, got {}", m.name())),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("no LaneJoin in time".to_string()),
        };
        if let Some(why) = refusal {
            let _ = codec::write_async(&mut s, &Message::Error { message: why }).await;
        }
    }
    Ok(lanes.into_iter().map(|l| l.expect("all joined")).collect())
}
