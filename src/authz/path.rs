//! Path normalisation for authorization: one spelling per path, so that a rule on `/admin`
//! sees `/%61dmin`, `//admin`, `/x/../admin` and `/admin;x=1` as the `/admin` they are to
//! most servers. The normalised path is also the one sent upstream: the instance receives
//! exactly the path the policy judged.
//!
//! The rules, in order:
//!
//! 1. `%XX` must be two hex digits (else refused). An escaped unreserved character (RFC 3986
//!    §2.3: letters, digits, `-`, `.`, `_`, `~`) is decoded (`%61` → `a`, `%2e` → `.`); any
//!    other escape stays escaped, in upper case (`%2f` → `%2F`). An escaped `/` is therefore a
//!    byte of its segment, never a separator. `%00` and a raw NUL are refused.
//! 2. Each segment loses its `;parameters` (`/admin;x=1` → `/admin`, `..;/` → `../`).
//! 3. Empty segments go (`//admin` → `/admin`); `.` goes; `..` removes the segment before it.
//!    A `..` above the root is refused.
//! 4. A path that ended with `/` (or with a `.` or `..` segment) keeps one trailing `/`.

use std::borrow::Cow;

/// Why a path cannot be normalised (answered with 400 `bad-request`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("invalid percent-encoding in the path")]
    BadEscape,
    #[error("NUL in the path")]
    Nul,
    #[error("the path climbs above the root")]
    AboveRoot,
}

impl PathError {
    /// The detail told the client.
    pub fn detail(self) -> &'static str {
        match self {
            PathError::BadEscape => "invalid percent-encoding in the path",
            PathError::Nul => "NUL in the path",
            PathError::AboveRoot => "the path climbs above the root",
        }
    }
}

/// The normalised form of `path` (which starts with `/`, or is empty for the root). Already
/// normal paths, the usual case, are returned borrowed without a copy.
pub fn normalise(path: &str) -> Result<Cow<'_, str>, PathError> {
    if path.is_empty() {
        return Ok(Cow::Borrowed("/"));
    }
    if is_normal(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = false;
    let relative = decoded.strip_prefix('/').unwrap_or(&decoded);
    for raw in relative.split('/') {
        let segment = raw.split(';').next().unwrap_or("");
        trailing = false;
        match segment {
            "" => trailing = true,
            "." => trailing = true,
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing = true;
            }
            s => out.push(s),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for segment in &out {
        normal.push('/');
        normal.push_str(segment);
    }
    if normal.is_empty() || trailing {
        normal.push('/');
    }
    Ok(Cow::Owned(normal))
}

/// Whether `path` is normal already: it starts with `/` and has no `%`, `;`, NUL, empty
/// segment (but a final one) or dot segment.
fn is_normal(path: &[u8]) -> bool {
    if path.first() != Some(&b'/') {
        return false;
    }
    let mut prev = b'/';
    for (i, &b) in path.iter().enumerate().skip(1) {
        match b {
            b'%' | b';' | 0 => return false,
            b'/' if prev == b'/' => return false,
            b'.' if prev == b'/' => {
                // `.` or `..` as a whole segment.
                let rest = &path[i..];
                let end = rest.iter().position(|&c| c == b'/').unwrap_or(rest.len());
                if matches!(&rest[..end], b"." | b"..") {
                    return false;
                }
            }
            _ => {}
        }
        prev = b;
    }
    true
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Rule 1: unreserved escapes decoded, others upper-cased; bad escapes and NUL refused.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            0 => return Err(PathError::Nul),
            b'%' => {
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let byte = h * 16 + l;
                if byte == 0 {
                    return Err(PathError::Nul);
                }
                if is_unreserved(byte) {
                    out.push(char::from(byte));
                } else {
                    out.push('%');
                    out.push(char::from(bytes[i + 1]).to_ascii_uppercase());
                    out.push(char::from(bytes[i + 2]).to_ascii_uppercase());
                }
                i += 3;
            }
            _ => {
                // Copy the run up to the next `%` or NUL as it is (it may hold UTF-8).
                let end = bytes[i..]
                    .iter()
                    .position(|&b| b == b'%' || b == 0)
                    .map_or(bytes.len(), |n| i + n);
                out.push_str(&path[i..end]);
                i = end;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn paths_normalise_as_the_table_says() {
        let table: &[(&str, Result<&str, PathError>)] = &[
            ("", Ok("/")),
            ("/", Ok("/")),
            ("/admin", Ok("/admin")),
            ("/admin/", Ok("/admin/")),
            ("/%61dmin", Ok("/admin")),
            ("/%41DMIN", Ok("/ADMIN")),
            ("//admin", Ok("/admin")),
            ("///admin//x", Ok("/admin/x")),
            ("/x/../admin", Ok("/admin")),
            ("/x/%2e%2e/admin", Ok("/admin")),
            ("/x/%2E./admin", Ok("/admin")),
            ("/./admin", Ok("/admin")),
            ("/admin;x=1", Ok("/admin")),
            ("/admin;x=1/y;z", Ok("/admin/y")),
            ("/x/..;/admin", Ok("/admin")),
            ("/a/b/..", Ok("/a/")),
            ("/a/.", Ok("/a/")),
            ("/a%2fb", Ok("/a%2Fb")),
            ("/a%2Fb/../c", Ok("/c")),
            ("/%7e", Ok("/~")),
            ("/%20x", Ok("/%20x")),
            ("/..", Err(PathError::AboveRoot)),
            ("/x/../../admin", Err(PathError::AboveRoot)),
            ("/%2e%2e/admin", Err(PathError::AboveRoot)),
            ("/a%2", Err(PathError::BadEscape)),
            ("/a%zz", Err(PathError::BadEscape)),
            ("/a%00", Err(PathError::Nul)),
            ("/a\0b", Err(PathError::Nul)),
        ];
        for (input, expected) in table {
            let got = normalise(input).map(|p| p.into_owned());
            assert_eq!(
                got.as_deref().map_err(|e| *e),
                expected.map(|s| s),
                "{input:?}"
            );
        }
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/a", "/a/b/", "/a.b/.c/d..", "/x?"] {
            assert!(matches!(normalise(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    proptest! {
        #[test]
        fn normalising_twice_changes_nothing_and_leaves_no_dot_or_empty_segment(
            segs in proptest::collection::vec(
                prop_oneof![
                    Just("".to_owned()), Just(".".to_owned()), Just("..".to_owned()),
                    Just("%2e%2e".to_owned()), Just("%2F".to_owned()), Just("a;p=1".to_owned()),
                    "[a-z%0-9A-F]{1,6}",
                ],
                0..8,
            ),
        ) {
            let path = format!("/{}", segs.join("/"));
            if let Ok(once) = normalise(&path) {
                let twice = normalise(&once).unwrap();
                prop_assert_eq!(&*twice, &*once);
                prop_assert!(once.starts_with('/'));
                prop_assert!(!once.contains("//"));
                prop_assert!(!once.contains(';'));
                for seg in once.split('/') {
                    prop_assert!(seg != "." && seg != "..", "{}", once);
                }
            }
        }
    }
}
