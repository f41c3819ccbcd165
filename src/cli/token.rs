//! `sidekey token issue|revoke`.

use super::{Paths, RevokeArgs, check_name};
use crate::secret::store::now_ms;
use crate::token::revocation::{EXEC_SESSION_PREFIX, Revocations, Revoke};
use crate::token::{Issuer, parse_ttl};

pub(super) fn issue(
    paths: &Paths,
    agent: &str,
    ttl: &str,
    session: Option<&str>,
) -> anyhow::Result<()> {
    check_name("agent", agent)?;
    if let Some(session) = session {
        check_name("session", session)?;
        // Such a session leaves the revocation list once its name says its
        // tokens have expired; one issued here could outlive that.
        if session.starts_with(EXEC_SESSION_PREFIX) {
            anyhow::bail!(
                "session names starting with {EXEC_SESSION_PREFIX:?} are reserved for sidekey exec"
            );
        }
    }
    let ttl = parse_ttl(ttl).map_err(anyhow::Error::msg)?;
    let state = paths.state_dir()?;
    let issuer = Issuer::load(&state)?;
    let (token, claims) = issuer.issue(agent, session, ttl);
    let expires = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(claims.exp),
    );
    eprintln!(
        "token {} for agent {agent:?}, session {}, expires {expires}",
        claims.jti, claims.sid
    );
    outln!("{token}");
    Ok(())
}

/// `sidekey cert issue`: a client certificate for the mTLS listener.
pub(super) fn issue_cert(
    paths: &Paths,
    agent: &str,
    ttl: &str,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    check_name("agent", agent)?;
    let ttl = parse_ttl(ttl).map_err(anyhow::Error::msg)?;
    // `--out certs/` would write the hidden files `certs/.crt` and `.key`.
    let named = out
        .file_name()
        .is_some_and(|name| name != "." && name != "..");
    if !named || out.as_os_str().as_encoded_bytes().ends_with(b"/") || out.is_dir() {
        anyhow::bail!(
            "--out {}: give a file name prefix (certs/coder writes certs/coder.crt and certs/coder.key)",
            out.display()
        );
    }
    let state = paths.state_dir()?;
    let cert = crate::ca::issue_agent_cert(&state, agent, ttl)?;
    let with_ext = |ext: &str| {
        let mut path = out.as_os_str().to_owned();
        path.push(ext);
        std::path::PathBuf::from(path)
    };
    let (crt, key) = (with_ext(".crt"), with_ext(".key"));
    crate::state::write_atomic(&key, cert.key_pem.as_bytes(), 0o600)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", key.display()))?;
    crate::state::write_atomic(&crt, cert.cert_pem.as_bytes(), 0o644)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", crt.display()))?;
    eprintln!(
        "certificate {} for agent {agent:?} ({}) in {} and {}",
        cert.serial,
        crate::ca::spiffe_id(agent),
        crt.display(),
        key.display()
    );
    outln!("{}", cert.serial);
    Ok(())
}

pub(super) fn revoke(paths: &Paths, which: RevokeArgs) -> anyhow::Result<()> {
    let revoke = match (which.id, which.session, which.agent) {
        (Some(id), None, None) => Revoke::Id(id),
        (None, Some(session), None) => Revoke::Session(session),
        (None, None, Some(agent)) => Revoke::Agent(agent),
        _ => anyhow::bail!("give exactly one of --id, --session, --agent"),
    };
    let (kind, name) = match &revoke {
        Revoke::Id(v) => ("token", v),
        Revoke::Session(v) => ("session", v),
        Revoke::Agent(v) => ("agent", v),
    };
    revoke.check().map_err(anyhow::Error::msg)?;
    // A running proxy writes the revocation and applies it at once; with
    // none running, the state dir is written directly and read at start.
    let body = serde_json::json!({ kind_key(&revoke): name });
    if let Some((status, reply)) =
        super::serve::ask(paths, http::Method::POST, "/v1/revoke", Some(body))?
    {
        if !status.is_success() {
            anyhow::bail!(
                "the running proxy refused: {}",
                reply["error"].as_str().unwrap_or("unknown error")
            );
        }
        eprintln!("revoked {kind} {name:?}; the running proxy applies it from the next request");
        return Ok(());
    }
    let state = paths.state_dir()?;
    Revocations::add(&state, revoke.clone(), now_ms())?;
    eprintln!(
        "revoked {kind} {name:?} in {} (no proxy is running)",
        state.revocations().display()
    );
    Ok(())
}

fn kind_key(revoke: &Revoke) -> &'static str {
    match revoke {
        Revoke::Id(_) => "id",
        Revoke::Session(_) => "session",
        Revoke::Agent(_) => "agent",
    }
}
