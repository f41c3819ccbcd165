//! The command line: one file per command group. Only this module prints.
#![allow(clippy::print_stdout, reason = "the CLI's output is its interface")]

/// `println!` that returns a failed write to stdout as an error: a closed
/// pipe (`| head`) or a full disk ends the command with one line on
/// stderr, never a panic.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        anyhow::Context::context(
            writeln!(std::io::stdout(), $($arg)*),
            "cannot write to stdout",
        )?
    }};
}

mod audit;
mod demo;
mod exec;
mod init;
mod secret;
mod serve;
mod token;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args as ClapArgs, Parser, Subcommand};

use crate::config::{CONFIG_ENV, Config, ConfigError, DEFAULT_CONFIG, STATE_DIR_ENV};
use crate::state::StateDir;

#[derive(Debug, Parser)]
#[command(
    name = "sidekey",
    version,
    about = "A credential proxy sidecar for AI agents: the agent holds a revocable token, sidekey holds the keys",
    propagate_version = true
)]
pub struct Args {
    /// Config file [default: ./sidekey.toml, or $SIDEKEY_CONFIG]
    #[arg(short = 'c', long = "config", global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State dir [default: the config's state_dir, else $SIDEKEY_STATE_DIR, else ~/.local/share/sidekey]
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The 30-second tour: a proxy, an echo upstream and one agent request, all on loopback
    Demo {
        /// Where the demo proxy listens
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Create the state dir (keys, CA) and an example sidekey.toml
    Init,
    /// Run the proxy in the foreground
    Run {
        /// Listen here instead of the config's `listen`
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Validate the config and print every problem
    Check,
    /// Show the decision for a request without sending it
    Explain {
        /// The agent making the request
        #[arg(long)]
        agent: String,
        /// Its session, for rules with `sessions`
        #[arg(long, default_value = "")]
        session: String,
        /// HTTP method, e.g. POST
        method: String,
        /// Reverse-gateway URL (http://127.0.0.1:8080/openai/v1/...) or upstream URL
        url: String,
    },
    /// Manage secrets in the encrypted store
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Issue and revoke agent tokens
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print the interception CA
    #[command(subcommand)]
    Ca(CaCommand),
    /// Issue client certificates for the mTLS listener
    #[command(subcommand)]
    Cert(CertCommand),
    /// Show the audit log
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Run a command as an agent, through a proxy started for it
    Exec(ExecArgs),
    /// Ask the running proxy for its status
    Status,
    /// Make the running proxy re-read its config
    Reload,
    /// Internal: the parent of an `exec` command
    #[command(name = "__supervise", hide = true)]
    Supervise {
        #[arg(long)]
        isolated: bool,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<OsString>,
    },
    /// Internal: builds the `exec --isolate` sandbox
    #[command(name = "__isolate", hide = true)]
    Isolate {
        #[arg(long)]
        handoff: PathBuf,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        hide: Vec<PathBuf>,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<OsString>,
    },
}

#[derive(Debug, ClapArgs)]
struct ExecArgs {
    /// The agent the command runs as
    #[arg(long)]
    agent: String,
    /// Lifetime of the session's token (revoked anyway when the command exits)
    #[arg(long, default_value = "12h")]
    ttl: String,
    /// Run the command in its own user, PID, mount and network namespaces
    /// (Linux): its only way out is the proxy, and the state dir is hidden
    #[arg(long)]
    isolate: bool,
    /// With --isolate, also hide this file or directory (repeatable)
    #[arg(long, value_name = "PATH", requires = "isolate")]
    hide: Vec<PathBuf>,
    /// The command and its arguments (after `--`)
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

#[derive(Debug, Subcommand)]
enum SecretCommand {
    /// Store a secret; the value is read from standard input, never from arguments
    Set { name: String },
    /// List secret names and update times (never values)
    List {
        /// One JSON object per line
        #[arg(long)]
        json: bool,
    },
    /// Remove a secret
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a new agent token on stdout
    Issue {
        agent: String,
        /// Lifetime, e.g. 30m, 1h, 7d
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Session to put the token in (default: a new one)
        #[arg(long)]
        session: Option<String>,
    },
    /// Revoke tokens by id, session or agent
    Revoke(RevokeArgs),
}

#[derive(Debug, ClapArgs)]
#[group(required = true, multiple = false)]
struct RevokeArgs {
    /// A token id (t-...)
    #[arg(long)]
    id: Option<String>,
    /// Every token of a session
    #[arg(long)]
    session: Option<String>,
    /// Every token issued so far to an agent
    #[arg(long)]
    agent: Option<String>,
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Write PREFIX.crt and PREFIX.key (0600) naming the agent; prints the certificate id
    Issue {
        agent: String,
        /// Lifetime, e.g. 1h, 24h, 30d
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// Path prefix of the two files
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// The CA certificate (PEM)
    Cert,
    /// The system roots plus the CA, for SSL_CERT_FILE
    Bundle,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Print the last records in a readable form
    Tail {
        /// Keep printing new records
        #[arg(short, long)]
        follow: bool,
        /// How many records to show first
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
    },
}

/// Ends the process with this code after the command printed its own report.
#[derive(Debug, thiserror::Error)]
#[error("exit {0}")]
pub(crate) struct SilentExit(pub(crate) u8);

pub fn main() -> ExitCode {
    if let Err(e) = crate::harden::harden_process() {
        eprintln!("sidekey: cannot protect this process's memory: {e}");
        return ExitCode::FAILURE;
    }
    let args = match parse_args() {
        Ok(args) => args,
        Err(code) => return code,
    };
    let Err(error) = run(args) else {
        return ExitCode::SUCCESS;
    };
    if let Some(SilentExit(code)) = error.downcast_ref::<SilentExit>() {
        return ExitCode::from(*code);
    }
    if let Some(config) = error.downcast_ref::<ConfigError>() {
        // Config problems are usage errors: exit 2, one line per problem.
        eprintln!("{config}");
        return ExitCode::from(2);
    }
    eprintln!("sidekey: {}", one_line(&error));
    ExitCode::FAILURE
}

/// The command line, or exit 2 with clap's usage error on one line, as
/// every other error is: clap spreads one over several, and its first
/// ("the following required arguments were not provided:") says nothing
/// alone. Help and version, and help for a bare `sidekey`, print as clap
/// writes them.
fn parse_args() -> Result<Args, ExitCode> {
    use clap::error::ErrorKind;
    let error = match Args::try_parse() {
        Ok(args) => return Ok(args),
        Err(error) => error,
    };
    if !error.use_stderr() || error.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        error.exit();
    }
    // A value given to `secret set` as an argument is most likely the
    // secret itself: say why it is refused without printing it again (the
    // usual message would repeat it into a terminal log or CI output).
    let argv: Vec<String> = std::env::args().collect();
    if error.kind() == ErrorKind::UnknownArgument
        && argv.windows(2).any(|w| w[0] == "secret" && w[1] == "set")
    {
        eprintln!(
            "sidekey: secret set takes only NAME and reads the value from standard input, never \
             from the command line, where shell history and process listings keep it \
             (printf %s \"$VALUE\" | sidekey secret set NAME)"
        );
        return Err(ExitCode::from(2));
    }
    let text = error.render().to_string();
    let mut message = String::new();
    let mut usage = None;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Usage:") {
            usage = Some(rest.trim().to_string());
        } else if !line.is_empty() && !line.starts_with("For more information") {
            if !message.is_empty() {
                message.push_str(if line.starts_with("tip:") { "; " } else { " " });
            }
            message.push_str(line.strip_prefix("error: ").unwrap_or(line));
        }
    }
    let usage = usage.map_or_else(String::new, |u| format!("usage: {u}; "));
    eprintln!("sidekey: {message} ({usage}try --help)");
    Err(ExitCode::from(2))
}

/// The error and its causes on one line, each cause once: many messages
/// already end with their cause's text, which `{:#}` would print again.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

fn run(args: Args) -> anyhow::Result<()> {
    let ctx = Paths::new(args.config, args.state_dir);
    match args.command {
        Command::Demo { listen } => demo::run(listen),
        Command::Init => init::run(&ctx),
        Command::Run { listen } => serve::run(&ctx, listen),
        Command::Check => serve::check(&ctx),
        Command::Explain {
            agent,
            session,
            method,
            url,
        } => serve::explain(&ctx, &agent, &session, &method, &url),
        Command::Secret(SecretCommand::Set { name }) => secret::set(&ctx, &name),
        Command::Secret(SecretCommand::List { json }) => secret::list(&ctx, json),
        Command::Secret(SecretCommand::Rm { name }) => secret::remove(&ctx, &name),
        Command::Token(TokenCommand::Issue {
            agent,
            ttl,
            session,
        }) => token::issue(&ctx, &agent, &ttl, session.as_deref()),
        Command::Token(TokenCommand::Revoke(which)) => token::revoke(&ctx, which),
        Command::Ca(CaCommand::Cert) => init::ca_cert(&ctx),
        Command::Cert(CertCommand::Issue { agent, ttl, out }) => {
            token::issue_cert(&ctx, &agent, &ttl, &out)
        }
        Command::Ca(CaCommand::Bundle) => init::ca_bundle(&ctx),
        Command::Audit(AuditCommand::Tail { follow, lines }) => audit::tail(&ctx, follow, lines),
        Command::Status => serve::status(&ctx),
        Command::Reload => serve::reload(&ctx),
        Command::Exec(args) => exec::run(&ctx, args),
        Command::Supervise { isolated, command } => {
            Err(SilentExit(crate::exec::supervisor::run(&command, isolated)).into())
        }
        Command::Isolate {
            handoff,
            port,
            hide,
            command,
        } => Err(
            SilentExit(crate::exec::isolate::run(&crate::exec::isolate::Sandbox {
                handoff,
                port,
                hide,
                command,
            }))
            .into(),
        ),
    }
}

/// Where the config and the state dir are, as the global flags and the
/// environment say.
#[derive(Debug)]
struct Paths {
    config: PathBuf,
    /// Whether the config path was named (`-c` or `$SIDEKEY_CONFIG`), so it must exist.
    config_named: bool,
    state_dir_flag: Option<PathBuf>,
}

impl Paths {
    fn new(config: Option<PathBuf>, state_dir: Option<PathBuf>) -> Self {
        let from_env = std::env::var_os(CONFIG_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let named = config.is_some() || from_env.is_some();
        Self {
            config: config
                .or(from_env)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG)),
            config_named: named,
            state_dir_flag: state_dir,
        }
    }

