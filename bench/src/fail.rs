//! One line on stderr for every failure: what happened and what to change.
//!
//! The report (table or JSON on stdout) holds the details; a script that only looks at
//! stderr, or a user who asked for `--json`, still learns why the run failed and which flag
//! helps. Errors the peer reported arrive as its text, so those are told apart by the words
//! the engine uses for them.

use rmig_engine::EngineError;

/// Which end a message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The sending end.
    Source,
    /// The receiving end.
    Dest,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Dest => "destination",
        }
    }
}

/// The line to print for `e` on `side`.
pub fn line(side: Side, e: &EngineError) -> String {
    let what = match (side, e) {
        (Side::Source, EngineError::PeerError(m)) => {
            format!("the destination reported an error: {}", from_the_peer(m))
        }
        _ => e.to_string(),
    };
    format!("rmig-bench: {}: {what}; {}", side.name(), hint(side, e))
}

/// The flag that lets an encrypted session move pages over RDMA in clear.
const CLEARTEXT_FLAG: &str = "--rdma-cleartext-lanes";

/// The hint after a migration that did not converge.
const NOT_CONVERGED: &str = "the guest dirties memory faster than it can be sent: raise \
    --downtime-limit, use --on-no-convergence switchover, keep --auto-converge on, lift or \
    raise --max-bandwidth, or lower --dirty-rate";

/// The hint after a post-copy that broke once the destination ran the guest.
const GUEST_LOST: &str = "post-copy broke after the destination resumed the guest: neither \
    host holds all of its memory, so it cannot run on either; restart it from a backup or a \
    fresh boot";

/// The hint after a handover whose outcome this end does not know.
const HANDOVER_UNKNOWN: &str = "this end's guest stays paused: check the other end, then run \
    the guest on exactly one of them (rmig-bench decides with --on-handover-unknown run-here \
    or run-there, or asks when run on a terminal)";

/// What to change after `e`.
pub fn hint(side: Side, e: &EngineError) -> String {
    use EngineError as E;
    let peer_text = match e {
        E::PeerError(m) | E::PeerCancelled(m) => m.as_str(),
        _ => "",
    };
    match e {
        E::NotConverged(_) => NOT_CONVERGED.into(),
        E::RegionMismatch(_) => same_guest(),
        _ if peer_text.starts_with("region table mismatch") => same_guest(),
        E::Auth(_) => same_key(),
        _ if peer_text.starts_with("authentication failed") => same_key(),
        E::Version { .. } => "run the same rmig version on both hosts".into(),
        E::Cancelled(_) => "cancelled on this host; the source guest keeps running".into(),
        E::PeerCancelled(_) => format!(
            "the {} cancelled the migration; the source guest keeps running",
            other(side)
        ),
        E::GuestLost(_) => GUEST_LOST.into(),
        E::HandoverUnknown(_) => HANDOVER_UNKNOWN.into(),
        E::NoSource {
            last: Some(last), ..
        } if !matches!(**last, E::Io(_) | E::PeerClosed) => {
            format!("the last source was refused: {}", hint(side, last))
        }
        E::NoSource { .. } => "no source arrived: check the source's --connect address and \
            key, or raise --incoming-timeout"
            .into(),
        E::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            "nothing listens there: start `rmig-bench dest --listen HOST:PORT` on the \
             destination first and check --connect"
                .into()
        }
        E::Io(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            "choose another --listen port, or stop the program that holds it".into()
        }
        E::Io(_) | E::PeerSilent(_) | E::PeerClosed => format!(
            "check that the {} still runs and the network between; --reconnect-window rides \
             out short outages",
            other(side)
        ),
        E::NoReconnect { .. } | E::SourceGone { .. } => format!(
            "the network stayed down longer than the reconnect window: check the {} and the \
             network between, or raise --reconnect-window",
            other(side)
        ),
        E::AllLanesFailed(_) | E::Lane { .. } => "the data connections failed: check the \
            network, or try fewer --lanes"
            .into(),
        E::Tls(_) => "check --tls-creds and --tls-hostname at both ends, or use the same \
            --encryption on both"
            .into(),
        _ if peer_text.contains(CLEARTEXT_FLAG)
            || matches!(e, E::Config(m) if m.contains(CLEARTEXT_FLAG)) =>
        {
            "RDMA with encryption on moves \
            pages in clear: give --rdma-cleartext-lanes to both ends to allow it, or use \
            --transport auto (TCP in TLS)"
                .into()
        }
        _ if peer_text.contains("encryption") => "use the same --encryption on both ends".into(),
        E::Rdma(_) => "use --transport tcp (or auto), or name the device with --rdma-dev".into(),
        E::VerifyFailed(_) => "destination memory differs from the source: this is a bug in \
            rmig or in the memory under it; please report it with this output"
            .into(),
        E::Protocol(_) => "the peer broke the protocol: run the same rmig on both hosts".into(),
        E::Config(_) => "check the flags against `rmig-bench --help`".into(),
        E::Embedder(_) | E::State(_) | E::PeerError(_) => {
            format!("see the {}'s own message for the cause", other(side))
        }
    }
}

