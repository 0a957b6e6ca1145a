//! Signed entries: an ed25519 signature over what a restore relies on, so a job that
//! may write the bucket cannot make another job restore what it did not write.
//!
//! A signature states "the object at this key has this size and this sha256" (see
//! [`statement`]); it travels in the object's metadata beside the sha256, so the body
//! stays byte-for-byte what `aws s3 cp` reads. For a chunked entry the body is the
//! manifest, whose chunk ids are blake3 hashes of the content: signing it covers every
//! byte restored. Keys are PKCS#8 / SPKI PEM files, as `openssl genpkey -algorithm
//! ed25519` writes them. docs/format.md ("Signatures") is the reference.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine;
use ed25519_dalek::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, KeypairBytes,
};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::cli::InputError;
use crate::config::Config;
use crate::store::ObjectInfo;

/// Metadata key (without the `x-amz-meta-` prefix) holding an object's signature.
pub const META_SIGNATURE: &str = "cacher-signature";

/// The signing scheme named in the metadata value, before the key id.
const SCHEME: &str = "ed25519";

/// What a job signs with and which signers it accepts.
#[derive(Default)]
pub struct Trust {
    signer: Option<Signer>,
    trusted: Vec<PublicKey>,
    required: bool,
}

/// The private key uploads sign with.
struct Signer {
    key: SigningKey,
    public: PublicKey,
}

/// A public key a restore accepts signatures of.
#[derive(Clone)]
pub struct PublicKey {
    key: VerifyingKey,
    /// The file it was read from.
    pub path: PathBuf,
    /// Its key id (see [`key_id`]).
    pub id: String,
}

/// What [`Trust::check`] found about an object it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No key is configured: signatures are not looked at.
    Unchecked,
    /// No signature, and none is required.
    Unsigned,
    /// Signed by the trusted key with this id.
    Signed(String),
}

/// An entry a restore must not use: unsigned where a signature is required, signed by
/// a key not trusted, or a signature that does not match.
#[derive(Debug, thiserror::Error)]
#[error("{key} is not trusted: {reason}")]
pub struct Untrusted {
    /// The object's key.
    pub key: String,
    /// Why, in a few words naming the key id where there is one.
    pub reason: String,
}

/// Whether `e` (or its cause) is an [`Untrusted`] refusal.
pub fn is_untrusted(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Untrusted>())
}

impl Trust {
    /// The keys `config` names, read from their files. An unreadable or malformed key
    /// file is a mistake to fix (exit 2), never a silent fallback to no signatures.
    pub fn from_config(config: &Config) -> anyhow::Result<Trust> {
        let signer = match &config.signing_key.value {
            Some(path) => {
                let key = read_private(path)?;
                let public = PublicKey::new(key.verifying_key(), path.clone());
                Some(Signer { key, public })
            }
            None => None,
        };
        let mut trusted = config
            .trusted_keys
            .value
            .iter()
            .map(|path| read_public(path).map(|key| PublicKey::new(key, path.clone())))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // A job trusts what it signs itself.
        if let Some(signer) = &signer {
            trusted.push(signer.public.clone());
        }
        let required = config.require_signature.value;
        if required && trusted.is_empty() {
            return Err(InputError(
                "require_signature is set but no trusted_keys or signing_key is: no entry could ever be restored".into(),
            )
            .into());
        }
        Ok(Trust {
            signer,
            trusted,
            required,
        })
    }

    /// Whether uploads sign.
    pub fn can_sign(&self) -> bool {
        self.signer.is_some()
    }

    /// Whether restores look at signatures at all (some key is configured).
    pub fn checks(&self) -> bool {
        !self.trusted.is_empty()
    }

    /// The public key uploads sign with, when there is one (for `doctor`).
    pub fn signing_public_key(&self) -> Option<&PublicKey> {
        self.signer.as_ref().map(|s| &s.public)
    }

    /// The keys whose signatures are accepted, the signer's own included.
    pub fn trusted(&self) -> &[PublicKey] {
        &self.trusted
    }

    /// Whether restores take only signed entries.
    pub fn required(&self) -> bool {
        self.required
    }

