//! Escaping of text that came from a peer before it is printed (PROTOCOL.md §8).
//!
//! C0 and C1 controls, DEL, and bidirectional or zero-width format characters are
//! shown as `\u{…}`, so a file name or message cannot move the cursor, rewrite the
//! terminal, or reorder what the user reads.

/// Whether `c` must not reach a terminal as it is.
pub fn is_dangerous(c: char) -> bool {
    c.is_control() // C0, DEL, C1
        || matches!(c,
            '\u{200B}'..='\u{200F}' // zero-width space/joiners, LRM, RLM
            | '\u{202A}'..='\u{202E}' // bidi embeddings and overrides
            | '\u{2060}'..='\u{2064}' // word joiner, invisible operators
            | '\u{2066}'..='\u{2069}' // bidi isolates
            | '\u{FEFF}' // zero-width no-break space
            | '\u{061C}' // Arabic letter mark
            | '\u{00AD}' // soft hyphen
        )
}

/// `s` with every dangerous character replaced by `\u{…}` and `\` doubled.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else if is_dangerous(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_controls_bidi_and_zero_width() {
        assert_eq!(escape("plain.txt"), "plain.txt");
        assert_eq!(escape("a\x1b[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(escape("x\u{7f}\u{85}"), "x\\u{7f}\\u{85}");
        assert_eq!(escape("evil\u{202E}txt.exe"), "evil\\u{202e}txt.exe");
        assert_eq!(escape("a\u{200B}b\u{FEFF}"), "a\\u{200b}b\\u{feff}");
        assert_eq!(escape("back\\slash"), "back\\\\slash");
        assert_eq!(escape("日本語"), "日本語");
    }
}
