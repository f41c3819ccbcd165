//! The environment of a command run by `sidekey exec` (SPEC §8): proxy and
//! CA variables pointing at sidekey, placeholders holding the agent token,
//! and nothing that is, or contains, a secret.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::config::Config;
use crate::secret::source::SecretSource;
use crate::secret::store::MASTER_KEY_ENV;

/// Proxy variables, upper and lower case: each client reads its own spelling.
const PROXY_VARS: [&str; 6] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
];

/// Variables that name a CA bundle, one per client family: OpenSSL and Go,
/// Python requests, curl, Node, git, pip, the AWS SDKs, gcloud, gRPC,
/// httplib2 (Google's older Python clients) and Nix.
const CA_VARS: [&str; 11] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
    "PIP_CERT",
    "AWS_CA_BUNDLE",
    "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE",
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
    "HTTPLIB2_CA_CERTS",
    "NIX_SSL_CERT_FILE",
];

/// Shorter values are not matched inside other variables: they would strip
/// innocent ones (a one-letter secret matches almost anything).
const MIN_SCANNED_SECRET_LEN: usize = 8;

/// What the agent's environment is made from.
#[derive(Debug)]
pub struct AgentEnv<'a> {
    pub config: &'a Config,
    pub token: &'a str,
    pub agent: &'a str,
    /// `127.0.0.1:PORT` as the command reaches the proxy.
    pub proxy_addr: std::net::SocketAddr,
    pub ca_bundle: &'a Path,
}

/// Why a variable of sidekey's environment was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dropped {
    /// A secret source or the store's master key.
    Source(String),
    /// Its value contains the value of this secret.
    HoldsSecret { var: String, secret: String },
}

impl AgentEnv<'_> {
    /// Builds the command's environment from `inherited` (sidekey's own).
    /// `secrets` yields (name, value) for every secret sidekey holds, so a
    /// copy under another variable name is caught too.
    pub fn build<'s>(
        &self,
        inherited: impl IntoIterator<Item = (OsString, OsString)>,
        secrets: impl IntoIterator<Item = (&'s str, &'s str)>,
    ) -> (BTreeMap<OsString, OsString>, Vec<Dropped>) {
        let sources = secret_source_vars(self.config);
        let secrets: Vec<(&str, &str)> = secrets
            .into_iter()
            .filter(|(_, value)| value.len() >= MIN_SCANNED_SECRET_LEN)
            .collect();
        let mut env = BTreeMap::new();
        let mut dropped = Vec::new();
        for (name, value) in inherited {
            let name_text = name.to_string_lossy();
            if sources.iter().any(|s| OsStr::new(s) == name) {
                dropped.push(Dropped::Source(name_text.into_owned()));
                continue;
            }
            if let Some((secret, _)) = secrets
                .iter()
                .find(|(_, secret)| contains(value.as_bytes(), secret.as_bytes()))
            {
                dropped.push(Dropped::HoldsSecret {
                    var: name_text.into_owned(),
                    secret: (*secret).to_string(),
                });
                continue;
            }
            env.insert(name, value);
        }
        // Clients honour NO_PROXY to go around the proxy; with none, every
        // request is decided and audited.
        for var in ["NO_PROXY", "no_proxy"] {
            env.remove(OsStr::new(var));
        }
        let proxy = format!("http://{}:{}@{}", self.agent, self.token, self.proxy_addr);
        for var in PROXY_VARS {
            env.insert(var.into(), proxy.clone().into());
        }
        for var in CA_VARS {
            env.insert(var.into(), self.ca_bundle.as_os_str().to_owned());
        }
        // Node 24 and later honour the proxy variables only when asked to.
        env.insert("NODE_USE_ENV_PROXY".into(), "1".into());
        for route in self.config.routes.values() {
            if let Some(var) = &route.placeholder_env {
                env.insert(var.into(), self.token.into());
            }
            env.insert(
                route_url_var(&route.name).into(),
                format!("http://{}/{}", self.proxy_addr, route.name).into(),
            );
        }
        (env, dropped)
    }
}

/// Every variable sidekey reads a secret from: `env:` sources and the
/// store's master key.
fn secret_source_vars(config: &Config) -> Vec<String> {
    let mut vars: Vec<String> = config
        .secrets
        .values()
        .filter_map(|source| match source {
            SecretSource::Env(var) => Some(var.clone()),
            _ => None,
        })
        .collect();
    vars.push(MASTER_KEY_ENV.to_string());
    vars
}

