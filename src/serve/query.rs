//! Parsing and validation of query API requests, apart from HTTP so that they can be fuzzed:
//! every malformed request gets a reason a caller can act on, and nothing a caller sends is
//! echoed back at more than a bounded length.

use crate::check::MAX_ID_BYTES;

/// Longest continue-watching row a query may ask for.
pub const MAX_LIMIT: usize = 1_000;
/// Row length when the query names none.
pub const DEFAULT_LIMIT: usize = 20;
/// Characters of a caller's text quoted back in an error, escapes included.
const QUOTED_CHARS: usize = 64;

/// The parameters of a continue-watching request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowQuery {
    /// Most titles in the row, 1 to [`MAX_LIMIT`].
    pub limit: usize,
}

/// Why a request was refused (the 400 body says it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("limit must be a whole number from 1 to {MAX_LIMIT}, not \"{0}\"")]
    Limit(String),
    #[error("limit is given more than once")]
    RepeatedLimit,
    #[error("unknown query parameter \"{0}\": expected only limit")]
    Unknown(String),
    #[error("{what} is {len} bytes long; identifiers are at most {MAX_ID_BYTES} bytes")]
    IdTooLong { what: &'static str, len: usize },
    #[error("{what} is empty")]
    EmptyId { what: &'static str },
}

/// Parses the query string of `continue-watching` (`None` when the URL has none).
pub fn parse_row_query(raw: Option<&str>) -> Result<RowQuery, QueryError> {
    let mut limit = None;
    for (key, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        if key != "limit" {
            return Err(QueryError::Unknown(quote(&key)));
        }
        if limit.is_some() {
            return Err(QueryError::RepeatedLimit);
        }
        let n = value
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| QueryError::Limit(quote(&value)))?;
        limit = Some(n);
    }
    Ok(RowQuery {
        limit: limit.unwrap_or(DEFAULT_LIMIT),
    })
}

/// Checks a path identifier (`profile_id`, `title_id`) against the input's length rule: a
/// longer one can never be in the table.
pub fn check_id(what: &'static str, id: &str) -> Result<(), QueryError> {
    match id.len() {
        0 => Err(QueryError::EmptyId { what }),
        len if len > MAX_ID_BYTES => Err(QueryError::IdTooLong { what, len }),
        _ => Ok(()),
    }
}

/// `text` escaped (control characters, quotes) and cut to [`QUOTED_CHARS`].
fn quote(text: &str) -> String {
    text.escape_debug().take(QUOTED_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_and_bad_ones_say_why() {
        assert_eq!(parse_row_query(None), Ok(RowQuery { limit: 20 }));
        assert_eq!(parse_row_query(Some("")), Ok(RowQuery { limit: 20 }));
        assert_eq!(parse_row_query(Some("limit=7")), Ok(RowQuery { limit: 7 }));
        assert_eq!(
            parse_row_query(Some("limit=%31%30")),
            Ok(RowQuery { limit: 10 })
        );
        for bad in [
            "limit=0",
            "limit=1001",
            "limit=-1",
            "limit=",
            "limit=1e3",
            "limit=99999999999999999999999",
        ] {
            assert!(
                matches!(parse_row_query(Some(bad)), Err(QueryError::Limit(_))),
                "{bad}"
            );
        }
        assert_eq!(
            parse_row_query(Some("limit=1&limit=2")),
            Err(QueryError::RepeatedLimit)
        );
        let long = format!("{}=1", "x".repeat(10_000));
        let Err(QueryError::Unknown(quoted)) = parse_row_query(Some(&long)) else {
            panic!("an unknown parameter is refused");
        };
        assert_eq!(quoted.len(), QUOTED_CHARS);
    }

    /// Found by the `query` fuzz target: control characters, escaped, made the quoted text
    /// six times its bound.
    #[test]
    fn escaped_text_stays_within_the_bound() {
        let raw = format!("l%%7{}/31", "\u{17}".repeat(63));
        let message = parse_row_query(Some(&raw)).unwrap_err().to_string();
        assert!(message.len() < 120, "{} bytes: {message}", message.len());
        assert!(!message.contains('\u{17}'));
        let wide = format!("limit={}", "\u{10348}".repeat(1_000));
        let message = parse_row_query(Some(&wide)).unwrap_err().to_string();
        assert!(message.chars().count() < 120, "{message}");
    }

    #[test]
    fn identifiers_follow_the_input_length_rule() {
        assert!(check_id("profile_id", "a/b\0c").is_ok());
        assert!(check_id("profile_id", "").is_err());
        assert!(check_id("title_id", &"t".repeat(MAX_ID_BYTES)).is_ok());
        assert!(check_id("title_id", &"t".repeat(MAX_ID_BYTES + 1)).is_err());
    }
}
