//! `sidekey secret set|list|rm`: the embedded store. Values come from stdin only.

use std::io::Read;

use anyhow::{Context, bail};
use zeroize::Zeroizing;

use super::{Paths, check_name};
use crate::secret::Secret;
use crate::secret::store::{Entry, MasterKey, Store, now_ms};

/// Larger values are almost certainly a mistake (a file piped by accident).
const MAX_VALUE: u64 = 1024 * 1024;

pub(super) fn set(paths: &Paths, name: &str) -> anyhow::Result<()> {
    check_name("secret", name)?;
    let state = paths.state_dir()?;
    let key = MasterKey::load(&state)?;
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        eprintln!("enter the value for {name:?}, then press Ctrl-D:");
    }
    // Room for the largest value up front: a growing Vec would leave copies
    // of the value in freed memory that zeroize never sees.
    let mut raw = Zeroizing::new(Vec::with_capacity(MAX_VALUE as usize + 1));
    std::io::stdin()
        .take(MAX_VALUE + 1)
        .read_to_end(&mut raw)
        .context("cannot read the value from stdin")?;
    if raw.len() as u64 > MAX_VALUE {
        bail!("the value on stdin is larger than {MAX_VALUE} bytes");
    }
    let text = std::str::from_utf8(&raw).context("the value on stdin is not UTF-8 text")?;
    // `echo value | sidekey secret set` adds one newline that is not part of the value.
    let text = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(text);
    if text.is_empty() {
        bail!("the value on stdin is empty; nothing stored");
    }
    let value = Secret::new(text.to_string());
    let replaced = Store::update(&state, &key, |store| {
        store
            .entries
            .insert(
                name.to_string(),
                Entry {
                    value,
                    updated_ms: now_ms(),
                },
            )
            .is_some()
    })?;
    let verb = if replaced { "updated" } else { "stored" };
    eprintln!("secret {name:?} {verb} in {}", state.store().display());
    Ok(())
}

pub(super) fn list(paths: &Paths, json: bool) -> anyhow::Result<()> {
    let state = paths.state_dir()?;
    let key = MasterKey::load(&state)?;
    let store = Store::read(&state.store(), &key)?;
    for (name, entry) in &store.entries {
        let updated = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(entry.updated_ms),
        );
        if json {
            outln!(
                "{}",
                serde_json::json!({"name": name, "updated": updated.to_string()})
            );
        } else {
            outln!("{name}\t{updated}");
        }
    }
    if store.entries.is_empty() && !json {
        eprintln!("no secrets in {}", state.store().display());
    }
    Ok(())
}

pub(super) fn remove(paths: &Paths, name: &str) -> anyhow::Result<()> {
    check_name("secret", name)?;
    let state = paths.state_dir()?;
    let key = MasterKey::load(&state)?;
    if !Store::read(&state.store(), &key)?
        .entries
        .contains_key(name)
    {
        bail!("no secret named {name:?} in the store");
    }
    Store::update(&state, &key, |store| store.entries.remove(name))?;
    eprintln!("secret {name:?} removed");
    Ok(())
}
