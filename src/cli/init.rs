//! `sidekey init` and `sidekey ca`.

use std::io::Write;

use anyhow::{Context, bail};

use super::Paths;
use crate::secret::store::{MASTER_KEY_ENV, MasterKey};
use crate::state::{StateDir, write_new};

pub(super) fn run(paths: &Paths) -> anyhow::Result<()> {
    let state = paths.state_dir()?;
    let created = init_state(&state)?;
    warn_if_open_to_others(&state);
    if created.is_empty() {
        eprintln!(
            "state dir {} is already initialised; nothing was overwritten",
            state.root().display()
        );
    } else {
        eprintln!(
            "initialised {}: {}",
            state.root().display(),
            created.join(", ")
        );
    }
    if !paths.config.exists() {
        let text = example_config(&state, paths);
        write_new(&paths.config, text.as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", paths.config.display()))?;
        eprintln!("wrote an example config to {}", paths.config.display());
    }
    eprintln!(
        "next: `echo -n \"$KEY\" | sidekey secret set openai`, `sidekey token issue coder`, `sidekey run`"
    );
    Ok(())
}

/// Creates whatever the state dir lacks; never replaces a key. Returns what it made.
pub(crate) fn init_state(state: &StateDir) -> anyhow::Result<Vec<&'static str>> {
    state
        .create()
        .with_context(|| format!("cannot create state dir {}", state.root().display()))?;
    let mut created = Vec::new();
    if crate::token::create_signing_key(state)? {
        created.push("token signing key");
    }
    if std::env::var_os(MASTER_KEY_ENV).is_none() && !state.master_key().exists() {
        let key = MasterKey::generate();
        write_new(&state.master_key(), key.to_hex().as_bytes(), 0o600)
            .with_context(|| format!("cannot write master key {}", state.master_key().display()))?;
        created.push("store master key");
    }
    if crate::ca::create(state)? {
        created.push("interception CA");
    }
    if crate::ca::create_agent_ca(state)? {
        created.push("agent certificate CA");
    }
    check_keys(state)?;
    Ok(created)
}

/// A key that a crash or a full disk left empty or cut short counts as
/// present above, and is never replaced; without this it would fail only
/// at its first use, in `token issue` or `run`.
fn check_keys(state: &StateDir) -> anyhow::Result<()> {
    let keep_out = "init never replaces a key or certificate: restore it from a backup, or move it aside and run init again";
    crate::token::Issuer::load(state).map_err(|e| anyhow::anyhow!("{e}; {keep_out}"))?;
    crate::ca::check(state).map_err(|e| anyhow::anyhow!("{e}; {keep_out}"))?;
    if std::env::var_os(MASTER_KEY_ENV).is_none()
        && let Err(e) = MasterKey::load(state)
    {
        if state.store().exists() {
            bail!(
                "{e}; restore it from a backup: the secrets in {} cannot be opened without it",
                state.store().display()
            );
        }
        bail!("{e}; {keep_out}");
    }
    Ok(())
}

/// An existing state dir is kept as it is, but one that others may enter
/// holds keys they should not reach.
fn warn_if_open_to_others(state: &StateDir) {
    for (path, mode) in state.open_to_others() {
        eprintln!(
            "warning: {} has mode {mode:o}; make it private: chmod go-rwx {}",
            path.display(),
            path.display()
        );
    }
}

fn example_config(state: &StateDir, paths: &Paths) -> String {
    // `state_dir` in the file is relative to the file, not to where `init` ran.
    let absolute = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let state_abs = absolute(state.root());
    let base_abs = absolute(crate::config::base_dir(&paths.config));
    let state_dir = state_abs
        .strip_prefix(&base_abs)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| state_abs.display().to_string());
    format!(
        r#"# sidekey.toml: written by `sidekey init`. Reference: SPEC.md section 4.
# Check it with `sidekey check`, try a request with `sidekey explain`.

listen = "127.0.0.1:8080"        # forward proxy and reverse gateway, one port
state_dir = "{state_dir}"        # keys, encrypted store, audit log

[audit]
file = "audit.jsonl"             # relative to state_dir; "-" = stdout
on_failure = "deny"              # refuse requests that cannot be audited

# A secret names where a credential lives; the value never appears here.
[secrets.openai]
source = "store"                 # echo -n "$KEY" | sidekey secret set openai
# source = "env:OPENAI_API_KEY"  # or sidekey's own environment
# source = "file:/run/secrets/openai"

# A route is an upstream the agent reaches at http://127.0.0.1:8080/openai/...
[routes.openai]
upstream = "https://api.openai.com"
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "openai" }}
placeholder_env = "OPENAI_API_KEY"

# Rules: a matching deny wins, else a matching allow, else deny.
[[rules]]
agents = ["coder"]
route = "openai"
methods = ["POST", "GET"]
paths = ["/v1/chat/completions", "/v1/responses", "/v1/models/**"]
action = "allow"
"#
    )
}

pub(super) fn ca_cert(paths: &Paths) -> anyhow::Result<()> {
    let state = paths.state_dir()?;
    let pem = crate::ca::cert_pem(&state)?;
    print_out(&pem)
}

pub(super) fn ca_bundle(paths: &Paths) -> anyhow::Result<()> {
    let state = paths.state_dir()?;
    let pem = crate::ca::bundle_pem(&state)?;
    print_out(&pem)
}

fn print_out(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to stdout")?;
    Ok(())
}
