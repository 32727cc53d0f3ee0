//! Who may call the local API. Every configured token is compared in
//! constant time (no early exit on the first byte that differs, nor on the
//! first token that matches), so timing tells nothing about a token.
//!
//! Browsers are the other caller to keep out: any web page open on the
//! gateway can send requests to a loopback port. A page's cross-origin POST
//! carries an `Origin` header, so a request whose `Origin` is not explicitly
//! allowed is refused. A page that has its own name resolve to 127.0.0.1
//! (DNS rebinding) makes same-origin requests with its own name in `Host`;
//! where no token is configured (the listener is then loopback only) only
//! loopback names and the operator's `allowed_hosts` pass. Where tokens are
//! set, a page cannot present one, and the names operators reach the agent
//! by keep working without being listed.

use base64::Engine as _;
use http::HeaderMap;
use subtle::ConstantTimeEq;

use crate::config::Secret;

/// The credential a request offers: `Authorization: Token T`, `Bearer T`,
/// `Basic base64(user:T)`, or the v1 `p=T` query parameter.
pub fn offered(headers: &HeaderMap, query_password: Option<&str>) -> Option<Vec<u8>> {
    if let Some(value) = headers.get(http::header::AUTHORIZATION) {
        let value = value.as_bytes();
        let (scheme, rest) = match value.iter().position(|&b| b == b' ') {
            Some(i) => (&value[..i], trim(&value[i + 1..])),
            None => (value, &b""[..]),
        };
        if scheme.eq_ignore_ascii_case(b"token") || scheme.eq_ignore_ascii_case(b"bearer") {
            return Some(rest.to_vec());
        }
        if scheme.eq_ignore_ascii_case(b"basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()?;
            let i = decoded.iter().position(|&b| b == b':')?;
            return Some(decoded[i + 1..].to_vec());
        }
        return None;
    }
    query_password.map(|p| p.as_bytes().to_vec())
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &b[start..end]
}

/// True when a request naming `host` (the `Host` header, with or without a
/// port) may be served by a listener without tokens: a loopback name or
/// address, or one of `allowed` (lower case, no port). Requests without a
/// `Host` (HTTP/1.0 tools) come from no browser and pass.
pub fn host_allowed(host: Option<&[u8]>, allowed: &[String]) -> bool {
    let Some(host) = host else {
        return true;
    };
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let host = host.trim().to_ascii_lowercase();
    // Strip the port: after `]` for IPv6, after the only `:` otherwise.
    let name = if host.starts_with('[') {
        match host.find(']') {
            Some(i) => &host[..=i],
            None => return false,
        }
    } else {
        host.split(':').next().unwrap_or_default()
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name == "localhost" || name.ends_with(".localhost") || name == "[::1]" {
        return true;
    }
    if name
        .parse::<std::net::Ipv4Addr>()
        .is_ok_and(|ip| ip.is_loopback())
    {
        return true;
    }
    allowed.iter().any(|a| a == name)
}

/// True when `origin` (the `Origin` header) is one of `allowed` (lower case
/// `scheme://host[:port]`).
pub fn origin_allowed(origin: &[u8], allowed: &[String]) -> bool {
    let Ok(origin) = std::str::from_utf8(origin) else {
        return false;
    };
    let origin = origin.trim();
    allowed.iter().any(|a| a.eq_ignore_ascii_case(origin))
}

/// True when `tokens` is empty (open, loopback only) or `offered` matches one.
pub fn allowed(tokens: &[Secret], offered: Option<&[u8]>) -> bool {
    if tokens.is_empty() {
        return true;
    }
    let Some(offered) = offered else {
        return false;
    };
    let mut ok = subtle::Choice::from(0);
    for t in tokens {
        ok |= t.expose().as_bytes().ct_eq(offered);
    }
    ok.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, auth.parse().unwrap());
        h
    }

    #[test]
    fn every_scheme_offers_the_token() {
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("user:s3cret")
        );
        for auth in [
            "Token s3cret",
            "token  s3cret",
            "Bearer s3cret",
            basic.as_str(),
        ] {
            assert_eq!(
                offered(&headers(auth), None).as_deref(),
                Some(&b"s3cret"[..]),
                "{auth}"
            );
        }
        assert_eq!(
            offered(&HeaderMap::new(), Some("s3cret")).as_deref(),
            Some(&b"s3cret"[..])
        );
        assert_eq!(offered(&headers("Digest x"), Some("s3cret")), None);
        assert_eq!(offered(&HeaderMap::new(), None), None);
    }

    #[test]
    fn loopback_and_listed_hosts_pass() {
        let listed = vec!["gw-17.local".to_string(), "[fd00::1]".to_string()];
        for ok in [
            "localhost",
            "LOCALHOST:8086",
            "localhost.:8086",
            "app.localhost",
            "127.0.0.1:8086",
            "127.1.2.3",
            "[::1]:8086",
            "[::1]",
            "gw-17.local:8086",
            "GW-17.local",
            "[fd00::1]:8086",
        ] {
            assert!(host_allowed(Some(ok.as_bytes()), &listed), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8086",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "0.0.0.0:8086",
            "192.168.1.20",
            "[::2]:8086",
            "[::1",
            "",
        ] {
            assert!(!host_allowed(Some(bad.as_bytes()), &listed), "{bad}");
        }
        assert!(!host_allowed(Some(b"\xff"), &listed));
        assert!(host_allowed(None, &[]), "no Host: no browser");
    }

    #[test]
    fn only_listed_origins_pass() {
        let listed = vec!["http://grafana.local:3000".to_string()];
        assert!(origin_allowed(b"http://grafana.local:3000", &listed));
        assert!(origin_allowed(b"HTTP://Grafana.Local:3000", &listed));
        for bad in [
            &b"http://grafana.local"[..],
            b"https://grafana.local:3000",
            b"null",
            b"http://evil.example",
            b"\xff",
        ] {
            assert!(!origin_allowed(bad, &listed));
        }
        assert!(!origin_allowed(b"http://localhost:3000", &[]));
    }

    #[test]
    fn only_configured_tokens_pass() {
        let tokens = vec![Secret::new("alpha".into()), Secret::new("beta".into())];
        assert!(allowed(&tokens, Some(b"beta")));
        assert!(allowed(&tokens, Some(b"alpha")));
        for bad in [&b"alph"[..], b"alphaa", b"", b"BETA"] {
            assert!(!allowed(&tokens, Some(bad)));
        }
        assert!(!allowed(&tokens, None));
        assert!(
            allowed(&[], None),
            "no tokens configured: open (loopback only)"
        );
    }
}
