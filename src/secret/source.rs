//! Where each configured secret's value comes from, and the table of values
//! a running proxy currently holds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::secret::Secret;
use crate::secret::store::{MasterKey, Store};
use crate::state::StateDir;

/// A `source = "..."` value from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// The embedded encrypted store in the state dir.
    Store,
    /// A variable in sidekey's own environment.
    Env(String),
    /// A file, re-read when it changes.
    File(PathBuf),
    /// A credential process, run again when its value expires.
    Exec(Vec<String>),
    /// A field of a Vault KV v2 secret: the API path after `/v1/`.
    Vault { path: String, field: String },
}

impl SecretSource {
    /// Parses `store`, `env:VAR` or `file:PATH`; relative paths are taken
    /// from `base` (the config file's directory).
    pub fn parse(text: &str, base: &Path) -> Result<Self, String> {
        if text == "store" {
            return Ok(Self::Store);
        }
        if let Some(var) = text.strip_prefix("env:") {
            let valid = !var.is_empty()
                && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !var.as_bytes()[0].is_ascii_digit();
            if !valid {
                return Err(format!("invalid environment variable name {var:?}"));
            }
            return Ok(Self::Env(var.to_string()));
        }
        if let Some(path) = text.strip_prefix("file:") {
            if path.is_empty() {
                return Err("file: needs a path".to_string());
            }
            return Ok(Self::File(base.join(path)));
        }
        if let Some(spec) = text.strip_prefix("vault:") {
            return crate::secret::vault::parse_source(spec)
                .map(|(path, field)| Self::Vault { path, field });
        }
        if let Some(command) = text.strip_prefix("exec:") {
            return crate::secret::process::parse_command(command).map(Self::Exec);
        }
        Err(format!(
            "unknown secret source {} (expected \"store\", \"env:VAR\", \"file:PATH\", \"exec:COMMAND\" or \"vault:MOUNT/PATH#FIELD\")",
            crate::config::shown(text)
        ))
    }

    /// Credential processes and Vault: they may take seconds or hang until
    /// their timeout, so they are run only when their value is due, never
    /// because another secret's file changed.
    pub fn is_slow(&self) -> bool {
        matches!(self, Self::Exec(_) | Self::Vault { .. })
    }
}

/// Why a secret has no value right now. Never contains the value.
#[derive(Debug, Clone, thiserror::Error)]
#[error("secret {name:?} is unavailable: {reason}")]
pub struct Unavailable {
    pub name: String,
    pub reason: String,
}

/// The values of every configured secret.
#[derive(Debug, Default, Clone)]
pub struct SecretTable {
    values: HashMap<String, Result<Arc<Secret>, String>>,
    /// When values from credential processes expire; never used after.
    expiry: HashMap<String, std::time::SystemTime>,
    /// When values from slow sources (credential processes, Vault) are to
    /// be read again.
    refresh: HashMap<String, std::time::SystemTime>,
}

/// One source's outcome.
struct Loaded {
    value: Result<Arc<Secret>, String>,
    expiry: Option<std::time::SystemTime>,
    refresh: Option<std::time::SystemTime>,
}

impl SecretTable {
    /// Reads every source, except the slow ones `keep` names, whose values
    /// (and their failures) are carried over from `carry`. A source that
    /// fails leaves only that secret unavailable: requests that need it
    /// fail closed, the others go on.
    pub fn load(
        config: &crate::config::Config,
        state: &StateDir,
        master_key: Option<&MasterKey>,
        carry: Option<&SecretTable>,
        keep: &dyn Fn(&str) -> bool,
    ) -> Self {
        let mut table = Self::default();
        let mut store = None;
        for (name, source) in ordered(&config.secrets) {
            match carry.filter(|_| source.is_slow() && keep(name)) {
                Some(previous) if previous.values.contains_key(name) => {
                    table.copy_from(previous, name);
                }
                _ => {
                    let loaded =
                        table.load_one(config, state, master_key, &mut store, name, source);
                    table.put(name, loaded);
                }
            }
        }
        table
    }

