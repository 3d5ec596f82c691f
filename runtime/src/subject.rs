//! NATS-style subjects: dot-separated tokens; in patterns `*` matches one
//! token and a final `>` matches one or more. Used by the embedded broker's
//! bindings and by the publish/request allow-lists of plugins.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("subject is empty")]
    Empty,
    #[error("subject {0:?} has an empty token (two dots, or a leading or trailing dot)")]
    EmptyToken(String),
    #[error("subject {0:?} contains whitespace")]
    Whitespace(String),
    #[error("subject {0:?} contains a wildcard; only patterns may")]
    Wildcard(String),
    #[error("pattern {0:?}: `>` may only be the last token, and wildcards must be whole tokens")]
    BadWildcard(String),
}

fn check_tokens(s: &str) -> Result<(), SubjectError> {
    if s.is_empty() {
        return Err(SubjectError::Empty);
    }
    if s.chars().any(char::is_whitespace) {
        return Err(SubjectError::Whitespace(s.to_owned()));
    }
    if s.split('.').any(str::is_empty) {
        return Err(SubjectError::EmptyToken(s.to_owned()));
    }
    Ok(())
}

/// Checks a concrete subject (no wildcards).
pub fn validate_subject(s: &str) -> Result<(), SubjectError> {
    check_tokens(s)?;
    if s.split('.').any(|t| t.contains(['*', '>'])) {
        return Err(SubjectError::Wildcard(s.to_owned()));
    }
    Ok(())
}

/// A subject pattern such as `orders.>` or `orders.*.paid`.
#[derive(Clone, PartialEq, Eq)]
pub struct SubjectPattern {
    text: String,
}

impl SubjectPattern {
    pub fn parse(text: &str) -> Result<Self, SubjectError> {
        check_tokens(text)?;
        let tokens: Vec<&str> = text.split('.').collect();
        for (i, t) in tokens.iter().enumerate() {
            let wild = t.contains(['*', '>']);
            let ok = !wild || *t == "*" || (*t == ">" && i == tokens.len() - 1);
            if !ok {
                return Err(SubjectError::BadWildcard(text.to_owned()));
            }
        }
        Ok(Self { text: text.to_owned() })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, subject: &str) -> bool {
        let mut pat = self.text.split('.');
        let mut sub = subject.split('.');
        loop {
            match (pat.next(), sub.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(p), Some(s)) if p == s => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl fmt::Display for SubjectPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for SubjectPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SubjectPattern({})", self.text)
    }
}

pub const PLAIN_NAME: &str = "must be 1-200 of A-Z a-z 0-9 . _ -";

/// Route and queue names: they end up in subjects, metric labels and
/// `sluice-origin` headers, where other characters would need escaping.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, s: &str) -> bool {
        SubjectPattern::parse(p).unwrap().matches(s)
    }

    #[test]
    fn wildcards() {
        assert!(m("orders.>", "orders.created"));
        assert!(m("orders.>", "orders.a.b"));
        assert!(!m("orders.>", "orders"));
        assert!(m("orders.*.paid", "orders.eu.paid"));
        assert!(!m("orders.*.paid", "orders.eu.x.paid"));
        assert!(!m("orders.*", "orders.a.b"));
        assert!(m("a.b", "a.b"));
        assert!(!m("a.b", "a.b.c"));
        assert!(!m("a.b.c", "a.b"));
        assert!(m(">", "anything.at.all"));
    }

    #[test]
    fn rejects_bad_patterns_and_subjects() {
        assert!(SubjectPattern::parse("a.>.b").is_err());
        assert!(SubjectPattern::parse("a.b*").is_err());
        assert!(SubjectPattern::parse("a..b").is_err());
        assert!(SubjectPattern::parse("").is_err());
        assert!(validate_subject("a.*").is_err());
        assert!(validate_subject("a b").is_err());
        assert!(validate_subject("orders.created").is_ok());
    }
}
