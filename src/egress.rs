//! What the server may fetch. A dataset URL is the one way a tenant makes the server open a
//! connection, so it must not reach what only the server can reach: its own loopback, the
//! private network behind it, the cloud metadata service. The rules:
//!
//! - http and https only, no userinfo (`user:pass@` would be sent on as credentials);
//! - the host's addresses, resolved here, must all be public: loopback, private (RFC 1918),
//!   carrier-grade NAT, link-local (169.254/16, the metadata service), unique-local,
//!   multicast, broadcast, documentation and unspecified addresses are refused, in IPv4, IPv6
//!   and IPv4-mapped IPv6, whatever the spelling (`0x7f000001` is parsed as 127.0.0.1 first);
//! - the connection goes to the address that was checked ([`GuardedResolver`] answers reqwest's
//!   lookups), so a second DNS answer cannot swap it; every redirect is checked the same way;
//! - the operator may allow hosts, `host:port`s or address ranges (`--fetch-allow`), for an
//!   internal object store for example.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::Url;

/// What the operator allows beyond the public internet.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    allowed: Vec<Allowed>,
}

#[derive(Debug, Clone, PartialEq)]
enum Allowed {
    /// A host name (lower case), any port.
    Host(String),
    /// A host name or address and one port.
    HostPort(String, u16),
    /// An address range.
    Range(IpAddr, u8),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("only http and https URLs are fetched")]
    Scheme,
    #[error("URLs with a user name or password are refused (credentials in URLs leak into logs and redirects)")]
    Userinfo,
    #[error("the URL has no host")]
    NoHost,
    #[error("{0} is not a public address (loopback, private, link-local and other internal addresses are refused; an operator can allow hosts with --fetch-allow)")]
    Internal(IpAddr),
    #[error("{0} resolves to no public address")]
    NoPublicAddress(String),
    #[error("{0} is allowed only on other ports")]
    PortNotAllowed(String),
}

impl EgressPolicy {
    /// Entries as the operator writes them: `host`, `host:port`, `address`, `address/prefix`.
    pub fn parse(entries: &[String]) -> Result<EgressPolicy, String> {
        let mut allowed = Vec::new();
        for raw in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let entry = raw.to_ascii_lowercase();
            let parsed = if let Some((ip, prefix)) = entry.split_once('/') {
                let ip: IpAddr = ip.parse().map_err(|_| format!("{raw:?}: not an address"))?;
                let prefix: u8 = prefix
                    .parse()
                    .ok()
                    .filter(|p| *p <= if ip.is_ipv4() { 32 } else { 128 })
                    .ok_or_else(|| format!("{raw:?}: bad prefix length"))?;
                Allowed::Range(ip, prefix)
            } else if let Ok(ip) = entry.trim_matches(['[', ']']).parse::<IpAddr>() {
                Allowed::Range(ip, if ip.is_ipv4() { 32 } else { 128 })
            } else if let Ok(addr) = entry.parse::<SocketAddr>() {
                Allowed::HostPort(addr.ip().to_string(), addr.port())
            } else if let Some((host, port)) = entry.rsplit_once(':') {
                let port = port.parse().map_err(|_| format!("{raw:?}: bad port"))?;
                Allowed::HostPort(host.to_string(), port)
            } else {
                Allowed::Host(entry)
            };
            allowed.push(parsed);
        }
        Ok(EgressPolicy { allowed })
    }

    fn allows_host(&self, host: &str, port: u16) -> bool {
        self.allowed.iter().any(|a| match a {
            Allowed::Host(h) => h == host,
            Allowed::HostPort(h, p) => h == host && *p == port,
            Allowed::Range(..) => false,
        })
    }

    fn allows_ip(&self, ip: IpAddr, port: u16) -> bool {
        let ip = canonical(ip);
        self.allowed.iter().any(|a| match a {
            Allowed::Range(net, prefix) => in_range(ip, canonical(*net), *prefix),
            Allowed::HostPort(h, p) => {
                *p == port && h.parse::<IpAddr>().is_ok_and(|a| canonical(a) == ip)
            }
            Allowed::Host(_) => false,
        })
    }

    /// Checks a URL before any connection: scheme, userinfo, and the host when it is an
    /// address. A name is checked when it resolves ([`GuardedResolver`]).
    pub fn check_url(&self, url: &Url) -> Result<(), Refused> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Refused::Scheme);
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refused::Userinfo);
        }
        let port = url.port_or_known_default().unwrap_or(0);
        match url.host() {
            None => Err(Refused::NoHost),
            Some(url::Host::Ipv4(ip)) => self.check_ip(IpAddr::V4(ip), port),
            Some(url::Host::Ipv6(ip)) => self.check_ip(IpAddr::V6(ip), port),
            Some(url::Host::Domain(name)) => {
                // `localhost.` is `localhost`
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                if self.allows_host(&name, port) {
                    return Ok(());
                }
                // the resolver lets an allowed name reach internal addresses: only on its ports
                if self
                    .allowed
                    .iter()
                    .any(|a| matches!(a, Allowed::HostPort(h, _) if *h == name))
                {
                    return Err(Refused::PortNotAllowed(name));
                }
                // names that mean this machine whatever DNS says
                if name == "localhost" || name.ends_with(".localhost") {
                    return Err(Refused::Internal(IpAddr::V4(Ipv4Addr::LOCALHOST)));
                }
                Ok(())
            }
        }
    }

    fn check_ip(&self, ip: IpAddr, port: u16) -> Result<(), Refused> {
        if is_public(ip) || self.allows_ip(ip, port) {
            Ok(())
        } else {
            Err(Refused::Internal(ip))
        }
    }

    /// A resolver for reqwest that answers only with addresses this policy allows.
    pub fn resolver(self: &Arc<Self>) -> Arc<GuardedResolver> {
        Arc::new(GuardedResolver {
            policy: self.clone(),
        })
    }
}

