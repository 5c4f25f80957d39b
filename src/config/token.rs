//! Tokens of the control APIs: the registry's (Consul's `X-Consul-Token`, `Authorization:
//! Bearer`, `?token=`) and the admin listener's (`Authorization: Bearer`).
//!
//! A token comes from a file named in the config (so the secret is not in the config itself)
//! or from an environment variable. A [`Token`] never prints itself: its `Debug` is redacted,
//! it has no `Display`, and errors about it name the file, never the content.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The longest token accepted, in bytes (Consul's are 36-byte UUIDs).
pub const MAX_TOKEN: usize = 4096;

/// A secret that grants access to a control API.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

// === impl Token ===

impl Token {
    /// A token from text: surrounding whitespace (a file's final newline) is dropped. Empty,
    /// too long, or with bytes that cannot travel in an HTTP header: `Err` with the reason.
    pub fn new(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("the token is empty".to_owned());
        }
        if text.len() > MAX_TOKEN {
            return Err(format!("the token is longer than {MAX_TOKEN} bytes"));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "the token must be printable ASCII without spaces (it travels in HTTP headers)"
                    .to_owned(),
            );
        }
        Ok(Self(text.to_owned()))
    }

    /// Reads a token file: a regular file of at most [`MAX_TOKEN`] bytes (plus whitespace).
    /// Errors give the reason, never the file's content.
    pub fn read(path: &Path) -> Result<Self, String> {
        let file = std::fs::File::open(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if !meta.is_file() {
            return Err(format!("{} is not a regular file", path.display()));
        }
        let mut text = String::new();
        file.take(MAX_TOKEN as u64 + 64)
            .read_to_string(&mut text)
            .map_err(|_| format!("{} is not a text file", path.display()))?;
        Self::new(&text).map_err(|reason| format!("{}: {reason}", path.display()))
    }

    /// The secret, to send it. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time that does not depend on where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let ours = self.0.as_bytes();
        // The length is not secret enough to hide; the content is.
        if ours.len() != presented.len() {
            return false;
        }
        ours.iter()
            .zip(presented)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Whether a listener at `addr` is reachable from other machines: anything but a loopback
/// address (an unspecified address such as 0.0.0.0 listens on every interface).
pub fn exposed(addr: SocketAddr) -> bool {
    !addr.ip().is_loopback()
}

/// Where a token setting came from, to pick the token: an environment variable (its value is
/// the token) wins over a file key.
#[derive(Clone, Debug, Default)]
pub struct TokenSetting {
    /// The token given by the variable's value.
    pub env: Option<String>,
    /// The file given by a flag or the config file.
    pub file: Option<PathBuf>,
}

impl TokenSetting {
    /// The token, or `None` when neither is given; `Err` with the reason otherwise.
    pub fn load(&self, env_name: &str) -> Result<Option<Token>, String> {
        if let Some(text) = &self.env {
            return Token::new(text)
                .map(Some)
                .map_err(|reason| format!("{env_name}: {reason}"));
        }
        match &self.file {
            Some(path) => Token::read(path).map(Some),
            None => Ok(None),
        }
    }
}

/// The token a request to the registry carries, found as Consul finds it (agent/http.go
/// `parseTokenInternal`): the `token` query parameter, else `X-Consul-Token`, else
/// `Authorization: Bearer <token>`.
pub fn consul_request_token<'a>(
    query: Option<&'a str>,
    headers: &'a http::HeaderMap,
) -> Option<std::borrow::Cow<'a, [u8]>> {
    let from_query = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| {
            let value = pair.strip_prefix("token=")?;
            (!value.is_empty()).then_some(value)
        });
    if let Some(value) = from_query {
        let decoded = crate::http1::percent_decode(value, true)
            .map_or_else(|| value.as_bytes().to_vec(), String::into_bytes);
        return Some(std::borrow::Cow::Owned(decoded));
    }
    if let Some(value) = headers.get("x-consul-token").filter(|v| !v.is_empty()) {
        return Some(std::borrow::Cow::Borrowed(value.as_bytes()));
    }
    bearer(headers).map(std::borrow::Cow::Borrowed)
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub fn bearer(headers: &http::HeaderMap) -> Option<&[u8]> {
    let value = headers.get(http::header::AUTHORIZATION)?.as_bytes();
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let rest = crate::http1::trim_ows(rest);
    (!rest.is_empty()).then_some(rest)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_token_never_prints_its_secret() {
        let token = Token::new("s3cret-value\n").unwrap();
        assert_eq!(token.expose(), "s3cret-value");
        assert!(!format!("{token:?}").contains("s3cret"));
        assert!(token.matches(b"s3cret-value"));
        assert!(!token.matches(b"s3cret-valuf"));
        assert!(!token.matches(b"s3cret"));
        assert!(Token::new(" \n").is_err());
        assert!(Token::new("two words").is_err());
    }

    #[test]
    fn a_token_file_must_be_a_small_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc\n").unwrap();
        assert_eq!(Token::read(&path).unwrap().expose(), "abc");
        let e = Token::read(dir.path()).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::write(&path, "x".repeat(MAX_TOKEN + 1)).unwrap();
        assert!(Token::read(&path).is_err());
        std::fs::write(&path, "secret with space").unwrap();
        let e = Token::read(&path).unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn consul_looks_for_the_query_then_the_header_then_the_bearer() {
        let mut headers = http::HeaderMap::new();
        headers.insert("authorization", "Bearer  b ".parse().unwrap());
        assert_eq!(
            consul_request_token(None, &headers).as_deref(),
            Some(&b"b"[..])
        );
        headers.insert("x-consul-token", "h".parse().unwrap());
        assert_eq!(
            consul_request_token(None, &headers).as_deref(),
            Some(&b"h"[..])
        );
        assert_eq!(
            consul_request_token(Some("a=1&token=q%2Dx"), &headers).as_deref(),
            Some(&b"q-x"[..])
        );
        headers.clear();
        headers.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(consul_request_token(Some("token="), &headers), None);
    }

    #[test]
    fn only_loopback_listeners_are_private() {
        assert!(!exposed("127.0.0.1:1".parse().unwrap()));
        assert!(!exposed("[::1]:1".parse().unwrap()));
        assert!(exposed("0.0.0.0:1".parse().unwrap()));
        assert!(exposed("10.0.0.1:1".parse().unwrap()));
    }
}
