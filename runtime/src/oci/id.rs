//! Container (and sandbox) ids: the one check every command and the shim
//! apply before an id names anything on the host. An id becomes a path
//! component (`<root>/<id>`, `<share>/<id>`), a tap or cgroup name part and
//! a log field, so it must never walk out of its directory (`..`, `/`), hide
//! (a leading dot) or carry control characters.

use std::fmt;
use std::str::FromStr;

/// The longest id accepted (runc accepts any length; containerd's ids stay
/// far below; a path component must fit NAME_MAX with room for suffixes).
pub const MAX_LEN: usize = 200;

/// A validated container id: letters, digits and `_+-.`, not starting with
/// a dot, 1 to [`MAX_LEN`] bytes (runc's rule, with a length bound).
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct ContainerId(String);

/// An id that was refused, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid container id {id}: {why}")]
pub struct InvalidId {
    /// The id as given, escaped and shortened (it may be anything).
    pub id: String,
    /// What rule it broke.
    pub why: &'static str,
}

impl ContainerId {
    /// Checks `id`.
    pub fn new(id: &str) -> Result<ContainerId, InvalidId> {
        let why = if id.is_empty() {
            Some("empty")
        } else if id.len() > MAX_LEN {
            Some("longer than 200 bytes")
        } else if id.starts_with('.') {
            Some("starts with a dot")
        } else if !id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_+-.".contains(&c))
        {
            Some("only letters, digits and _+-. are allowed")
        } else {
            None
        };
        match why {
            None => Ok(ContainerId(id.to_string())),
            Some(why) => Err(InvalidId { id: quote(id), why }),
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `id` quoted for an error line: control characters escaped, at most 64
/// characters kept.
fn quote(id: &str) -> String {
    let mut short: String = id.chars().take(64).collect();
    if short.len() < id.len() {
        short.push('…');
    }
    format!("{short:?}")
}

impl FromStr for ContainerId {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ContainerId::new(s)
    }
}

impl TryFrom<String> for ContainerId {
    type Error = InvalidId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        ContainerId::new(&s)
    }
}

impl From<ContainerId> for String {
    fn from(id: ContainerId) -> String {
        id.0
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ContainerId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<std::path::Path> for ContainerId {
    fn as_ref(&self) -> &std::path::Path {
        std::path::Path::new(&self.0)
    }
}

impl std::ops::Deref for ContainerId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_ids_pass() {
        for ok in ["abc-1.2_x", "a", "A+b", &"x".repeat(MAX_LEN)] {
            assert_eq!(ContainerId::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn ids_that_would_leave_their_directory_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "../victim",
            "a/b",
            "/",
            "/etc",
            ".hidden",
            "a b",
            "a\nb",
            "a\0b",
            "é",
            &"x".repeat(MAX_LEN + 1),
        ] {
            let e = ContainerId::new(bad).unwrap_err();
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }

    #[test]
    fn a_refused_id_is_escaped_and_bounded_in_the_error() {
        let e = ContainerId::new(&format!("\x1b[31m{}", "y".repeat(10_000))).unwrap_err();
        let line = e.to_string();
        assert!(!line.contains('\x1b'), "{line}");
        assert!(line.len() < 200, "{line}");
    }
}
