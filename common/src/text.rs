//! Escaping of text that came from a peer before it is printed (PROTOCOL.md §8).
//!
//! C0 and C1 controls, DEL, every format character (Unicode general category
//! Cf: bidi controls, zero-width characters, the invisible TAG characters …),
//! the line and paragraph separators (Zl, Zp) and the Hangul fillers are shown
//! as `\u{…}`, so a file name or message cannot move the cursor, rewrite the
//! terminal, hide part of itself, or reorder what the user reads. File names
//! containing any of them are refused outright ([`crate::filename`]).

/// Every character of general category Cf (Unicode 15.1), plus Zl (U+2028)
/// and Zp (U+2029), which sit inside the Cf run U+2028–U+202E. Generated from
/// the Unicode Character Database (Python's `unicodedata`, 14.0) with the 15.0
/// additions U+13439–U+1343F.
const FORMAT_AND_SEPARATORS: &[(u32, u32)] = &[
    (0x00AD, 0x00AD),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x2028, 0x202E),
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
];

/// Letters that render as nothing: the Hangul fillers.
const FILLERS: [char; 4] = ['\u{115F}', '\u{1160}', '\u{3164}', '\u{FFA0}'];

/// Whether `c` must not reach a terminal as it is.
pub fn is_dangerous(c: char) -> bool {
    let cp = u32::from(c);
    c.is_control() // C0, DEL, C1
        || FILLERS.contains(&c)
        || FORMAT_AND_SEPARATORS
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&cp))
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

    #[test]
    fn escapes_tags_separators_fillers_and_the_rest_of_cf() {
        // `invoice<TAG i><TAG x>.pdf` shows as `invoice.pdf` on a terminal.
        assert_eq!(
            escape("invoice\u{E0069}\u{E0078}.pdf"),
            "invoice\\u{e0069}\\u{e0078}.pdf"
        );
        for c in [
            '\u{E0001}',
            '\u{E007F}',
            '\u{180E}',
            '\u{2028}',
            '\u{2029}',
            '\u{206A}',
            '\u{206F}',
            '\u{FFF9}',
            '\u{FFFB}',
            '\u{115F}',
            '\u{1160}',
            '\u{3164}',
            '\u{FFA0}',
            '\u{0600}',
            '\u{13439}',
            '\u{1D173}',
        ] {
            assert!(is_dangerous(c), "U+{:04X}", u32::from(c));
            assert_eq!(escape(&c.to_string()), format!("\\u{{{:x}}}", u32::from(c)));
        }
        // Neighbours that are ordinary characters stay as they are.
        for c in ['\u{2030}', '\u{3163}', '\u{FFA1}', '\u{E0080}', 'é', 'ß'] {
            assert!(!is_dangerous(c), "U+{:04X}", u32::from(c));
        }
    }
}
