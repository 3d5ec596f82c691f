//! Which toolchain built a component, for the status page and `invoke`:
//! read from the marks each one leaves in the binary (a `producers`
//! section entry, a runtime library's name). A guess for display only;
//! nothing depends on it.

/// The source language of a component: `rust`, `python`, `javascript` or
/// `unknown`.
pub fn detect(bytes: &[u8]) -> &'static str {
    // Checked in this order: the Python and JavaScript runtimes are
    // themselves partly written in Rust.
    const MARKS: [(&[u8], &str); 3] = [
        (b"ComponentizeJS", "javascript"),
        (b"libcomponentize_py_runtime", "python"),
        (b"wit-bindgen-rust", "rust"),
    ];
    MARKS
        .iter()
        .find(|(mark, _)| contains(bytes, mark))
        .map_or("unknown", |(_, language)| language)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_found_anywhere_and_javascript_wins_over_rust() {
        assert_eq!(detect(b"\0asm..wit-bindgen-rust.."), "rust");
        assert_eq!(detect(b"xx libcomponentize_py_runtime.so wit-bindgen-rust"), "python");
        assert_eq!(detect(b"wit-bindgen-rust ComponentizeJS"), "javascript");
        assert_eq!(detect(b""), "unknown");
        assert_eq!(detect(b"ComponentizeJ"), "unknown");
    }
}