    /// The validated config; required by `run`, `check`, `explain`.
    fn config(&self) -> anyhow::Result<Config> {
        if !self.config.exists() && !self.config_named {
            bail!(
                "no config file: {} does not exist (create one with `sidekey init`, or pass -c FILE)",
                self.config.display()
            );
        }
        Ok(Config::load(&self.config)?)
    }

    /// The state dir: `--state-dir`, else the config's `state_dir`, else
    /// `$SIDEKEY_STATE_DIR`, else `~/.local/share/sidekey`. Only the
    /// `state_dir` key is read here, so a config with unrelated mistakes does
    /// not lock the operator out of `secret` and `token`.
    fn state_dir(&self) -> anyhow::Result<StateDir> {
        if let Some(dir) = &self.state_dir_flag {
            return Ok(StateDir::new(dir));
        }
        if let Some(dir) = self.raw_key("state_dir")? {
            return Ok(StateDir::new(
                crate::config::base_dir(&self.config).join(dir),
            ));
        }
        if let Some(dir) = std::env::var_os(STATE_DIR_ENV).filter(|d| !d.is_empty()) {
            return Ok(StateDir::new(PathBuf::from(dir)));
        }
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .context("cannot find a state dir: set --state-dir, state_dir in the config, or $SIDEKEY_STATE_DIR")?;
        Ok(StateDir::new(Path::new(&home).join(".local/share/sidekey")))
    }