    /// This table with the slow sources `names` read again; the rest as is.
    pub fn refreshed(
        &self,
        config: &crate::config::Config,
        state: &StateDir,
        master_key: Option<&MasterKey>,
        names: &[String],
    ) -> Self {
        let mut table = self.clone();
        let mut store = None;
        for (name, source) in ordered(&config.secrets) {
            if names.contains(name) {
                let loaded = table.load_one(config, state, master_key, &mut store, name, source);
                table.put(name, loaded);
            }
        }
        table
    }

    /// This table with `names` taken from `other` (a refresh that ran while
    /// this table was current).
    pub fn with_values_of(&self, other: &SecretTable, names: &[String]) -> Self {
        let mut table = self.clone();
        for name in names {
            table.copy_from(other, name);
        }
        table
    }

    /// Slow sources whose value is due: failed, or to be renewed within
    /// `margin`.
    pub fn due(&self, config: &crate::config::Config, margin: std::time::Duration) -> Vec<String> {
        let soon = std::time::SystemTime::now() + margin;
        config
            .secrets
            .iter()
            .filter(|(name, source)| {
                source.is_slow()
                    && (self.values.get(*name).is_none_or(Result::is_err)
                        || self.refresh.get(*name).is_some_and(|at| *at <= soon))
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn copy_from(&mut self, other: &SecretTable, name: &str) {
        self.put(
            name,
            Loaded {
                value: other
                    .values
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| Err("not loaded".to_string())),
                expiry: other.expiry.get(name).copied(),
                refresh: other.refresh.get(name).copied(),
            },
        );
    }

    fn put(&mut self, name: &str, loaded: Loaded) {
        self.values.insert(name.to_string(), loaded.value);
        for (map, at) in [
            (&mut self.expiry, loaded.expiry),
            (&mut self.refresh, loaded.refresh),
        ] {
            match at {
                Some(at) => map.insert(name.to_string(), at),
                None => map.remove(name),
            };
        }
    }

    fn load_one(
        &self,
        config: &crate::config::Config,
        state: &StateDir,
        master_key: Option<&MasterKey>,
        store: &mut Option<Result<Store, String>>,
        name: &str,
        source: &SecretSource,
    ) -> Loaded {
        let mut expiry = None;
        let mut refresh = None;
        let value = match source {
            SecretSource::Store => {
                let store = store.get_or_insert_with(|| match master_key {
                    Some(key) => Store::read(&state.store(), key).map_err(|e| e.to_string()),
                    None => Err("the store's master key is unavailable".to_string()),
                });
                match store {
                    Ok(store) => store
                        .entries
                        .get(name)
                        .map(|e| Secret::new(e.value.expose().to_string()))
                        .ok_or_else(|| {
                            format!("not in the store (set it with `sidekey secret set {name}`)")
                        }),
                    Err(reason) => Err(reason.clone()),
                }
            }
            SecretSource::Env(var) => std::env::var(var)
                .map(Secret::new)
                .map_err(|_| format!("environment variable {var} is not set")),
            SecretSource::File(path) => read_file(path),
            SecretSource::Vault { path, field } => match &config.vault {
                None => Err("no [vault] section".to_string()),
                Some(vault) => match self.values.get(vault.auth.secret()) {
                    Some(Ok(credential)) => {
                        crate::secret::vault::read(config, vault, credential, path, field)
                            .inspect(|_| refresh = Some(std::time::SystemTime::now() + vault.ttl))
                    }
                    _ => Err(format!(
                        "the Vault credential secret {:?} is unavailable",
                        vault.auth.secret()
                    )),
                },
            },
            SecretSource::Exec(args) => {
                crate::secret::process::run(args).and_then(|(secret, expires_at)| {
                    if let Some(at) = expires_at {
                        if at <= std::time::SystemTime::now() {
                            return Err("the credential process returned an expired value".into());
                        }
                        expiry = Some(at);
                        refresh = Some(at);
                    }
                    Ok(secret)
                })
            }
        };
        let value = value.and_then(|secret| {
            if secret.expose().is_empty() {
                Err("the value is empty".to_string())
            } else {
                Ok(Arc::new(secret))
            }
        });
        Loaded {
            value,
            expiry,
            refresh,
        }
    }

    /// A table of these values, as if read from their sources.
    #[cfg(test)]
    pub fn of(values: &[(&str, &str, Option<std::time::SystemTime>)]) -> Self {
        let mut table = Self::default();
        for (name, value, expires) in values {
            table.values.insert(
                name.to_string(),
                Ok(Arc::new(Secret::new(value.to_string()))),
            );
            if let Some(at) = expires {
                table.expiry.insert(name.to_string(), *at);
                table.refresh.insert(name.to_string(), *at);
            }
        }
        table
    }

    /// When `name`'s value expires, if its source said.
    pub fn expires_at(&self, name: &str) -> Option<std::time::SystemTime> {
        self.expiry.get(name).copied()
    }

    pub fn get(&self, name: &str) -> Result<&Arc<Secret>, Unavailable> {
        // A value past its expires_at is never used, even if renewing stalls.
        if self
            .expiry
            .get(name)
            .is_some_and(|at| *at <= std::time::SystemTime::now())
        {
            return Err(Unavailable {
                name: name.to_string(),
                reason: "its value expired and no new one was obtained".to_string(),
            });
        }
        match self.values.get(name) {
            Some(Ok(secret)) => Ok(secret),
            Some(Err(reason)) => Err(Unavailable {
                name: name.to_string(),
                reason: reason.clone(),
            }),
            None => Err(Unavailable {
                name: name.to_string(),
                reason: "not configured".to_string(),
            }),
        }
    }

    /// Every value currently held, for the response scrubber.
    pub fn values(&self) -> impl Iterator<Item = (&str, &Arc<Secret>)> {
        self.values
            .iter()
            .filter_map(|(name, v)| v.as_ref().ok().map(|s| (name.as_str(), s)))
    }

    /// Names whose source failed, with the reason, for logging after a load.
    pub fn failures(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values
            .iter()
            .filter_map(|(name, v)| v.as_ref().err().map(|r| (name.as_str(), r.as_str())))
    }
}

/// Vault values need the Vault token, itself a secret: they come last.
fn ordered(
    sources: &std::collections::BTreeMap<String, SecretSource>,
) -> impl Iterator<Item = (&String, &SecretSource)> {
    let vault = |s: &SecretSource| matches!(s, SecretSource::Vault { .. });
    sources
        .iter()
        .filter(move |(_, s)| !vault(s))
        .chain(sources.iter().filter(move |(_, s)| vault(s)))
}

/// A file secret is its content without one trailing newline, as written by
/// `echo value > file` or a Kubernetes secret volume.
fn read_file(path: &Path) -> Result<Secret, String> {
    let bytes = Zeroizing::new(
        crate::state::read_limited(path, crate::state::MAX_OPERATOR_FILE).map_err(|e| {
            format!(
                "cannot read {}: {}",
                path.display(),
                crate::config::describe_io(&e)
            )
        })?,
    );
    let text =
        std::str::from_utf8(&bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
    let text = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(text);
    Ok(Secret::new(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        let base = Path::new("/etc/sidekey");
        assert_eq!(SecretSource::parse("store", base), Ok(SecretSource::Store));
        assert_eq!(
            SecretSource::parse("env:GITHUB_TOKEN", base),
            Ok(SecretSource::Env("GITHUB_TOKEN".into()))
        );
        assert_eq!(
            SecretSource::parse("file:tok", base),
            Ok(SecretSource::File("/etc/sidekey/tok".into()))
        );
        assert_eq!(
            SecretSource::parse("file:/abs", base),
            Ok(SecretSource::File("/abs".into()))
        );
        for bad in ["", "env:", "env:1X", "env:A-B", "file:", "hsm:x", "Store"] {
            assert!(SecretSource::parse(bad, base).is_err(), "{bad}");
        }
    }

    #[test]
    fn file_source_strips_one_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tok");
        std::fs::write(&path, "abc\n\n").unwrap();
        assert_eq!(read_file(&path).unwrap().expose(), "abc\n");
    }
}
