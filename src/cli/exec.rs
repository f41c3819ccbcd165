//! `sidekey exec`: a proxy for one command, a session token for it, and the
//! command run with that token in place of every secret (SPEC §8).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use rand::Rng;

use super::serve::{Running, start_private};
use super::{ExecArgs, Paths, SilentExit, check_name, init_logging, runtime, shut_down};
use crate::config::Config;
use crate::exec::env::{AgentEnv, Dropped};
use crate::exec::isolate::receive_listener;
use crate::live::Live;
use crate::secret::source::SecretSource;
use crate::secret::store::now_ms;
use crate::token::revocation::{self, Revocations, Revoke};
use crate::token::{Issuer, parse_ttl};

/// How long the sandbox may take to hand over its listener.
const SANDBOX_READY_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) fn run(paths: &Paths, args: ExecArgs) -> anyhow::Result<()> {
    // Quiet by default: the command's own output is what its user reads.
    let _logging = init_logging("warn");
    check_name("agent", &args.agent)?;
    let ttl = parse_ttl(&args.ttl).map_err(anyhow::Error::msg)?;
    let config = paths.config()?;
    let state = paths.state_dir_of(&config)?;
    crate::listen::raise_fd_limit();
    // The session is revoked when the command ends; a list that cannot be
    // read now could not take that revocation then, and the token would
    // outlive its command.
    Revocations::read(&state.revocations())
        .context("cannot start: the session could not be revoked when the command ends")?;
    let issuer = Issuer::load(&state)?;
    // A token is valid through the whole second of its expiry; a second
    // more covers the one in which it is issued.
    let expires_ms =
        now_ms().saturating_add(ttl.max(Duration::from_secs(1)).as_millis() as u64 + 2_000);
    let session = revocation::exec_session(expires_ms);
    let (token, _) = issuer.issue(&args.agent, Some(&session), ttl);
    drop(issuer);

    // The CA bundle lives outside the state dir, which the sandbox hides.
    let workdir = tempfile::Builder::new()
        .prefix("sidekey-exec-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let bundle = workdir.path().join("ca-bundle.pem");
    crate::state::write_atomic(&bundle, crate::ca::bundle_pem(&state)?.as_bytes(), 0o644)
        .with_context(|| format!("cannot write {}", bundle.display()))?;
    let hide = if args.isolate {
        let needed: Vec<PathBuf> = [std::env::current_dir().ok(), std::env::home_dir()]
            .into_iter()
            .flatten()
            .chain([workdir.path().to_path_buf()])
            .filter_map(|p| std::path::absolute(p).ok())
            .collect();
        hidden_paths(&config, state.root(), &args.hide, &needed)
    } else {
        Vec::new()
    };
    let handoff = workdir.path().join("handoff.sock");

    let runtime = runtime()?;
    let code = runtime.block_on(async {
        // Where the proxy listens: here, or inside the sandbox, where any
        // port is free in a network namespace of its own.
        let (bound, port) = if args.isolate {
            (None, rand::thread_rng().gen_range(20_000..60_000))
        } else {
            let listener = crate::listen::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
            let port = listener
                .local_addr()
                .context("cannot read the bound address")?
                .port();
            (Some(listener), port)
        };
        let proxy_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let live = Arc::new(Live::new(config, state.clone(), Some(proxy_addr))?);
        let env = agent_environment(&live, &token, &args.agent, proxy_addr, &bundle)?;

        let mut command = tokio::process::Command::new("/proc/self/exe");
        command.env_clear().envs(&env);
        if args.isolate {
            command
                .arg("__isolate")
                .arg("--handoff")
                .arg(&handoff)
                .arg("--port")
                .arg(port.to_string());
            for path in &hide {
                command.arg("--hide").arg(path);
            }
        } else {
            command.arg("__supervise");
        }
        command.arg("--").args(&args.command);

        let caught =
            crate::exec::signals::catch().context("cannot forward signals to the command")?;
        let (listener, mut child) = match bound {
            Some(listener) => {
                let child = command.spawn().context("cannot start the command")?;
                (listener, child)
            }
            None => {
                let handoff_listener = tokio::net::UnixListener::bind(&handoff)
                    .with_context(|| format!("cannot listen on {}", handoff.display()))?;
                let mut child = command.spawn().context("cannot start the command")?;
                let received = sandbox_ready(&handoff_listener, &mut child).await;
                let _ = std::fs::remove_file(&handoff);
                match received {
                    Ok(listener) => (listener, child),
                    Err(e) => {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                        bail!("{e}");
                    }
                }
            }
        };
        let child_pid = child.id().context("the command ended at once")?;
        let running = start_private(live, listener)?;
        let forwarding = caught
            .forward_to(child_pid)
            .context("cannot forward signals to the command")?;
        let status = child.wait().await.context("cannot wait for the command")?;
        drop(forwarding);
        finish(running, &state, &session).await;
        Ok::<_, anyhow::Error>(crate::exec::exit_code_of(status))
    });
    // The command has ended, so must sidekey, even with a write stuck.
    shut_down(runtime);
    drop(workdir);
    match code? {
        0 => Ok(()),
        code => Err(SilentExit(code).into()),
    }
}

/// Waits for the sandbox to hand over its listener, or to fail, or to
/// take too long; its own reason for failing wins when it gave one.
async fn sandbox_ready(
    handoff: &tokio::net::UnixListener,
    child: &mut tokio::process::Child,
) -> Result<tokio::net::TcpListener, String> {
    // accept() can be cancelled without losing a connection.
    let accepted = tokio::select! {
        accepted = handoff.accept() => Some(accepted),
        _ = child.wait() => {
            // Its reason for failing, if it gave one, is queued.
            tokio::time::timeout(Duration::from_millis(200), handoff.accept())
                .await
                .ok()
        }
        () = tokio::time::sleep(SANDBOX_READY_TIMEOUT) => None,
    };
    match accepted {
        Some(Ok((stream, _))) => sandbox_listener(stream).await,
        Some(Err(e)) => Err(format!("--isolate: {e}")),
        None => Err("--isolate: the sandbox ended before it was ready".to_string()),
    }
}

/// The command's environment, with a warning for each variable that held a
/// copy of a secret under another name.
fn agent_environment(
    live: &Live,
    token: &str,
    agent: &str,
    proxy_addr: SocketAddr,
    bundle: &std::path::Path,
) -> anyhow::Result<BTreeMap<OsString, OsString>> {
    let (snapshot, secrets) = live
        .current()
        .context("config and secrets out of step; try again")?;
    let builder = AgentEnv {
        config: &snapshot.config,
        token,
        agent,
        proxy_addr,
        ca_bundle: bundle,
    };
    let values = secrets
        .table
        .values()
        .map(|(name, secret)| (name, secret.expose()));
    let (env, dropped) = builder.build(std::env::vars_os(), values);
    for (var, named, lost) in crate::exec::env::shared_url_vars(&snapshot.config) {
        tracing::warn!("{var} names route {named}; route {lost} has no variable of its own");
    }
    for dropped in dropped {
        if let Dropped::HoldsSecret { var, secret } = dropped {
            tracing::warn!(
                "{var} holds the value of secret {secret:?}; the command does not get it"
            );
        }
    }
    Ok(env)
}

/// The listening socket the sandbox made inside its network namespace.
async fn sandbox_listener(
    stream: tokio::net::UnixStream,
) -> Result<tokio::net::TcpListener, String> {
    let stream = stream.into_std().map_err(|e| format!("--isolate: {e}"))?;
    let listener = tokio::task::spawn_blocking(move || {
        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(SANDBOX_READY_TIMEOUT))
            .map_err(|e| e.to_string())?;
        receive_listener(&stream)
    })
    .await
    .map_err(|e| format!("--isolate: {e}"))??;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("--isolate: {e}"))?;
    tokio::net::TcpListener::from_std(listener).map_err(|e| format!("--isolate: {e}"))
}

