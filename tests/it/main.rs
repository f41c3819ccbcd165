//! The integration tests: the real `sidekey` binary, real clients (curl,
#![allow(unreachable_pub, missing_debug_implementations, clippy::unwrap_used)]
//! Python requests, reqwest), real upstreams on loopback.

mod support;

mod admin; // the admin socket: status, metrics, revoke
mod attacks; // the prompt-injected agent: smuggling, slot smuggling, path tricks, replay
mod cli; // init, secret, token, check, explain, demo through the command line
mod dynamic; // OAuth 2 and GCP service-account access tokens
mod exec; // `sidekey exec`: real clients in a command with no secret, --isolate
mod faults; // failing upstreams, secret sources, audit sinks; kill -9 and restarts
mod forward; // HTTP(S)_PROXY: absolute-form, CONNECT, interception, SSRF
mod gateway; // the reverse gateway: injection, identity, policy, errors
mod git; // git clone and push through HTTPS_PROXY
mod limits; // connection cap, idle and header timeouts, size limits
mod live; // rotation, revocation, reload and shutdown while running
mod load; // 2,000 keep-alive connections, 200 tunnels, 10,000 idle, slowloris
mod mtls; // agents with client certificates on listen_tls
mod oidc; // workload JWTs verified against a JWKS
mod peer; // unix-socket agents identified by their uid
mod pool; // upstream connections reused, never mid-response
mod scrubbing; // secrets echoed back are redacted, streamed or not