/// Routes whose names give the same `SIDEKEY_<ROUTE>_URL` (`my-api` and
/// `my_api`): (variable, the route it names, the route it cannot). The
/// last route by name sets the variable.
pub fn shared_url_vars(config: &Config) -> Vec<(String, &str, &str)> {
    let mut by_var: BTreeMap<String, &str> = BTreeMap::new();
    let mut shared = Vec::new();
    for name in config.routes.keys() {
        let var = route_url_var(name);
        if let Some(earlier) = by_var.insert(var.clone(), name) {
            shared.push((var, name.as_str(), earlier));
        }
    }
    shared
}

/// `SIDEKEY_<ROUTE>_URL`: the route name upper-cased, other characters as `_`.
pub fn route_url_var(route: &str) -> String {
    let name: String = route
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("SIDEKEY_{name}_URL")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("sidekey.toml");
        std::fs::write(
            &file,
            r#"
[secrets.gh]
source = "env:GH_SECRET"
[secrets.openai]
source = "store"
[routes.openai]
upstream = "https://api.openai.com"
inject = { header = "authorization", format = "Bearer {secret}", secret = "openai" }
placeholder_env = "OPENAI_API_KEY"
[routes.git-hub]
upstream = "https://github.com"
inject = { basic = { username = "x", secret = "gh" } }
[[rules]]
agents = ["coder"]
route = "openai"
action = "allow"
"#,
        )
        .expect("write config");
        let config = Config::load(&file).expect("valid config");
        (dir, config)
    }

    #[test]
    fn routes_spelled_alike_are_found_sharing_a_url_variable() {
        let (_dir, config) = config();
        assert!(shared_url_vars(&config).is_empty());
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("sidekey.toml");
        std::fs::write(
            &file,
            "[routes.my-api]\nupstream = \"https://a.example\"\n\
             [routes.my_api]\nupstream = \"https://b.example\"\n",
        )
        .expect("write config");
        let config = Config::load(&file).expect("valid config");
        assert_eq!(
            shared_url_vars(&config),
            vec![("SIDEKEY_MY_API_URL".to_string(), "my_api", "my-api")]
        );
    }

    #[test]
    fn secrets_leave_and_sidekey_variables_arrive() {
        let (_dir, config) = config();
        let inherited = [
            ("PATH", "/usr/bin"),
            ("GH_SECRET", "ghp_realvalue123"),
            ("SIDEKEY_MASTER_KEY", "00ff"),
            ("COPY_OF_IT", "x=sk-live-abcdef12;"),
            ("SHORT", "abc"),
            ("NO_PROXY", "*"),
            ("no_proxy", "localhost"),
            ("OPENAI_API_KEY", "sk-live-abcdef12"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = AgentEnv {
            config: &config,
            token: "tok.en.value",
            agent: "coder",
            proxy_addr: "127.0.0.1:4000".parse().expect("addr"),
            ca_bundle: Path::new("/tmp/x/ca.pem"),
        };
        let secrets = [
            ("openai", "sk-live-abcdef12"),
            ("gh", "ghp_realvalue123"),
            ("tiny", "abc"),
        ];
        let (env, dropped) = env.build(inherited, secrets);
        let get = |k: &str| {
            env.get(OsStr::new(k))
                .map(|v| v.to_string_lossy().into_owned())
        };
        assert_eq!(get("PATH").as_deref(), Some("/usr/bin"));
        assert_eq!(get("GH_SECRET"), None);
        assert_eq!(get("SIDEKEY_MASTER_KEY"), None);
        assert_eq!(get("COPY_OF_IT"), None);
        assert_eq!(
            get("SHORT").as_deref(),
            Some("abc"),
            "short values are not scanned"
        );
        assert_eq!(get("NO_PROXY"), None);
        assert_eq!(get("no_proxy"), None);
        assert_eq!(get("OPENAI_API_KEY").as_deref(), Some("tok.en.value"));
        let proxy = "http://coder:tok.en.value@127.0.0.1:4000";
        for var in PROXY_VARS {
            assert_eq!(get(var).as_deref(), Some(proxy), "{var}");
        }
        for var in CA_VARS {
            assert_eq!(get(var).as_deref(), Some("/tmp/x/ca.pem"), "{var}");
        }
        assert_eq!(
            get("SIDEKEY_OPENAI_URL").as_deref(),
            Some("http://127.0.0.1:4000/openai")
        );
        assert_eq!(
            get("SIDEKEY_GIT_HUB_URL").as_deref(),
            Some("http://127.0.0.1:4000/git-hub")
        );
        assert!(dropped.contains(&Dropped::Source("GH_SECRET".into())));
        assert!(dropped.contains(&Dropped::HoldsSecret {
            var: "COPY_OF_IT".into(),
            secret: "openai".into()
        }));
        for value in env.values() {
            let value = value.to_string_lossy();
            assert!(!value.contains("sk-live-abcdef12") && !value.contains("ghp_realvalue123"));
        }
    }
}
