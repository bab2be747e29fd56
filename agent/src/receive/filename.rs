//! File names from the wire (PROTOCOL.md §8.1): checked before anything touches
//! the disk (a single name, or every name of a manifest), and the
//! collision-free names a receiver tries in turn.

use keyferry_common::manifest::Manifest;
use thiserror::Error;

/// A received file name that is refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("unacceptable file name {shown}: {why}")]
pub struct BadFileName {
    /// The name, escaped for printing.
    pub shown: String,
    /// What is wrong with it.
    pub why: &'static str,
}

const DEVICES: [&str; 22] = [
    "con", "prn", "aux", "nul", "com1", "com2", "com3", "com4", "com5", "com6", "com7", "com8",
    "com9", "lpt1", "lpt2", "lpt3", "lpt4", "lpt5", "lpt6", "lpt7", "lpt8", "lpt9",
];

/// Checks a proposed file name and returns the name to store it under: a name
/// starting with `.` gets a `_` prefix, so a sender cannot create hidden files.
///
/// Refused: empty, `.`, `..`, more than 255 bytes, any `/`, `\`, `:`, NUL or other
/// control, bidi or zero-width character, a trailing dot or space, and Windows
/// device names (`CON`, `com1.txt`, …).
pub fn check(name: &str) -> Result<String, BadFileName> {
    check_component(name)?;
    let stored = if name.starts_with('.') {
        format!("_{name}")
    } else {
        name.to_owned()
    };
    if stored.len() > MAX_NAME_BYTES {
        return Err(bad(name, "longer than 255 bytes"));
    }
    Ok(stored)
}

fn bad(name: &str, why: &'static str) -> BadFileName {
    BadFileName {
        shown: format!(
            "\"{}\"",
            keyferry_common::text::escape(&name.chars().take(80).collect::<String>())
        ),
        why,
    }
}

/// Checks a name below a top-level item (inside a received directory): the
/// rules of [`check`], but a leading dot is kept, since nothing inside a new
/// directory can hide among the user's own files.
pub fn check_component(name: &str) -> Result<(), BadFileName> {
    let refuse = |why| Err(bad(name, why));
    if name.is_empty() || name == "." || name == ".." {
        return refuse("empty or a directory name");
    }
    if name.len() > MAX_NAME_BYTES {
        return refuse("longer than 255 bytes");
    }
    if name.chars().any(|c| matches!(c, '/' | '\\' | ':')) {
        return refuse("contains a path separator or colon");
    }
    if name.chars().any(keyferry_common::text::is_dangerous) {
        return refuse("contains control or invisible characters");
    }
    if name.ends_with('.') || name.ends_with(' ') {
        return refuse("ends with a dot or space");
    }
    let stem = name
        .split('.')
        .next()
        .unwrap_or(name)
        .trim_end()
        .to_ascii_lowercase();
    if DEVICES.contains(&stem.as_str()) {
        return refuse("is a reserved device name");
    }
    Ok(())
}

/// A manifest entry's top-level item: its name in the manifest, and the
/// name it is stored under ([`check`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopLevel {
    /// The name in the manifest (and in the staging tree).
    pub name: String,
    /// The name to place it under, before collisions are resolved.
    pub stored: String,
}

/// Checks every name of a manifest (whose structure
/// [`keyferry_common::manifest::Manifest::decode`] already checked) with
/// the file-name rules; returns its top-level items in order.
pub fn check_manifest(m: &Manifest) -> Result<Vec<TopLevel>, BadFileName> {
    for e in &m.entries {
        for c in e.path.iter().skip(1) {
            check_component(c)?;
        }
    }
    m.top_level()
        .into_iter()
        .map(|name| {
            Ok(TopLevel {
                name: name.to_owned(),
                stored: check(name)?,
            })
        })
        .collect()
}

/// Longest file name accepted or produced, in bytes (the usual file-system limit).
pub const MAX_NAME_BYTES: usize = 255;

