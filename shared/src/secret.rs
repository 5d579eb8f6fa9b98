//! `Secret`: a string that never shows itself.
//!
//! Passwords, token secrets, tickets and students' initial passwords travel through labfleet
//! as `Secret`. Its `Debug` and `Display` print `<redacted>`, it has no `Serialize`, and the
//! only way to read it is the explicit [`Secret::expose`], so a secret cannot reach a log
//! line, an error message or a Redis value by accident.

use std::fmt;

/// A secret string. Read it with [`Secret::expose`] at the one place that needs the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value. Call this only where the value goes to its destination (an HTTP
    /// form field, a header, an encryption routine), never to format a message.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("hunter2-very-secret");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert_eq!(format!("{s}"), "<redacted>");
        assert_eq!(format!("{:?}", Some(&s)), "Some(Secret(<redacted>))");
        assert_eq!(s.expose(), "hunter2-very-secret");
    }
}

// ---------------------------------------------------------------------------------------
// `enc:` secrets: ChaCha20-Poly1305 (RustCrypto's audited AEAD) under a 32-byte key.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};

/// Environment variable holding the key, base64 of 32 bytes.
pub const KEY_ENV: &str = "LABFLEET_SECRET_KEY";
/// Environment variable naming a file that holds the key (base64, one line).
pub const KEY_FILE_ENV: &str = "LABFLEET_SECRET_KEY_FILE";
/// The prefix of an encrypted value.
pub const ENC_PREFIX: &str = "enc:";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "no secret key: set {KEY_ENV} (base64 of 32 bytes) or {KEY_FILE_ENV} (a file holding it); `producer secret keygen` makes one"
    )]
    NoKey,
    #[error("the secret key is not base64 of 32 bytes (from {origin})")]
    BadKey { origin: String },
    #[error("cannot read the key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("an `enc:` value is malformed (not base64 of nonce and ciphertext)")]
    Malformed,
    #[error("an `enc:` value does not decrypt with this key (wrong key, or the value was altered)")]
    WrongKey,
    #[error("environment variable {0} is not set")]
    EnvMissing(String),
    #[error("cannot read secret file {path}: {reason}")]
    File { path: String, reason: String },
    #[error(
        "secret file {path} is larger than {limit} bytes, the limit for a file holding a secret or key; not reading it"
    )]
    FileTooLarge { path: String, limit: u64 },
}

/// Largest file [`read_secret_file`] reads: a password, token secret or key is a line.
pub const MAX_SECRET_FILE_BYTES: u64 = 64 << 10;

/// Reads a file that holds a secret (a `password_file`, a `token_secret_file`, the key
/// file), at most [`MAX_SECRET_FILE_BYTES`]: a path pointing at a log, a disk image or
/// `/dev/zero` by mistake is refused instead of read into memory. Errors name the file and
/// never quote its content.
pub fn read_secret_file(path: &std::path::Path) -> Result<Secret, SecretError> {
    use std::io::Read;
    let shown = || path.display().to_string();
    let io_err = |e: std::io::Error| SecretError::File {
        path: shown(),
        reason: e.kind().to_string(),
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(SecretError::FileTooLarge {
            path: shown(),
            limit: MAX_SECRET_FILE_BYTES,
        });
    }
    String::from_utf8(bytes)
        .map(Secret::new)
        .map_err(|_| SecretError::File {
            path: shown(),
            reason: "not valid UTF-8".into(),
        })
}

