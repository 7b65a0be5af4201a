//! Per-pod tokens for the node-local endpoints (the MetaServer, and modules' endpoints such as
//! the AI layer's local controller).
//!
//! Every container edged starts gets `SEDGE_POD_TOKEN` in its environment: an HMAC-SHA256 of its
//! pod's UID under a key that never leaves the node (`<data_dir>/pod-token.key`, mode 0600). A
//! request carrying it as `Authorization: Bearer <token>` proves it comes from that pod (or from
//! root, who can read any process's environment anyway); another local user, or another pod,
//! cannot make one. No state is kept per pod: the token is recomputed to check it. The node's
//! operator gets an administrator token in `<data_dir>/metaserver.token` (0600).

use std::path::Path;

use ring::hmac;

/// The environment variable that carries a container's pod token.
pub const ENV: &str = "SEDGE_POD_TOKEN";

/// What the UID of the node administrator's token is made from (no pod has it: UIDs are
/// letters, digits and '-').
const ADMIN: &str = "@node-admin";

/// The node's pod-token key.
pub struct PodTokens {
    key: hmac::Key,
}

impl std::fmt::Debug for PodTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PodTokens")
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl PodTokens {
    /// Loads the key from `dir` or creates it, and writes the administrator token beside it.
    pub fn load_or_create(dir: &Path) -> std::io::Result<PodTokens> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join("pod-token.key");
        let secret = match std::fs::read(&path) {
            Ok(b) if b.len() == 32 => b,
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{}: not a 32-byte key; remove it to make a new one (pods get new tokens when restarted)",
                    path.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
                    .map_err(|_| std::io::Error::other("no system randomness"))?;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)?;
                std::io::Write::write_all(&mut f, &key)?;
                key.to_vec()
            }
            Err(e) => return Err(e),
        };
        let t = PodTokens {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
        };
        let admin = dir.join("metaserver.token");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&admin)?;
        std::io::Write::write_all(&mut f, t.token(ADMIN).as_bytes())?;
        Ok(t)
    }

    /// The token of the pod with this UID.
    pub fn token(&self, uid: &str) -> String {
        hex(hmac::sign(&self.key, uid.as_bytes()).as_ref())
    }

    /// Whether `token` is the token of the pod with this UID (constant time).
    pub fn verify(&self, uid: &str, token: &str) -> bool {
        let Some(bytes) = unhex(token) else {
            return false;
        };
        !uid.is_empty() && hmac::verify(&self.key, uid.as_bytes(), &bytes).is_ok()
    }

    /// Whether `token` is the node administrator's.
    pub fn is_admin(&self, token: &str) -> bool {
        self.verify(ADMIN, token)
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    (0..64)
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_bind_a_pod_and_survive_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let t = PodTokens::load_or_create(d.path()).unwrap();
        let a = t.token("uid-a");
        assert!(t.verify("uid-a", &a));
        assert!(!t.verify("uid-b", &a), "one pod's token is not another's");
        assert!(!t.verify("uid-a", "00"), "garbage is refused");
        assert!(!t.verify("", &t.token("")));
        let admin = std::fs::read_to_string(d.path().join("metaserver.token")).unwrap();
        assert!(t.is_admin(&admin) && !t.is_admin(&a));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join("pod-token.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = PodTokens::load_or_create(d.path()).unwrap();
        assert!(again.verify("uid-a", &a));
        let other = tempfile::tempdir().unwrap();
        assert!(
            !PodTokens::load_or_create(other.path())
                .unwrap()
                .verify("uid-a", &a)
        );
    }
}
