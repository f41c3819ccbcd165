//! Where sidekey may connect: SSRF-safe name resolution.
//!
//! sidekey resolves every name itself and connects only to the addresses
//! this module returned, so the address checked is the address connected to.
//! Loopback, private, shared (CGNAT), link-local (cloud metadata included),
//! multicast, unspecified, broadcast and special-purpose (benchmarking, IETF
//! assignments) addresses are refused unless the route or rule names that
//! exact address or sets `allow_private`.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;

/// Why an address is not a public destination, or `None` if it is.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => {
            // IPv4 written in IPv6 clothes is judged as IPv4.
            if let Some(v4) = embedded_v4(v6) {
                return v4_reason(v4);
            }
            let seg = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if seg[0] & 0xfe00 == 0xfc00 {
                Some("unique local (private)")
            } else if seg[0] & 0xffc0 == 0xfe80 || seg[0] & 0xffc0 == 0xfec0 {
                Some("link-local")
            } else {
                None
            }
        }
    }
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (CGNAT)")
    } else if ip.is_link_local() {
        Some("link-local (cloud metadata)")
    } else if ip.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if ip.is_multicast() || a >= 240 {
        Some("multicast or reserved")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if a == 198 && (b & 0xfe) == 18 || a == 192 && b == 0 && ip.octets()[2] == 0 {
        // 198.18.0.0/15 (benchmarking) and 192.0.0.0/24 (IETF protocol
        // assignments, some of them NAT64 and DS-Lite gateways) are not
        // the public Internet either.
        Some("special-purpose")
    } else {
        None
    }
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
/// (`::a.b.c.d`), NAT64 (`64:ff9b::a.b.c.d`) or 6to4 (`2002:aabb:ccdd::`)
/// address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let seg = ip.segments();
    if seg[0] == 0x2002 {
        let [a, b] = seg[1].to_be_bytes();
        let [c, d] = seg[2].to_be_bytes();
        return Some(Ipv4Addr::new(a, b, c, d));
    }
    let tail = Ipv4Addr::new(
        (seg[6] >> 8) as u8,
        seg[6] as u8,
        (seg[7] >> 8) as u8,
        seg[7] as u8,
    );
    let compatible = seg[..6].iter().all(|&s| s == 0) && !ip.is_loopback() && !ip.is_unspecified();
    let nat64 = seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6].iter().all(|&s| s == 0);
    (compatible || nat64).then_some(tail)
}

fn with_article(class: &str) -> String {
    let article = if class.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {class}")
}

/// Whether a destination may resolve to private addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Public addresses only.
    Public,
    /// Any address: the route or rule set `allow_private`.
    Any,
}

/// Checks a destination host given literally (an IP in the URL or CONNECT
/// line): a literal is allowed when it is public, when `named` (the route or
/// rule spells that very address), or when `reach` is `Any`.
pub fn check_literal(host: &str, reach: Reach, named: bool) -> Result<(), String> {
    let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    else {
        return Ok(());
    };
    match forbidden_reason(ip) {
        Some(reason) if reach == Reach::Public && !named => {
            Err(format!("{ip} is {} address", with_article(reason)))
        }
        _ => Ok(()),
    }
}

/// Resolves names and drops the addresses `reach` does not allow; a name
/// left with none fails to resolve, so nothing is connected.
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    pub reach: Reach,
}

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let reach = self.reach;
        Box::pin(async move { resolve(name.as_str(), 0, reach).await.map(Vec::into_iter) })
    }
}

/// Resolves `host` and keeps only the addresses `reach` allows.
pub async fn resolve(host: &str, port: u16, reach: Reach) -> io::Result<Vec<SocketAddr>> {
    let all: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    let mut refused = None;
    let allowed: Vec<SocketAddr> = all
        .into_iter()
        .filter(|addr| match (reach, forbidden_reason(addr.ip())) {
            (Reach::Public, Some(reason)) => {
                refused = Some(reason);
                false
            }
            _ => true,
        })
        .collect();
    if allowed.is_empty() {
        // The class of address only: the agent reads this, and the
        // addresses its names resolve to would map the private network.
        let detail = match refused {
            Some(reason) => format!("{host} resolves to {} address", with_article(reason)),
            None => format!("{host} has no address"),
        };
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, detail));
    }
    Ok(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_addresses() {
        let forbidden = [
            "127.0.0.1",
            "127.8.9.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.254",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::10.0.0.1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "198.18.0.1",
            "198.19.255.254",
            "192.0.0.170",
        ];
        for ip in forbidden {
            assert!(forbidden_reason(ip.parse().unwrap()).is_some(), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "100.128.0.1",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "2002:808:808::1",
            "198.20.0.1",
            "192.0.1.1",
        ] {
            assert_eq!(forbidden_reason(ip.parse().unwrap()), None, "{ip}");
        }
    }

    #[test]
    fn literals_are_allowed_when_named_or_reach_is_any() {
        assert!(check_literal("127.0.0.1", Reach::Public, false).is_err());
        assert!(check_literal("[::ffff:127.0.0.1]", Reach::Public, false).is_err());
        assert!(check_literal("127.0.0.1", Reach::Public, true).is_ok());
        assert!(check_literal("127.0.0.1", Reach::Any, false).is_ok());
        assert!(check_literal("example.com", Reach::Public, false).is_ok());
    }

    #[tokio::test]
    async fn odd_notations_resolve_to_what_they_mean_and_are_refused() {
        for host in [
            "2130706433",
            "0x7f000001",
            "017700000001",
            "127.1",
            "localhost",
        ] {
            let result = resolve(host, 80, Reach::Public).await;
            assert!(result.is_err(), "{host} was allowed: {result:?}");
        }
        assert!(resolve("127.0.0.1", 80, Reach::Any).await.is_ok());
    }
}