fn same_guest() -> String {
    "use the same --size and --page-size on both ends".into()
}

fn same_key() -> String {
    "use the same key on both ends (--key-file or RMIG_KEY), or with --tls-creds none at either"
        .into()
}

fn other(side: Side) -> &'static str {
    match side {
        Side::Source => "destination",
        Side::Dest => "source",
    }
}

/// The destination's words, turned to the source's point of view: it says "here" for
/// itself and "at the peer" for us.
pub fn from_the_peer(m: &str) -> String {
    if !m.contains(" here") || !m.contains(" at the peer") {
        return m.to_string();
    }
    m.replace(" at the peer", " HERE_AT_SOURCE")
        .replace(" here", " at the destination")
        .replace(" HERE_AT_SOURCE", " here (the source)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_s_here_is_our_there() {
        let dest_said = "region table mismatch: region 0 (bench.ram, 67108864 bytes, page 4096) \
                         here vs 0 (bench.ram, 33554432 bytes, page 4096) at the peer";
        let ours = from_the_peer(dest_said);
        assert_eq!(
            ours,
            "region table mismatch: region 0 (bench.ram, 67108864 bytes, page 4096) at the \
             destination vs 0 (bench.ram, 33554432 bytes, page 4096) here (the source)"
        );
        assert_eq!(from_the_peer("no such words"), "no such words");
    }

    #[test]
    fn non_convergence_names_the_flags_that_help() {
        let h = hint(Side::Source, &EngineError::NotConverged("x".into()));
        for f in [
            "--downtime-limit",
            "--on-no-convergence",
            "--auto-converge",
            "--max-bandwidth",
        ] {
            assert!(h.contains(f), "{f}: {h}");
        }
    }

    #[test]
    fn rdma_refused_under_encryption_names_the_opt_in_flag() {
        let peer = format!(
            "no transport both ends can use ({})",
            "x; set --rdma-cleartext-lanes"
        );
        let own =
            EngineError::Config("y: set --rdma-cleartext-lanes (rdma_cleartext_lanes)".into());
        for e in [EngineError::PeerError(peer), own] {
            let h = hint(Side::Source, &e);
            assert!(
                h.contains("--rdma-cleartext-lanes") && h.contains("in clear"),
                "{h}"
            );
        }
        let other = hint(
            Side::Source,
            &EngineError::PeerError("encryption is off".into()),
        );
        assert!(!other.contains("--rdma-cleartext-lanes"), "{other}");
    }

    #[test]
    fn one_line_whatever_the_error() {
        let l = line(
            Side::Source,
            &EngineError::PeerError("region table mismatch: a here vs b at the peer".into()),
        );
        assert!(!l.contains('\n'), "{l}");
        assert!(
            l.contains("a at the destination vs b here (the source)"),
            "{l}"
        );
        assert!(l.contains("--size"), "{l}");
    }
}