    /// The metadata value signing the object `key` of `size` bytes with sha256
    /// `sha256` (lowercase hex); `None` without a signing key.
    pub fn sign(&self, key: &str, size: u64, sha256: &str) -> Option<String> {
        let signer = self.signer.as_ref()?;
        let signature = signer.key.sign(&statement(key, size, sha256));
        let encoded = base64::engine::general_purpose::STANDARD.encode(signature.to_bytes());
        Some(format!("{SCHEME}:{}:{encoded}", signer.public.id))
    }

    /// Whether a restore may use the object `info` (as a HEAD or GET returned it,
    /// metadata included). The caller must still check that the bytes it reads hash to
    /// `info.sha256`, which is what the signature covers.
    pub fn check(&self, info: &ObjectInfo) -> Result<Verdict, Untrusted> {
        if !self.checks() {
            return Ok(Verdict::Unchecked);
        }
        let refuse = |reason: String| Untrusted {
            key: info.key.clone(),
            reason,
        };
        let Some(value) = &info.signature else {
            return match self.required {
                true => Err(refuse(
                    "it is not signed, and require_signature is set".into(),
                )),
                false => Ok(Verdict::Unsigned),
            };
        };
        let (id, signature) = parse_signature(value).map_err(refuse)?;
        // The id is the writer's text: named in messages only when it is one.
        if id.len() != 16 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(refuse("its signature names a malformed key id".into()));
        }
        let Some(signer) = self.trusted.iter().find(|k| k.id == id) else {
            return Err(refuse(format!(
                "it is signed by key {id}, which is not among the trusted keys"
            )));
        };
        let Some(sha256) = &info.sha256 else {
            return Err(refuse(format!(
                "it carries a signature by {id} but no sha256 to check it against"
            )));
        };
        let message = statement(&info.key, info.size, &sha256.to_ascii_lowercase());
        signer.key.verify(&message, &signature).map_err(|_| {
            refuse(format!(
                "its signature by key {id} does not match its key, size and sha256 (tampered, or copied from another entry)"
            ))
        })?;
        Ok(Verdict::Signed(id.to_string()))
    }
}

impl PublicKey {
    fn new(key: VerifyingKey, path: PathBuf) -> PublicKey {
        PublicKey {
            id: key_id(&key),
            key,
            path,
        }
    }
}

/// The bytes a signature covers: the object's full key in the bucket (prefix
/// included, so an entry copied to another key no longer verifies), its size and the
/// sha256 of its bytes.
pub fn statement(key: &str, size: u64, sha256: &str) -> Vec<u8> {
    format!("cacher-signature-v1\n{key}\n{size}\n{sha256}\n").into_bytes()
}

/// A public key's id: the first 8 bytes of the sha256 of its 32 raw bytes, in hex.
/// Shown by `keygen` and `doctor`, named in refusals, and written before each
/// signature so a reader knows which trusted key to check it with.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// The key id and signature of a metadata value `ed25519:<key id>:<base64>`.
fn parse_signature(value: &str) -> Result<(&str, Signature), String> {
    let mut parts = value.trim().splitn(3, ':');
    let (Some(SCHEME), Some(id), Some(encoded)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("its signature is not of the form ed25519:<key id>:<signature>".into());
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .ok_or_else(|| "its signature is not 64 bytes of base64".to_string())?;
    Ok((id, Signature::from_bytes(&bytes)))
}

/// Writes a new key pair: `path` (the private key, mode 0600, never overwritten) and
/// `path.pub`; returns the key id.
pub fn keygen(path: &Path) -> anyhow::Result<String> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed)
        .map_err(|e| anyhow::anyhow!("no randomness from the system: {e}"))?;
    let key = SigningKey::from_bytes(&seed);
    // PKCS#8 v1 (the seed alone), as `openssl genpkey` writes it: OpenSSL 3.0 cannot
    // read the v2 form that carries the public key too.
    let private = KeypairBytes {
        secret_key: seed,
        public_key: None,
    }
    .to_pkcs8_pem(Default::default())
    .context("cannot encode the private key")?;
    let public = key
        .verifying_key()
        .to_public_key_pem(Default::default())
        .context("cannot encode the public key")?;
    let public_path = pub_path(path);
    for p in [path, public_path.as_path()] {
        if p.symlink_metadata().is_ok() {
            return Err(
                InputError(format!("{} exists; not overwriting a key", p.display())).into(),
            );
        }
    }
    let write = |p: &Path, text: &[u8], mode: u32| -> anyhow::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(p)
            .map_err(|e| InputError(format!("cannot create {}: {e}", p.display())))?;
        file.write_all(text)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot write {}", p.display()))
    };
    write(path, private.as_bytes(), 0o600)?;
    if let Err(e) = write(&public_path, public.as_bytes(), 0o644) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(key_id(&key.verifying_key()))
}

