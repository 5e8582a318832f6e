//! Pre-shared-key authentication by challenge and response; the key never travels.
//!
//! Each side sends a random 32-byte challenge; each proves the key with an HMAC-SHA256 over
//! both challenges under its own label, so a recorded answer is useless in another session and
//! neither side can be used as an oracle for the other's proof. Data lanes prove membership of
//! the session with an HMAC over both challenges and their lane number.
//!
//! Over TLS, each proof also covers the channel binding of the connection it travels on
//! ([`tls::binding`](super::tls::binding)): a relay that terminates TLS towards both ends
//! holds two sessions with different bindings, so a proof it passes along fails.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::EngineError;

type HmacSha256 = Hmac<Sha256>;

/// A pre-shared key.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Shortest key accepted, in bytes: 128 bits, HMAC-SHA256's own floor of strength.
pub const MIN_KEY_LEN: usize = 16;

impl Key {
    /// A key from its bytes; surrounding whitespace (a key file's newline) is ignored. Keys
    /// shorter than [`MIN_KEY_LEN`] bytes are refused.
    pub fn new(bytes: &[u8]) -> Result<Key, EngineError> {
        let t = bytes.trim_ascii();
        if t.len() < MIN_KEY_LEN {
            return Err(EngineError::Config(format!(
                "the pre-shared key has {} bytes; at least {MIN_KEY_LEN} are needed (make one \
                 with `head -c 32 /dev/urandom | base64 > rmig.key`)",
                t.len()
            )));
        }
        Ok(Key(t.to_vec()))
    }

    /// A fresh key of 32 random bytes from the operating system.
    pub fn random() -> Result<Key, EngineError> {
        Ok(Key(nonce()?.to_vec()))
    }

    /// Reads a key file. Like ssh, refuses a file that group or others may read or write,
    /// and says which `chmod` fixes it.
    pub fn from_file(path: &std::path::Path) -> Result<Key, EngineError> {
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display();
        let meta = std::fs::metadata(path)
            .map_err(|e| EngineError::Config(format!("key file {shown}: {e}")))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(EngineError::Config(format!(
                "key file {shown} has mode {mode:03o}, so others may read it; \
                 run `chmod 600 {shown}`"
            )));
        }
        let bytes = std::fs::read(path)
            .map_err(|e| EngineError::Config(format!("key file {shown}: {e}")))?;
        Key::new(&bytes)
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        for p in parts {
            m.update(&(p.len() as u32).to_le_bytes());
            m.update(p);
        }
        m
    }

    /// The HMAC of `parts` under `label`.
    pub fn sign(&self, label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        self.mac(label, parts).finalize().into_bytes().into()
    }

    /// Checks `tag` in constant time.
    pub fn check(&self, label: &[u8], parts: &[&[u8]], tag: &[u8; 32]) -> bool {
        self.mac(label, parts).verify_slice(tag).is_ok()
    }
}

/// A fresh random challenge.
pub fn nonce() -> Result<[u8; 32], EngineError> {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n)
        .map_err(|e| EngineError::io(std::io::ErrorKind::Other, format!("no randomness: {e}")))?;
    Ok(n)
}

/// Labels of the proofs.
pub mod label {
    /// The source's proof.
    pub const SOURCE: &[u8] = b"rmig-v1-source";
    /// The destination's proof.
    pub const DEST: &[u8] = b"rmig-v1-dest";
    /// The session identifier.
    pub const SESSION: &[u8] = b"rmig-v1-session";
    /// A lane's proof.
    pub const LANE: &[u8] = b"rmig-v1-lane";
    /// The source's proof when it reconnects a session.
    pub const REJOIN: &[u8] = b"rmig-v2-rejoin";
    /// The destination's answer to a reconnect.
    pub const REJOIN_OK: &[u8] = b"rmig-v2-rejoin-ok";
}

