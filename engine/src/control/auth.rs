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
//!
//! **x509 without a pre-shared key** ([`Key::per_session`]), as QEMU's `tls-creds-x509` needs
//! no extra secret: the certificates authenticate both ends of every connection, and what
//! remains to prove is that a lane (or a reconnecting control connection) belongs to *this*
//! session. The session's HMAC key is then derived from the control connection's channel
//! binding, a TLS exporter value that only the two ends of that TLS session can compute; a
//! lane's proof under it, bound to the lane's own TLS session, shows that the lane was opened
//! by the end that holds the control connection. Without certificates (PSK mode, or
//! cleartext) such a key would prove nothing, since a relay that terminates TLS is an end of
//! both sessions it holds: [`check_key`] refuses that combination.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::tls::Encryption;
use crate::EngineError;

type HmacSha256 = Hmac<Sha256>;

/// A pre-shared key, or none: each session's key derived from its TLS session (x509 only).
#[derive(Clone)]
pub struct Key(Option<Secret>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(_) => f.write_str("Key(..)"),
            None => f.write_str("Key(per session)"),
        }
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
        Ok(Key(Some(Secret(t.to_vec()))))
    }

    /// No pre-shared key: each session's key is derived from the channel binding of its
    /// control connection (see the module doc). Only a session with mutual x509
    /// authentication ([`Encryption::X509`]) may use it ([`check_key`]).
    pub fn per_session() -> Key {
        Key(None)
    }

    /// Whether this is a pre-shared key (else [`Key::per_session`]).
    pub fn is_shared(&self) -> bool {
        self.0.is_some()
    }

    /// A fresh key of 32 random bytes from the operating system.
    pub fn random() -> Result<Key, EngineError> {
        Ok(Key(Some(Secret(nonce()?.to_vec()))))
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
}

/// Refuses a session without a pre-shared key unless it is authenticated by mutual x509
/// certificates: with throwaway certificates (PSK mode) or in cleartext, a key derived from
/// the connection would be known to any relay that terminates it.
pub fn check_key(key: &Key, enc: &Encryption) -> Result<(), EngineError> {
    match (key.is_shared(), enc) {
        (true, _) | (false, Encryption::X509(_)) => Ok(()),
        (false, _) => Err(EngineError::Config(format!(
            "no pre-shared key, and encryption is {}: only x509 certificates (tls-x509) \
             authenticate the peer without one; give a key or x509 credentials",
            enc.name()
        ))),
    }
}

/// An HMAC key in use: a pre-shared key, or one derived for a session.
#[derive(Clone)]
struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// The key of an x509 session without a pre-shared key: derived from the control
    /// connection's channel binding (a TLS exporter value, so a uniformly random secret of
    /// that TLS session) with HMAC as the key derivation function, under its own label so
    /// that it is independent of every other use of the binding.
    fn of_binding(binding: &[u8; 32]) -> Secret {
        let mut m = HmacSha256::new_from_slice(binding).expect("HMAC takes any key length");
        m.update(label::X509_SESSION_KEY);
        Secret(m.finalize().into_bytes().to_vec())
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
    fn sign(&self, label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        self.mac(label, parts).finalize().into_bytes().into()
    }

    /// Checks `tag` in constant time.
    fn check(&self, label: &[u8], parts: &[&[u8]], tag: &[u8; 32]) -> bool {
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
    /// The derivation of an x509 session's key from its control connection.
    pub const X509_SESSION_KEY: &[u8] = b"rmig-v1-x509-session-key";
}

/// What both ends know once authenticated: the two challenges, the control connection's
/// channel binding (over TLS), and on a source how its lanes open their TLS sessions.
#[derive(Debug, Clone)]
pub struct SessionAuth {
    key: Secret,
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
    /// From the key and both challenges, the control proofs bound to the channel binding of
    /// the connection they travel on (`None`: cleartext). Without a pre-shared key
    /// ([`Key::per_session`]) the session's key is derived from that binding, so there must
    /// be one.
    pub fn new(
        key: Key,
        dest_nonce: [u8; 32],
        source_nonce: [u8; 32],
        binding: Option<[u8; 32]>,
    ) -> Result<Self, EngineError> {
        let key = match (key.0, &binding) {
            (Some(k), _) => k,
            (None, Some(b)) => Secret::of_binding(b),
            (None, None) => {
                return Err(EngineError::Config(
                    "no pre-shared key, and the control connection is not TLS: nothing to \
                     derive the session's key from"
                        .into(),
                ))
            }
        };
        Ok(SessionAuth {
            key,
            dest_nonce,
            source_nonce,
            binding,
            lane_tls: None,
        })
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
        let a = SessionAuth::new(k.clone(), [1; 32], [2; 32], None).unwrap();
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
        let b = SessionAuth::new(k.clone(), [1; 32], [2; 32], Some([7; 32])).unwrap();
        assert!(b.check_source(&b.source_proof()));
        assert!(!a.check_source(&b.source_proof()));
        assert!(!b.check_dest(&a.dest_proof()));
        let other = SessionAuth::new(
            Key::new(b"another sixteen bytes").unwrap(),
            [1; 32],
            [2; 32],
            None,
        )
        .unwrap();
        assert!(!a.check_source(&other.source_proof()));
        let replay = SessionAuth::new(k, [9; 32], [2; 32], None).unwrap();
        assert!(!replay.check_source(&a.source_proof()));
    }

    #[test]
    fn per_session_keys_come_from_the_control_connection() {
        let pk = Key::per_session;
        // Cleartext: nothing to derive from.
        assert!(SessionAuth::new(pk(), [1; 32], [2; 32], None).is_err());
        let a = SessionAuth::new(pk(), [1; 32], [2; 32], Some([7; 32])).unwrap();
        let same = SessionAuth::new(pk(), [1; 32], [2; 32], Some([7; 32])).unwrap();
        assert!(same.check_source(&a.source_proof()));
        assert_eq!(a.session_id(), same.session_id());
        // Another control connection (a relay's, another session's) has another binding:
        // none of its proofs hold here, lanes' included.
        let b = SessionAuth::new(pk(), [1; 32], [2; 32], Some([8; 32])).unwrap();
        assert!(!b.check_source(&a.source_proof()));
        assert_ne!(a.session_id(), b.session_id());
        let lane = a.bound_lane_proof(0, Some(&[9; 32]));
        assert!(same.check_lane(0, Some(&[9; 32]), &lane));
        assert!(!b.check_lane(0, Some(&[9; 32]), &lane));
        // The derived key is not the binding itself.
        let raw = SessionAuth::new(
            Key(Some(Secret(vec![7; 32]))),
            [1; 32],
            [2; 32],
            Some([7; 32]),
        )
        .unwrap();
        assert!(!raw.check_source(&a.source_proof()));
    }

    #[test]
    fn only_x509_may_go_without_a_key() {
        let x509 = Encryption::X509(crate::X509Creds {
            dir: "/nonexistent".into(),
            hostname: None,
        });
        assert!(check_key(&Key::per_session(), &x509).is_ok());
        for enc in [Encryption::Psk, Encryption::Off] {
            let e = check_key(&Key::per_session(), &enc).unwrap_err();
            assert!(e.to_string().contains(enc.name()), "{e}");
            assert!(check_key(&Key::random().unwrap(), &enc).is_ok());
        }
    }
}