/// The key that seals `enc:` values and the students' initial passwords in Redis.
#[derive(Clone)]
pub struct SecretKey([u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl SecretKey {
    pub fn generate() -> SecretKey {
        let mut k = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut k);
        SecretKey(k)
    }

    pub fn from_base64(s: &str, origin: &str) -> Result<SecretKey, SecretError> {
        let bytes = B64.decode(s.trim()).map_err(|_| SecretError::BadKey {
            origin: origin.to_owned(),
        })?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| SecretError::BadKey {
            origin: origin.to_owned(),
        })?;
        Ok(SecretKey(arr))
    }

    pub fn to_base64(&self) -> Secret {
        Secret::new(B64.encode(self.0))
    }

    /// The key from `LABFLEET_SECRET_KEY` or the file named by `LABFLEET_SECRET_KEY_FILE`.
    pub fn from_env() -> Result<SecretKey, SecretError> {
        if let Ok(v) = std::env::var(KEY_ENV) {
            return SecretKey::from_base64(&v, KEY_ENV);
        }
        if let Ok(path) = std::env::var(KEY_FILE_ENV) {
            let text = read_secret_file(std::path::Path::new(&path)).map_err(|e| match e {
                SecretError::File { path, reason } => SecretError::KeyFile { path, reason },
                other => other,
            })?;
            return SecretKey::from_base64(text.expose(), &path);
        }
        Err(SecretError::NoKey)
    }

    /// Derives a sub-key for `purpose` (HMAC-SHA256), e.g. to derive students' passwords.
    pub fn derive(&self, purpose: &str, data: &str) -> [u8; 32] {
        use hmac::{Hmac, Mac};
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(purpose.as_bytes());
        mac.update(&[0]);
        mac.update(data.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Seals `plain` as `enc:<base64(nonce || ciphertext)>`.
    pub fn seal(&self, plain: &Secret) -> String {
        let cipher = ChaCha20Poly1305::new((&self.0).into());
        let mut nonce = [0u8; 12];
        rand::Rng::fill(&mut rand::rng(), &mut nonce);
        let ct = cipher
            .encrypt(Nonce::from_slice(&nonce), plain.expose().as_bytes())
            .expect("encryption of a short string cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        format!("{ENC_PREFIX}{}", B64.encode(out))
    }

    /// Opens an `enc:` value.
    pub fn open(&self, sealed: &str) -> Result<Secret, SecretError> {
        let body = sealed.strip_prefix(ENC_PREFIX).unwrap_or(sealed);
        let bytes = B64
            .decode(body.trim())
            .map_err(|_| SecretError::Malformed)?;
        if bytes.len() < 12 + 16 {
            return Err(SecretError::Malformed);
        }
        let (nonce, ct) = bytes.split_at(12);
        let cipher = ChaCha20Poly1305::new((&self.0).into());
        let plain = cipher
            .decrypt(Nonce::from_slice(nonce), ct)
            .map_err(|_| SecretError::WrongKey)?;
        String::from_utf8(plain)
            .map(Secret::new)
            .map_err(|_| SecretError::Malformed)
    }
}

/// Whether a configured secret is an `enc:` value.
pub fn is_sealed(s: &str) -> bool {
    s.starts_with(ENC_PREFIX)
}

#[cfg(test)]
mod file_tests {
    use super::*;

    #[test]
    fn secret_files_are_capped_and_errors_never_quote_them() {
        let dir = tempfile::tempdir().unwrap();
        let at_limit = dir.path().join("at-limit");
        std::fs::write(&at_limit, "k".repeat(MAX_SECRET_FILE_BYTES as usize)).unwrap();
        assert_eq!(
            read_secret_file(&at_limit).unwrap().expose().len(),
            MAX_SECRET_FILE_BYTES as usize
        );
        let big = dir.path().join("big");
        std::fs::write(&big, "s3cr3t-".repeat(10_000)).unwrap();
        let err = read_secret_file(&big).unwrap_err();
        assert!(
            matches!(&err, SecretError::FileTooLarge { limit, .. } if *limit == MAX_SECRET_FILE_BYTES),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains(&big.display().to_string()), "{text}");
        assert!(text.contains("65536 bytes"), "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
        // An endless file is refused after the cap, not read until memory runs out.
        let err = read_secret_file(std::path::Path::new("/dev/zero")).unwrap_err();
        assert!(matches!(err, SecretError::FileTooLarge { .. }), "{err:?}");
        let bad = dir.path().join("binary");
        std::fs::write(&bad, [0xff, 0xfe, b's', b'3']).unwrap();
        let err = read_secret_file(&bad).unwrap_err().to_string();
        assert!(
            err.contains("not valid UTF-8") && !err.contains("s3"),
            "{err}"
        );
    }

    #[test]
    fn password_and_token_secret_files_go_through_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("pw");
        std::fs::write(&big, "p".repeat(MAX_SECRET_FILE_BYTES as usize + 1)).unwrap();
        let err = crate::config::resolve_secret(&crate::config::SecretSource::File(big), None)
            .unwrap_err();
        assert!(matches!(err, SecretError::FileTooLarge { .. }), "{err:?}");
    }
}

#[cfg(test)]
mod sealing_tests {
    use super::*;

    #[test]
    fn seal_and_open_round_trip_and_detect_tampering() {
        let k = SecretKey::generate();
        let s = k.seal(&Secret::new("p@ss word"));
        assert!(s.starts_with("enc:"));
        assert!(!s.contains("p@ss"));
        assert_eq!(k.open(&s).unwrap().expose(), "p@ss word");
        let other = SecretKey::generate();
        assert!(matches!(other.open(&s), Err(SecretError::WrongKey)));
        assert!(matches!(k.open("enc:!!"), Err(SecretError::Malformed)));
        let k2 = SecretKey::from_base64(k.to_base64().expose(), "test").unwrap();
        assert_eq!(k2.open(&s).unwrap().expose(), "p@ss word");
        assert_eq!(format!("{k:?}"), "SecretKey(<redacted>)");
    }
}
