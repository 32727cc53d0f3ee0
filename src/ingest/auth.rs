//! Token checks for the local API. Every configured token is compared in
//! constant time (no early exit on the first byte that differs, nor on the
//! first token that matches), so timing tells nothing about a token.

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
