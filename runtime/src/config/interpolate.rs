//! `${VAR}` and `${VAR:-default}` in the raw text, before TOML parsing, so
//! line numbers of errors stay those of the file. `$$` is a literal `$`.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterpolationError {
    pub line: usize,
    pub message: String,
}

pub fn interpolate(raw: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, InterpolationError> {
    let mut out = String::with_capacity(raw.len());
    for (index, line) in raw.split_inclusive('\n').enumerate() {
        let line_no = index + 1;
        // Comments are left alone: an example `${X}` in a comment must not fail.
        let (code, comment) = split_comment(line);
        out.push_str(&expand_line(code, line_no, &lookup)?);
        out.push_str(comment);
    }
    Ok(out)
}

/// Walks `line` keeping track of TOML string quotes; stops at the first
/// `#` outside a string. Returns where it stopped and the string (`"` or
/// `'`) open there, if any.
fn scan(line: &str) -> (usize, Option<char>) {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' && q == '"' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '#' => return (i, None),
            None => {}
        }
    }
    (line.len(), quote)
}

/// Splits at a `#` that is outside a quoted string.
fn split_comment(line: &str) -> (&str, &str) {
    line.split_at(scan(line).0)
}

fn expand_line(
    line: &str,
    line_no: usize,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<String, InterpolationError> {
    let err = |message: String| InterpolationError { line: line_no, message };
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body.find('}').ok_or_else(|| err("`${` without a closing `}`".into()))?;
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(err(format!("`${{{expr}}}` is not a valid variable reference")));
            }
            let value = match (lookup(name).filter(|v| !v.is_empty()), default) {
                (Some(v), _) => v,
                (None, Some(d)) => d.to_owned(),
                (None, None) => {
                    return Err(err(format!(
                        "environment variable `{name}` is not set (write `${{{name}:-default}}` for a fallback)"
                    )))
                }
            };
            // The value is data, never TOML: inside a "basic string" it is
            // escaped; inside a 'literal string' (no escapes exist) a quote
            // or control character is refused; outside strings it may only
            // be a bare value (number, boolean) without quotes or brackets.
            match quote_state(&out) {
                Some('"') => out.push_str(&escape_basic(&value)),
                Some(_) => {
                    if value.contains('\'') || value.chars().any(char::is_control) {
                        return Err(err(format!(
                            "environment variable `{name}` contains a quote or control character, which a 'literal string' cannot hold (use \"double quotes\")"
                        )));
                    }
                    out.push_str(&value);
                }
                None => {
                    let bare = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_' | ':');
                    if !value.chars().all(bare) {
                        return Err(err(format!(
                            "environment variable `{name}` is used outside a string and is not a bare number or word (put the reference in \"quotes\")"
                        )));
                    }
                    out.push_str(&value);
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The string the end of `text` (one line so far, no comment) is inside,
/// if any: `"` or `'`.
fn quote_state(text: &str) -> Option<char> {
    scan(text).1
}

/// `value` escaped for a TOML basic string.
fn escape_basic(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("db.local".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_defaults_and_escapes() {
        let out = interpolate("a = \"${HOST}:${PORT:-42}\" # ${NOPE}\nb = \"$$x ${EMPTY:-d}\"\n", env).unwrap();
        assert_eq!(out, "a = \"db.local:42\" # ${NOPE}\nb = \"$x d\"\n");
    }

    #[test]
    fn values_are_data_not_toml() {
        let tricky = |name: &str| match name {
            "PW" => Some("a\"b\\c\n".to_owned()),
            "N" => Some("42".to_owned()),
            "INJECT" => Some("1\n[admin]".to_owned()),
            _ => None,
        };
        let out = interpolate("p = \"${PW}\"\nn = ${N}\n", tricky).unwrap();
        let parsed: toml::Table = toml::from_str(&out).unwrap();
        assert_eq!(parsed["p"].as_str(), Some("a\"b\\c\n"));
        assert_eq!(parsed["n"].as_integer(), Some(42));
        assert!(interpolate("n = ${INJECT}\n", tricky).is_err());
        assert!(interpolate("p = '${PW}'\n", tricky).is_err());
    }

    #[test]
    fn unset_variable_names_line() {
        let e = interpolate("x = 1\ny = \"${MISSING}\"\n", env).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("MISSING"), "{}", e.message);
    }
}