/// The session ends with the command: its token is revoked (a `sidekey run`
/// on the same state dir refuses it too) until it would have expired
/// anyway, then the proxy stops.
async fn finish(running: Running, state: &crate::state::StateDir, session: &str) {
    if let Err(e) = Revocations::add(state, Revoke::Session(session.to_string()), now_ms()) {
        eprintln!(
            "sidekey exec: cannot revoke session {session}: {e}; revoke it with `sidekey token revoke --session {session}`"
        );
    }
    running.stop().await;
}

/// What the sandbox hides: the state dir, every secret file, and `--hide`.
///
/// A file laid over a secret file stops covering it when the file is
/// replaced by a rename (an atomic write, a Kubernetes secret update), so
/// the directory holding the secret is hidden too, unless the command
/// needs it: one of its working dir, its home or the CA bundle's dir lies
/// inside, or it is a top-level directory such as `/etc`. Then only the
/// file is hidden, and a warning says how to close the gap.
fn hidden_paths(
    config: &Config,
    state_dir: &Path,
    extra: &[PathBuf],
    needed: &[PathBuf],
) -> Vec<PathBuf> {
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut paths = vec![absolute(state_dir)];
    for (name, source) in &config.secrets {
        let SecretSource::File(path) = source else {
            continue;
        };
        let file = absolute(path);
        match file.parent() {
            Some(dir)
                if dir.components().count() > 2 && !needed.iter().any(|n| n.starts_with(dir)) =>
            {
                paths.push(dir.to_path_buf());
            }
            _ => eprintln!(
                "sidekey exec: warning: secrets.{name}: {} is hidden from the command, but a new \
                 version written by rename while it runs would not be; keep secret files in a \
                 directory of their own",
                file.display()
            ),
        }
        paths.push(file);
    }
    paths.extend(extra.iter().map(|p| absolute(p)));
    paths
}