    /// One top-level string key of the config file, read without validating
    /// the rest; `None` when there is no config or no such key.
    fn raw_key(&self, key: &str) -> anyhow::Result<Option<String>> {
        if !self.config.exists() && !self.config_named {
            return Ok(None);
        }
        let bytes = crate::state::read_limited(&self.config, crate::state::MAX_OPERATOR_FILE)
            .with_context(|| format!("cannot read config {}", self.config.display()))?;
        let text = String::from_utf8(bytes)
            .with_context(|| format!("config {} is not UTF-8 text", self.config.display()))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: {}",
                self.config.display(),
                e.message().trim().replace('\n', " ")
            )
        })?;
        match table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(value)) => Ok(Some(value.clone())),
            Some(_) => bail!("{}: {key} must be a string", self.config.display()),
        }
    }

    /// The state dir of a config already loaded (same order as [`Self::state_dir`]).
    fn state_dir_of(&self, config: &Config) -> anyhow::Result<StateDir> {
        match (&self.state_dir_flag, &config.state_dir) {
            (Some(dir), _) => Ok(StateDir::new(dir)),
            (None, Some(dir)) => Ok(StateDir::new(dir)),
            (None, None) => self.state_dir(),
        }
    }
}

/// How long a stop waits for blocking work still running (an audit write on
/// a hung file system, say) once every connection has ended.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Ends a proxy's runtime once its connections have: credential processes
/// still running are killed, and blocking work gets [`STOP_GRACE`]. A task
/// can be stuck for good (an audit write to a dead network file system);
/// what it holds was never reported as written, so it does not keep the
/// process from exiting.
fn shut_down(runtime: tokio::runtime::Runtime) {
    crate::secret::process::end_all();
    runtime.shutdown_timeout(STOP_GRACE);
}