/// What both ends know once authenticated: the two challenges, the control connection's
/// channel binding (over TLS), and on a source how its lanes open their TLS sessions.
#[derive(Debug, Clone)]
pub struct SessionAuth {
    key: Key,
    dest_nonce: [u8; 32],
    source_nonce: [u8; 32],
    /// The control connection's TLS channel binding, when it is encrypted.
    binding: Option<[u8; 32]>,
    /// How a source's lanes open TLS sessions (`None`: cleartext, or a destination).
    lane_tls: Option<std::sync::Arc<super::tls::ClientTls>>,
}

/// A proof's parts, with the channel binding last when there is one (a cleartext session's
/// proofs are unchanged by it).
fn bound<'a>(parts: &[&'a [u8]], binding: Option<&'a [u8; 32]>) -> Vec<&'a [u8]> {
    let mut v = parts.to_vec();
    if let Some(b) = binding {
        v.push(b);
    }
    v
}

impl SessionAuth {
    /// From the key and both challenges.
    pub fn new(key: Key, dest_nonce: [u8; 32], source_nonce: [u8; 32]) -> Self {
        SessionAuth {
            key,
            dest_nonce,
            source_nonce,
            binding: None,
            lane_tls: None,
        }
    }

    /// Binds the control proofs to the channel binding of the connection they travel on.
    pub fn bound_to(mut self, binding: Option<[u8; 32]>) -> Self {
        self.binding = binding;
        self
    }

    /// Sets how this source's lanes open their TLS sessions.
    pub fn with_lane_tls(mut self, tls: Option<std::sync::Arc<super::tls::ClientTls>>) -> Self {
        self.lane_tls = tls;
        self
    }

    /// How this source's lanes open their TLS sessions (`None`: cleartext).
    pub fn lane_tls(&self) -> Option<&std::sync::Arc<super::tls::ClientTls>> {
        self.lane_tls.as_ref()
    }

    /// The source's proof.
    pub fn source_proof(&self) -> [u8; 32] {
        let parts = bound(
            &[&self.dest_nonce, &self.source_nonce],
            self.binding.as_ref(),
        );
        self.key.sign(label::SOURCE, &parts)
    }

    /// The destination's proof.
    pub fn dest_proof(&self) -> [u8; 32] {
        let parts = bound(
            &[&self.source_nonce, &self.dest_nonce],
            self.binding.as_ref(),
        );
        self.key.sign(label::DEST, &parts)
    }

    /// The session's identifier.
    pub fn session_id(&self) -> [u8; 16] {
        let t = self
            .key
            .sign(label::SESSION, &[&self.dest_nonce, &self.source_nonce]);
        t[..16].try_into().expect("16 of 32 bytes")
    }

    /// Lane `lane`'s proof of membership (on a cleartext lane).
    pub fn lane_proof(&self, lane: u16) -> [u8; 32] {
        self.bound_lane_proof(lane, None)
    }

    /// Lane `lane`'s proof of membership, bound to the lane connection's own TLS channel
    /// binding when it has one.
    pub fn bound_lane_proof(&self, lane: u16, binding: Option<&[u8; 32]>) -> [u8; 32] {
        let l = lane.to_le_bytes();
        let parts = bound(&[&self.dest_nonce, &self.source_nonce, &l], binding);
        self.key.sign(label::LANE, &parts)
    }

    /// Checks a lane's proof in constant time, against the lane connection's binding.
    pub fn check_lane(&self, lane: u16, binding: Option<&[u8; 32]>, tag: &[u8; 32]) -> bool {
        let l = lane.to_le_bytes();
        let parts = bound(&[&self.dest_nonce, &self.source_nonce, &l], binding);
        self.key.check(label::LANE, &parts, tag)
    }

    /// The source's proof for reconnect attempt `attempt` (each attempt's proof differs, and
    /// the destination accepts each attempt number once), bound to the new control
    /// connection's TLS channel binding when it has one.
    pub fn rejoin_proof(&self, attempt: u32, binding: Option<&[u8; 32]>) -> [u8; 32] {
        let a = attempt.to_le_bytes();
        let parts = bound(&[&self.dest_nonce, &self.source_nonce, &a], binding);
        self.key.sign(label::REJOIN, &parts)
    }

