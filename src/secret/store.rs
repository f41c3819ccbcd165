//! The embedded encrypted store: one file, sealed with XChaCha20-Poly1305.
//!
//! Layout: `SKSTORE1` magic, a 24-byte random nonce, then the AEAD ciphertext
//! of a JSON map `name -> {value, updated_ms}`, with the magic as associated
//! data. Every update rewrites the file atomically under the state dir lock,
//! so concurrent `secret set` calls never lose each other's writes and a crash
//! leaves the old or the new store.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::secret::Secret;
use crate::state::{StateDir, write_atomic};

const MAGIC: &[u8; 8] = b"SKSTORE1";
const NONCE_LEN: usize = 24;

/// Environment variable that, when set, replaces the state dir's `master.key`.
pub const MASTER_KEY_ENV: &str = "SIDEKEY_MASTER_KEY";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("no master key: {0}")]
    NoMasterKey(String),
    #[error("invalid master key in {0} (want 64 hex characters)")]
    BadMasterKey(String),
    #[error("{0} is not a sidekey store or is damaged")]
    Corrupt(String),
    #[error("cannot decrypt {0}: wrong master key or tampered file")]
    Decrypt(String),
}

/// The 256-bit key that seals the store.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(***)")
    }
}

impl MasterKey {
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::thread_rng().fill_bytes(key.as_mut());
        Self(key)
    }

    /// Hex text as kept in `master.key` and accepted in `SIDEKEY_MASTER_KEY`.
    pub fn to_hex(&self) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::with_capacity(65));
        crate::token::push_hex(&mut out, self.0.as_ref());
        out.push('\n');
        out
    }

    fn from_hex(text: &str, origin: &str) -> Result<Self, StoreError> {
        let text = text.trim();
        let bad = || StoreError::BadMasterKey(origin.to_string());
        if text.len() != 64 || !text.is_ascii() {
            return Err(bad());
        }
        let mut key = Zeroizing::new([0u8; 32]);
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(key))
    }

    /// `SIDEKEY_MASTER_KEY` if set, else the state dir's `master.key`.
    pub fn load(state: &StateDir) -> Result<Self, StoreError> {
        match std::env::var(MASTER_KEY_ENV) {
            Ok(text) => return Self::from_hex(&Zeroizing::new(text), MASTER_KEY_ENV),
            // Set but not text is a malformed key, never an unset one: the
            // state dir's key would then open the store in its place.
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(StoreError::BadMasterKey(MASTER_KEY_ENV.to_string()));
            }
            Err(std::env::VarError::NotPresent) => {}
        }
        let path = state.master_key();
        match fs::read_to_string(&path) {
            Ok(text) => Self::from_hex(&Zeroizing::new(text), &path.display().to_string()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::NoMasterKey(format!(
                "{} does not exist and {MASTER_KEY_ENV} is not set (run `sidekey init`)",
                path.display()
            ))),
            Err(source) => Err(StoreError::Read {
                path: path.display().to_string(),
                source,
            }),
        }
    }
}

/// One stored secret.
#[derive(Debug)]
pub struct Entry {
    pub value: Secret,
    pub updated_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct SealedEntry {
    value: String,
    updated_ms: u64,
}

/// The decrypted contents of the store.
#[derive(Debug, Default)]
pub struct Store {
    pub entries: BTreeMap<String, Entry>,
}

impl Store {
    /// Reads and decrypts the store; a missing file is an empty store.
    pub fn read(path: &Path, key: &MasterKey) -> Result<Self, StoreError> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(StoreError::Read {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        let shown = || path.display().to_string();
        if bytes.len() < MAGIC.len() + NONCE_LEN || &bytes[..MAGIC.len()] != MAGIC {
            return Err(StoreError::Corrupt(shown()));
        }
        let (nonce, ciphertext) = bytes[MAGIC.len()..].split_at(NONCE_LEN);
        let cipher = XChaCha20Poly1305::new(key.0.as_ref().into());
        let plaintext = Zeroizing::new(
            cipher
                .decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: ciphertext,
                        aad: MAGIC,
                    },
                )
                .map_err(|_| StoreError::Decrypt(shown()))?,
        );
        let sealed: BTreeMap<String, SealedEntry> =
            serde_json::from_slice(&plaintext).map_err(|_| StoreError::Corrupt(shown()))?;
        let entries = sealed
            .into_iter()
            .map(|(name, e)| {
                let entry = Entry {
                    value: Secret::new(e.value),
                    updated_ms: e.updated_ms,
                };
                (name, entry)
            })
            .collect();
        Ok(Self { entries })
    }

    fn write(&self, path: &Path, key: &MasterKey) -> Result<(), StoreError> {
        let sealed: BTreeMap<&str, SealedEntry> = self
            .entries
            .iter()
            .map(|(name, e)| {
                let entry = SealedEntry {
                    value: e.value.expose().to_string(),
                    updated_ms: e.updated_ms,
                };
                (name.as_str(), entry)
            })
            .collect();
        let plaintext = Zeroizing::new(serde_json::to_vec(&sealed).map_err(|_| {
            StoreError::Corrupt("store contents could not be serialised".to_string())
        })?);
        for entry in sealed.into_values() {
            drop(Zeroizing::new(entry.value));
        }
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let cipher = XChaCha20Poly1305::new(key.0.as_ref().into());
        let ciphertext = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plaintext,
                    aad: MAGIC,
                },
            )
            .map_err(|_| StoreError::Corrupt("encryption failed".to_string()))?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + ciphertext.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        write_atomic(path, &out, 0o600).map_err(|source| StoreError::Write {
            path: path.display().to_string(),
            source,
        })
    }

    /// Applies `change` to the store under the state dir lock and writes the
    /// result atomically. Returns what `change` returned.
    pub fn update<T>(
        state: &StateDir,
        key: &MasterKey,
        change: impl FnOnce(&mut Store) -> T,
    ) -> Result<T, StoreError> {
        let lock_err = |source| StoreError::Write {
            path: state.lock_file().display().to_string(),
            source,
        };
        let _lock = state.lock().map_err(lock_err)?;
        let path = state.store();
        let mut store = Self::read(&path, key)?;
        let out = change(&mut store);
        store.write(&path, key)?;
        Ok(out)
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let key = MasterKey::generate();
        Store::update(&state, &key, |s| {
            s.entries.insert(
                "openai".into(),
                Entry {
                    value: Secret::new("sk-1".into()),
                    updated_ms: 1,
                },
            );
        })
        .unwrap();
        let raw = fs::read(state.store()).unwrap();
        assert!(!raw.windows(4).any(|w| w == b"sk-1"), "store is plaintext");
        let store = Store::read(&state.store(), &key).unwrap();
        assert_eq!(store.entries["openai"].value.expose(), "sk-1");

        let other = MasterKey::generate();
        assert!(matches!(
            Store::read(&state.store(), &other),
            Err(StoreError::Decrypt(_))
        ));
        let mut flipped = raw.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        fs::write(state.store(), flipped).unwrap();
        assert!(Store::read(&state.store(), &key).is_err());
    }

    #[test]
    fn master_key_hex_round_trip() {
        let key = MasterKey::generate();
        let back = MasterKey::from_hex(&key.to_hex(), "test").unwrap();
        assert_eq!(*key.0, *back.0);
        assert!(MasterKey::from_hex("zz", "test").is_err());
    }
}
