//! sidekey: a credential proxy sidecar for AI agents.
//!
//! The agent holds a short-lived, revocable agent token; sidekey holds the
//! real credentials. Life of a request (see [`proxy`]):
//!
//! 1. [`identity`] finds and verifies the agent token, before anything else,
//!    so an unknown caller learns nothing about routes or hosts;
//! 2. the destination is the reverse gateway's route (first path segment) or
//!    the forward request's / CONNECT's host; a credential goes only to a
//!    route's own origin, never where `Host` or `X-Forwarded-*` point;
//! 3. [`policy::path`] normalises the path once, and that form is both
//!    matched and forwarded;
//! 4. [`policy`] decides: deny wins, default deny;
//! 5. [`secret`] gives the current value or the request fails closed;
//! 6. [`inject`] strips every copy of the slot the agent sent, then sets it;
//! 7. [`egress`] resolves the destination and refuses private addresses; the
//!    request goes to exactly the address checked, TLS verified;
//! 8. [`scrub`] replaces held secrets in response headers and the streamed body;
//! 9. [`audit`] writes one record before the response is released.

pub mod admin;
pub mod audit;
pub mod ca;
pub mod cli;
pub mod config;
pub mod egress;
pub mod exec;
pub mod harden;
pub mod identity;
pub mod inject;
pub mod listen;
pub mod live;
pub mod metrics;
pub mod policy;
#[doc(hidden)]
pub mod properties;
pub mod proxy;
pub mod scrub;
pub mod secret;
pub mod state;
pub mod tls;
pub mod token;