/// IPv4-mapped and IPv4-compatible IPv6 addresses are checked as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn in_range(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX.checked_shl(128 - prefix as u32).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// Whether an address is on the public internet: not loopback, private, shared (CGNAT),
/// link-local, unique-local, multicast, broadcast, documentation, benchmarking, reserved or
/// unspecified.
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let internal: [(Ipv4Addr, u8); 15] = [
        (Ipv4Addr::new(0, 0, 0, 0), 8),       // "this network", unspecified
        (Ipv4Addr::new(10, 0, 0, 0), 8),      // private
        (Ipv4Addr::new(100, 64, 0, 0), 10),   // shared address space (CGNAT)
        (Ipv4Addr::new(127, 0, 0, 0), 8),     // loopback
        (Ipv4Addr::new(169, 254, 0, 0), 16),  // link-local, cloud metadata
        (Ipv4Addr::new(172, 16, 0, 0), 12),   // private
        (Ipv4Addr::new(192, 0, 0, 0), 24),    // IETF protocol assignments
        (Ipv4Addr::new(192, 0, 2, 0), 24),    // documentation
        (Ipv4Addr::new(192, 88, 99, 0), 24),  // 6to4 relay anycast
        (Ipv4Addr::new(192, 168, 0, 0), 16),  // private
        (Ipv4Addr::new(198, 18, 0, 0), 15),   // benchmarking
        (Ipv4Addr::new(198, 51, 100, 0), 24), // documentation
        (Ipv4Addr::new(203, 0, 113, 0), 24),  // documentation
        (Ipv4Addr::new(224, 0, 0, 0), 4),     // multicast
        (Ipv4Addr::new(240, 0, 0, 0), 4),     // reserved, broadcast
    ];
    !internal
        .iter()
        .any(|(net, prefix)| in_range(IpAddr::V4(ip), IpAddr::V4(*net), *prefix))
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let internal: [(Ipv6Addr, u8); 9] = [
        (Ipv6Addr::UNSPECIFIED, 128),
        (Ipv6Addr::LOCALHOST, 128),
        (Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 0), 96), // IPv4-compatible (deprecated)
        (Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96), // NAT64: an IPv4 behind it
        (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64), // discard
        (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32), // documentation
        (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7), // unique-local
        (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10), // link-local
        (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8), // multicast
    ];
    !internal
        .iter()
        .any(|(net, prefix)| in_range(IpAddr::V6(ip), IpAddr::V6(*net), *prefix))
}