    /// Checks a reconnect proof in constant time, against the connection's binding.
    pub fn check_rejoin(&self, attempt: u32, binding: Option<&[u8; 32]>, tag: &[u8; 32]) -> bool {
        let a = attempt.to_le_bytes();
        let parts = bound(&[&self.dest_nonce, &self.source_nonce, &a], binding);
        self.key.check(label::REJOIN, &parts, tag)
    }

    /// The destination's answer to reconnect attempt `attempt`, binding the round it expects
    /// (and the connection's TLS channel binding when it has one).
    pub fn rejoin_ok_proof(
        &self,
        attempt: u32,
        next_round: u32,
        binding: Option<&[u8; 32]>,
    ) -> [u8; 32] {
        let (a, n) = (attempt.to_le_bytes(), next_round.to_le_bytes());
        let parts = bound(&[&self.source_nonce, &self.dest_nonce, &a, &n], binding);
        self.key.sign(label::REJOIN_OK, &parts)
    }

    /// Checks the destination's answer to a reconnect.
    pub fn check_rejoin_ok(
        &self,
        attempt: u32,
        next_round: u32,
        binding: Option<&[u8; 32]>,
        tag: &[u8; 32],
    ) -> bool {
        let (a, n) = (attempt.to_le_bytes(), next_round.to_le_bytes());
        let parts = bound(&[&self.source_nonce, &self.dest_nonce, &a, &n], binding);
        self.key.check(label::REJOIN_OK, &parts, tag)
    }

    /// Checks the source's proof.
    pub fn check_source(&self, tag: &[u8; 32]) -> bool {
        let parts = bound(
            &[&self.dest_nonce, &self.source_nonce],
            self.binding.as_ref(),
        );
        self.key.check(label::SOURCE, &parts, tag)
    }

    /// Checks the destination's proof.
    pub fn check_dest(&self, tag: &[u8; 32]) -> bool {
        let parts = bound(
            &[&self.source_nonce, &self.dest_nonce],
            self.binding.as_ref(),
        );
        self.key.check(label::DEST, &parts, tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keys_are_refused() {
        let e = Key::new(b"fifteen bytes!!").unwrap_err();
        assert!(e.to_string().contains("at least 16"), "{e}");
        assert!(Key::new(b"  sixteen bytes!!!\n").is_ok());
        assert!(Key::new(b"  \n").is_err());
    }

    #[test]
    fn key_files_readable_by_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("rmig-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        std::fs::write(&path, b"a key of more than sixteen bytes\n").unwrap();
        for (mode, ok) in [(0o600, true), (0o400, true), (0o640, false), (0o604, false)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = Key::from_file(&path);
            assert_eq!(r.is_ok(), ok, "mode {mode:o}");
            if let Err(e) = r {
                assert!(e.to_string().contains("chmod 600"), "{e}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn proofs_bind_key_nonces_and_lane() {
        let k = Key::new(b"secret of sixteen bytes\n").unwrap();
        let a = SessionAuth::new(k.clone(), [1; 32], [2; 32]);
        assert!(a.check_source(&a.source_proof()));
        assert!(a.check_dest(&a.dest_proof()));
        assert!(!a.check_source(&a.dest_proof()));
        assert!(a.check_lane(3, None, &a.lane_proof(3)));
        assert!(!a.check_lane(4, None, &a.lane_proof(3)));
        // Bound to a TLS session: only that session's binding checks.
        let p = a.bound_lane_proof(3, Some(&[7; 32]));
        assert!(a.check_lane(3, Some(&[7; 32]), &p));
        assert!(!a.check_lane(3, Some(&[8; 32]), &p));
        assert!(!a.check_lane(3, None, &p));
        let b = a.clone().bound_to(Some([7; 32]));
        assert!(b.check_source(&b.source_proof()));
        assert!(!a.check_source(&b.source_proof()));
        assert!(!b.check_dest(&a.dest_proof()));
        let other = SessionAuth::new(
            Key::new(b"another sixteen bytes").unwrap(),
            [1; 32],
            [2; 32],
        );
        assert!(!a.check_source(&other.source_proof()));
        let replay = SessionAuth::new(k, [9; 32], [2; 32]);
        assert!(!replay.check_source(&a.source_proof()));
    }
}