/// The longest counter a candidate carries: ` (99)`.
const COUNTER_MAX: usize = 5;

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn prefix_within(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The names to try for `name`, in order: `name`, then `stem (1).ext` …
/// `stem (99).ext`. The stem is shortened on a character boundary where
/// needed, so that every candidate fits in [`MAX_NAME_BYTES`]; if the
/// extension alone leaves no room, the whole name counts as the stem.
pub fn candidates(name: &str) -> impl Iterator<Item = String> + '_ {
    let (stem, ext) = match name.rfind('.') {
        // Keep the extension only if it leaves room for at least one
        // character of the stem (up to four bytes in UTF-8).
        Some(i) if i > 0 && name.len() - i + COUNTER_MAX + 4 <= MAX_NAME_BYTES => name.split_at(i),
        _ => (name, ""),
    };
    let stem = prefix_within(stem, MAX_NAME_BYTES - COUNTER_MAX - ext.len());
    std::iter::once(name.to_owned()).chain((1..=99).map(move |i| format!("{stem} ({i}){ext}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "../etc/passwd",
            "/etc/passwd",
            "a/b",
            "a\\b",
            "c:x",
            "a\0b",
            "a\nb",
            "x\u{202e}fdp.exe",
            "trailing.",
            "trailing ",
            "CON",
            "con.txt",
            "Lpt9.log",
            "nul",
            &"x".repeat(256),
        ] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ordinary_names_pass_and_hidden_ones_are_prefixed() {
        assert_eq!(check("report.pdf").unwrap(), "report.pdf");
        assert_eq!(check("日本語 file (2).txt").unwrap(), "日本語 file (2).txt");
        assert_eq!(check(".bashrc").unwrap(), "_.bashrc");
        assert_eq!(check("console.log").unwrap(), "console.log");
    }

    #[test]
    fn candidates_number_before_the_extension() {
        let c: Vec<String> = candidates("a.tar.gz").take(3).collect();
        assert_eq!(c, ["a.tar.gz", "a.tar (1).gz", "a.tar (2).gz"]);
        let c: Vec<String> = candidates("README").take(2).collect();
        assert_eq!(c, ["README", "README (1)"]);
        assert_eq!(candidates("x").count(), 100);
        assert_eq!(candidates("_.bashrc").nth(1).unwrap(), "_ (1).bashrc");
    }

    #[test]
    fn every_candidate_of_a_long_name_fits_and_keeps_the_extension() {
        // 250 bytes of stem plus ".pdf": the name fits, `name (99).pdf` would not.
        let long = format!("{}.pdf", "a".repeat(250));
        assert!(check(&long).is_ok());
        let all: Vec<String> = candidates(&long).collect();
        assert_eq!(all[0], long);
        assert!(all.iter().all(|c| c.len() <= MAX_NAME_BYTES), "{all:?}");
        assert!(all[1..].iter().all(|c| c.ends_with(").pdf")));
        assert_eq!(all[99], format!("{} (99).pdf", "a".repeat(246)));
        // Multi-byte characters are never cut in half.
        let wide = format!("{}.txt", "é".repeat(125));
        for c in candidates(&wide) {
            assert!(c.len() <= MAX_NAME_BYTES && check(&c).is_ok(), "{c}");
        }
        // An extension too long to keep: the whole name is the stem.
        let ext = format!("x.{}", "b".repeat(252));
        let c: Vec<String> = candidates(&ext).collect();
        assert!(c.iter().all(|n| n.len() <= MAX_NAME_BYTES));
        assert!(c[1].ends_with(" (1)"), "{}", c[1]);
        // A stem of one wide character and the longest extension kept.
        let edge = format!("é.{}", "b".repeat(245));
        let c: Vec<String> = candidates(&edge).collect();
        assert!(
            c.iter()
                .all(|n| n.len() <= MAX_NAME_BYTES && !n.starts_with(' ')),
            "{c:?}"
        );
    }

    #[test]
    fn names_with_invisible_characters_are_refused() {
        for bad in [
            "invoice\u{E0069}\u{E0078}.pdf",
            "a\u{180E}b",
            "line\u{2028}break",
            "para\u{2029}",
            "x\u{206A}y",
            "x\u{FFFB}y",
            "\u{3164}.txt",
            "a\u{115F}b",
        ] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
    }
}