/// reqwest's resolver: resolves a name once and hands back only the addresses the policy
/// allows, so the connection is made to a checked address.
pub struct GuardedResolver {
    policy: Arc<EgressPolicy>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().trim_end_matches('.').to_ascii_lowercase();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            // a name the operator allows may resolve anywhere; the port is checked per URL
            let named = policy
                .allowed
                .iter()
                .any(|a| matches!(a, Allowed::Host(h) | Allowed::HostPort(h, _) if *h == host));
            let usable: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| named || is_public(a.ip()) || policy.allows_ip(a.ip(), 0))
                .collect();
            if usable.is_empty() {
                let refused: Box<dyn std::error::Error + Send + Sync> =
                    Box::new(Refused::NoPublicAddress(host));
                return Err(refused);
            }
            let addrs: reqwest::dns::Addrs = Box::new(usable.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(policy: &EgressPolicy, url: &str) -> Result<(), Refused> {
        policy.check_url(&Url::parse(url).unwrap())
    }

    #[test]
    fn internal_addresses_are_refused_in_every_spelling() {
        let p = EgressPolicy::default();
        for url in [
            "http://127.0.0.1/x",
            "http://0x7f000001/x",
            "http://2130706433/x",
            "http://0177.0.0.1/x",
            "http://127.1/x",
            "http://localhost:8080/x",
            "http://api.localhost/x",
            "http://LOCALHOST./x",
            "http://[::1]/x",
            "http://[::ffff:127.0.0.1]/x",
            "http://[::ffff:a9fe:a9fe]/x",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.1.2.3/x",
            "http://172.31.0.1/x",
            "http://192.168.1.1/x",
            "http://100.64.0.1/x",
            "http://0.0.0.0/x",
            "http://[fd00::1]/x",
            "http://[fe80::1]/x",
            "http://224.0.0.1/x",
            "http://255.255.255.255/x",
        ] {
            assert!(
                matches!(check(&p, url), Err(Refused::Internal(_))),
                "{url} must be refused"
            );
        }
        assert_eq!(
            check(&p, "http://u:p@example.com/x"),
            Err(Refused::Userinfo)
        );
        assert_eq!(check(&p, "ftp://example.com/x"), Err(Refused::Scheme));
        assert_eq!(check(&p, "https://example.com/data.jsonl"), Ok(()));
        assert_eq!(check(&p, "http://93.184.216.34/x"), Ok(()));
    }

    #[test]
    fn the_operator_allows_hosts_ports_and_ranges() {
        let p = EgressPolicy::parse(&[
            "minio.internal".into(),
            "127.0.0.1:9000".into(),
            "10.0.0.0/8".into(),
        ])
        .unwrap();
        assert_eq!(check(&p, "http://127.0.0.1:9000/b/k"), Ok(()));
        assert!(check(&p, "http://127.0.0.1:9001/b/k").is_err());
        assert_eq!(check(&p, "http://10.9.8.7/x"), Ok(()));
        assert!(check(&p, "http://11.0.0.1/x").is_ok());
        assert!(check(&p, "http://192.168.0.1/x").is_err());
        assert_eq!(check(&p, "http://minio.internal/x"), Ok(()));
        let q = EgressPolicy::parse(&["store.internal:9000".into()]).unwrap();
        assert_eq!(check(&q, "http://store.internal:9000/x"), Ok(()));
        assert!(check(&q, "http://store.internal:22/x").is_err());
        assert!(EgressPolicy::parse(&["10.0.0.0/40".into()]).is_err());
    }

    #[tokio::test]
    async fn names_are_resolved_once_and_internal_answers_refused() {
        use reqwest::dns::Resolve;
        use std::str::FromStr;
        let open = Arc::new(EgressPolicy::default()).resolver();
        let name = reqwest::dns::Name::from_str("localhost").unwrap();
        let err = open
            .resolve(name)
            .await
            .err()
            .expect("loopback answers are refused");
        assert!(err.to_string().contains("no public address"), "{err}");
        let allowed = Arc::new(EgressPolicy::parse(&["localhost".into()]).unwrap()).resolver();
        let name = reqwest::dns::Name::from_str("localhost").unwrap();
        assert!(allowed.resolve(name).await.is_ok());
    }
}
