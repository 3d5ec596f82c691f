//! Finds the line of a key path (`routes.0.source.subject`) in TOML text, so
//! errors found after parsing can still name the line.

use std::collections::HashMap;

/// Maps every table header and key assignment to its 1-based line.
pub struct KeyLines {
    lines: HashMap<Vec<String>, usize>,
}

fn split_key(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    for c in text.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '.' => parts.push(std::mem::take(&mut cur).trim().to_owned()),
            None => cur.push(c),
        }
    }
    parts.push(cur.trim().to_owned());
    parts
}

impl KeyLines {
    pub fn scan(text: &str) -> Self {
        let mut lines = HashMap::new();
        let mut array_len: HashMap<Vec<String>, usize> = HashMap::new();
        let mut table: Vec<String> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = raw.trim();
            if let Some(inner) = line.strip_prefix("[[").and_then(|l| l.split("]]").next()) {
                // The array itself is the last key: resolve only its parents.
                let mut keys = split_key(inner);
                let last = keys.pop().unwrap_or_default();
                let mut path = resolve(&keys, &array_len);
                path.push(last);
                let n = array_len.entry(path.clone()).or_insert(0);
                table = path;
                table.push(n.to_string());
                *n += 1;
                lines.insert(table.clone(), line_no);
            } else if let Some(inner) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
                table = resolve(&split_key(inner), &array_len);
                lines.insert(table.clone(), line_no);
            } else if let Some((key, _)) = line.split_once('=') {
                let key = key.trim();
                let plausible =
                    !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || "_-.\"' ".contains(c));
                if plausible {
                    let mut path = table.clone();
                    path.extend(split_key(key));
                    lines.entry(path).or_insert(line_no);
                }
            }
        }
        Self { lines }
    }

    /// The line of `path`, or of its nearest ancestor that appears in the text.
    pub fn line_of(&self, path: &[String]) -> Option<usize> {
        (1..=path.len()).rev().find_map(|n| self.lines.get(&path[..n]).copied())
    }
}

/// `[routes.retry]` after `[[routes]]` means the last element of `routes`.
fn resolve(keys: &[String], array_len: &HashMap<Vec<String>, usize>) -> Vec<String> {
    let mut out = Vec::new();
    for k in keys {
        out.push(k.clone());
        if let Some(n) = array_len.get(&out) {
            out.push(n.saturating_sub(1).to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<String> {
        s.split('/').map(str::to_owned).collect()
    }

    #[test]
    fn finds_keys_in_tables_and_arrays() {
        let text = "data_dir = \"x\"\n[plugins.noop]\npath = \"a\"\n\n[[routes]]\nname = \"a\"\n[[routes]]\nname = \"b\"\nsource = { subject = \"x\" }\n[routes.retry]\nmax_attempts = 0\n";
        let k = KeyLines::scan(text);
        assert_eq!(k.line_of(&p("data_dir")), Some(1));
        assert_eq!(k.line_of(&p("plugins/noop/path")), Some(3));
        assert_eq!(k.line_of(&p("routes/0/name")), Some(6));
        assert_eq!(k.line_of(&p("routes/1/name")), Some(8));
        assert_eq!(k.line_of(&p("routes/1/source/subject")), Some(9));
        assert_eq!(k.line_of(&p("routes/1/retry/max_attempts")), Some(11));
        assert_eq!(k.line_of(&p("routes/1/concurrency")), Some(7));
    }
}