/// Where `keygen` writes the public key of `path`: `path` with `.pub` appended.
pub fn pub_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".pub");
    PathBuf::from(name)
}

fn read_key_file(path: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| InputError(format!("cannot read the {what} {}: {e}", path.display())).into())
}

fn read_private(path: &Path) -> anyhow::Result<SigningKey> {
    let pem = read_key_file(path, "signing_key")?;
    let key = SigningKey::from_pkcs8_pem(&pem).map_err(|_| {
        InputError(format!(
            "signing_key {} is not an ed25519 private key in PEM (make one with `cacher keygen`)",
            path.display()
        ))
    })?;
    if let Ok(meta) = std::fs::metadata(path)
        && std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077 != 0
    {
        crate::ui::warn(format!(
            "the signing_key {} can be read by other users; chmod 600 it",
            path.display()
        ));
    }
    Ok(key)
}

fn read_public(path: &Path) -> anyhow::Result<VerifyingKey> {
    let pem = read_key_file(path, "trusted key")?;
    VerifyingKey::from_public_key_pem(&pem).map_err(|_| {
        InputError(format!(
            "trusted key {} is not an ed25519 public key in PEM (the .pub file `cacher keygen` writes)",
            path.display()
        ))
        .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trust_of(seed: u8, trusted: &[u8], required: bool) -> Trust {
        let signer = (seed != 0).then(|| {
            let key = SigningKey::from_bytes(&[seed; 32]);
            let public = PublicKey::new(key.verifying_key(), PathBuf::new());
            Signer { key, public }
        });
        let trusted = trusted
            .iter()
            .map(|s| {
                PublicKey::new(
                    SigningKey::from_bytes(&[*s; 32]).verifying_key(),
                    PathBuf::new(),
                )
            })
            .collect();
        Trust {
            signer,
            trusted,
            required,
        }
    }

    fn info(key: &str, size: u64, sha256: &str, signature: Option<String>) -> ObjectInfo {
        ObjectInfo {
            key: key.into(),
            size,
            modified: None,
            etag: None,
            sha256: Some(sha256.into()),
            signature,
        }
    }

    const SHA: &str = "aa00000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn a_signature_covers_key_size_and_sha256() {
        let main = trust_of(1, &[], false);
        let reader = trust_of(0, &[1], true);
        let sig = main.sign("p/k", 10, SHA);
        let id = key_id(&SigningKey::from_bytes(&[1; 32]).verifying_key());
        assert_eq!(
            reader.check(&info("p/k", 10, SHA, sig.clone())).unwrap(),
            Verdict::Signed(id)
        );
        for other in [
            info("p/other", 10, SHA, sig.clone()),
            info("p/k", 11, SHA, sig.clone()),
            info("p/k", 10, &SHA.replace("aa", "ab"), sig.clone()),
            info("p/k", 10, SHA, None),
        ] {
            assert!(reader.check(&other).is_err(), "{other:?}");
        }
    }

    #[test]
    fn only_trusted_keys_count() {
        let stranger = trust_of(2, &[], false);
        let reader = trust_of(0, &[1], false);
        let err = reader
            .check(&info("k", 1, SHA, stranger.sign("k", 1, SHA)))
            .unwrap_err();
        assert!(err.reason.contains("not among the trusted keys"), "{err}");
        // Unsigned is fine unless required.
        assert_eq!(
            reader.check(&info("k", 1, SHA, None)).unwrap(),
            Verdict::Unsigned
        );
        // Nothing configured: nothing checked.
        assert_eq!(
            Trust::default()
                .check(&info("k", 1, SHA, Some("junk".into())))
                .unwrap(),
            Verdict::Unchecked
        );
        assert!(
            reader
                .check(&info("k", 1, SHA, Some("junk".into())))
                .is_err()
        );
    }
}