/// Builds the runtime for commands that do network I/O.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // A sidecar usually gets one core: there a single-threaded runtime
    // does the same work without handing tasks and wake-ups between threads.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cores == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Checks a name given on the command line (agent, secret, session).
fn check_name(kind: &str, name: &str) -> anyhow::Result<()> {
    if !crate::config::valid_name(name) {
        bail!("{}", crate::config::invalid_name(kind, name));
    }
    Ok(())
}

/// Logs to stderr at `default` level, or as `$SIDEKEY_LOG` says. Lines are
/// written by a thread of their own, so a stderr pipe that stops draining
/// (a stalled log shipper) loses log lines beyond a small buffer rather
/// than stall every connection on the runtime thread; the audit log, not
/// this one, is the record of decisions. Keep the guard until the command
/// ends: dropping it writes out what is still queued.
fn init_logging(default: &str) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SIDEKEY_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_LINES_BUFFERED)
        .lossy(true)
        .finish(std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
    guard
}

/// Log lines held for a stderr that is not draining, about a megabyte.
const LOG_LINES_BUFFERED: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_in_its_message_is_printed_once() {
        let disk_full = || std::io::Error::from_raw_os_error(28);
        let repeated = anyhow::Error::new(crate::token::revocation::RevocationError::Write {
            path: "st/revocations.json".into(),
            source: disk_full(),
        });
        let line = one_line(&repeated);
        assert_eq!(line.matches(&disk_full().to_string()).count(), 1, "{line}");
        assert!(line.starts_with("cannot write revocation list st/revocations.json"));

        let added = anyhow::Error::new(disk_full()).context("cannot write sidekey.toml");
        assert_eq!(
            one_line(&added),
            format!("cannot write sidekey.toml: {}", disk_full())
        );
    }
}
