//! A hand-written equivalent of the GPT-2-family split regexes Qwen2/Qwen3
//! and Llama-3 put in their `Split` pre-tokenizer:
//!
//! ```text
//! (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,D}
//!   | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//! ```
//!
//! with D = 1 (Qwen) or 3 (Llama-3). Oniguruma (the library's engine)
//! takes the first alternative that matches at the leftmost position, and
//! every character is matched by some alternative, so the text splits into
//! consecutive pieces; [`Splitter::piece_end`] decides each piece from the
//! character classes of its first few characters, alternative by
//! alternative:
//! 1. `'` followed by a contraction, letters case-folded as Oniguruma folds
//!    them (`ſ` matches `s`);
//! 2. a letter run, with one leading character that is neither a letter, a
//!    digit nor `\r`/`\n`;
//! 3. up to D digits;
//! 4. an optional space, a run of "other" characters (neither whitespace,
//!    letters nor digits), then any `\r`/`\n`;
//! 5. whitespace through the last `\r`/`\n` of the whitespace run;
//! 6. a whitespace run without newlines: whole at the end of the text,
//!    else all but its last character (which then leads the next piece),
//!    unless it is a single character, which alternative 7 takes alone.
//!
//! Character classes (`\p{L}`, `\p{N}`, `\s`, the case folds) come from
//! regex-syntax's Unicode tables, built once per process into a two-level
//! lookup table; a test checks them against Oniguruma on every code point.

use std::{collections::HashMap, sync::OnceLock};

use regex_syntax::hir::{Class, HirKind};

pub(crate) const LETTER: u8 = 1;
pub(crate) const NUMBER: u8 = 2;
pub(crate) const SPACE: u8 = 4;
/// `\r` or `\n` (also SPACE).
pub(crate) const NEWLINE: u8 = 8;

/// Code points per block of the two-level table.
const BLOCK: usize = 256;
const BLOCKS: usize = 0x11_0000 / BLOCK;

/// The character-class table: `blocks[index[cp / 256]][cp % 256]`, blocks
/// deduplicated (most of the code space shares a few blocks).
#[derive(Debug)]
pub(crate) struct Classes {
    index: Box<[u16]>,
    blocks: Box<[[u8; BLOCK]]>,
    /// Non-ASCII characters that case-fold to an ASCII letter of a
    /// contraction (`ſ` -> `s`), with that letter.
    folds: Box<[(char, u8)]>,
}

impl Classes {
    /// The process-wide table; None if regex-syntax lacks the Unicode
    /// classes (it never should: the features are enabled).
    pub(crate) fn get() -> Option<&'static Classes> {
        static CLASSES: OnceLock<Option<Classes>> = OnceLock::new();
        CLASSES.get_or_init(Classes::build).as_ref()
    }

    fn build() -> Option<Self> {
        let mut flat = vec![0u8; 0x11_0000];
        for (pattern, bit) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
            for (lo, hi) in ranges(pattern)? {
                for c in &mut flat[lo as usize..=hi as usize] {
                    *c |= bit;
                }
            }
        }
        flat[usize::from(b'\r')] |= NEWLINE;
        flat[usize::from(b'\n')] |= NEWLINE;
        let mut blocks: Vec<[u8; BLOCK]> = Vec::new();
        let mut seen: HashMap<&[u8], u16> = HashMap::new();
        let mut index = Vec::with_capacity(BLOCKS);
        for chunk in flat.chunks_exact(BLOCK) {
            let at = match seen.get(chunk) {
                Some(&at) => at,
                None => {
                    let at = u16::try_from(blocks.len()).ok()?;
                    let mut b = [0u8; BLOCK];
                    b.copy_from_slice(chunk);
                    blocks.push(b);
                    seen.insert(chunk, at);
                    at
                }
            };
            index.push(at);
        }
        let mut folds = Vec::new();
        for letter in "strevmld".bytes() {
            let pattern = format!("(?i:{})", char::from(letter));
            for (lo, hi) in ranges(&pattern)? {
                for cp in lo..=hi {
                    if let Some(c) = char::from_u32(cp).filter(|c| !c.is_ascii()) {
                        folds.push((c, letter));
                    }
                }
            }
        }
        Some(Self {
            index: index.into(),
            blocks: blocks.into(),
            folds: folds.into(),
        })
    }

    #[inline]
    pub(crate) fn of(&self, c: char) -> u8 {
        let cp = c as usize;
        let block = self.index.get(cp / BLOCK).copied().unwrap_or(0);
        self.blocks
            .get(usize::from(block))
            .map_or(0, |b| b[cp % BLOCK])
    }

    /// Whether `c` matches the ASCII lower-case `letter` case-insensitively.
    #[inline]
    pub(crate) fn folds_to(&self, c: char, letter: u8) -> bool {
        if c.is_ascii() {
            c.to_ascii_lowercase() as u32 == u32::from(letter)
        } else {
            self.folds.iter().any(|&(f, l)| f == c && l == letter)
        }
    }
}

/// The code point ranges of a one-class pattern.
fn ranges(pattern: &str) -> Option<Vec<(u32, u32)>> {
    let hir = regex_syntax::parse(pattern).ok()?;
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => Some(
            c.ranges()
                .iter()
                .map(|r| (r.start() as u32, r.end() as u32))
                .collect(),
        ),
        _ => None,
    }
}

/// The split pattern, parameterised by the longest digit run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Splitter {
    classes: &'static Classes,
    max_digits: usize,
}

/// The contractions of alternative 1, lower case, without the apostrophe.
const CONTRACTIONS: [&[u8]; 7] = [b"s", b"t", b"re", b"ve", b"m", b"ll", b"d"];

impl Splitter {
    pub(crate) fn new(classes: &'static Classes, max_digits: usize) -> Self {
        Self {
            classes,
            max_digits,
        }
    }

    /// Calls `f` with each piece of `text`, in order.
    #[inline]
    pub(crate) fn for_each_piece(&self, text: &str, mut f: impl FnMut(&str)) {
        let mut at = 0;
        while at < text.len() {
            let end = self.piece_end(text, at);
            f(&text[at..end]);
            at = end;
        }
    }

    /// The end of the piece starting at byte `i` (< text.len(), on a char
    /// boundary); always > i.
    pub(crate) fn piece_end(&self, text: &str, i: usize) -> usize {
        let rest = &text[i..];
        let mut chars = rest.chars();
        let Some(c) = chars.next() else {
            return text.len();
        };
        let after_c = i + c.len_utf8();
        let class = self.classes.of(c);
        // 1. Contractions.
        if c == '\''
            && let Some(end) = self.contraction(text, after_c)
        {
            return end;
        }
        // 2. An optional non-letter, non-digit, non-newline, then letters.
        if class & LETTER != 0 {
            return self.skip(text, after_c, |k| k & LETTER != 0);
        }
        if class & (NUMBER | NEWLINE) == 0
            && let Some(next) = chars.next()
            && self.classes.of(next) & LETTER != 0
        {
            return self.skip(text, after_c + next.len_utf8(), |k| k & LETTER != 0);
        }
        // 3. Digits.
        if class & NUMBER != 0 {
            let mut end = after_c;
            for d in text[after_c..].chars().take(self.max_digits - 1) {
                if self.classes.of(d) & NUMBER == 0 {
                    break;
                }
                end += d.len_utf8();
            }
            return end;
        }
        // 4. An optional space, "other" characters, then newlines.
        let other = |k: u8| k & (LETTER | NUMBER | SPACE) == 0;
        let start = if c == ' ' { after_c } else { i };
        if let Some(first) = text[start..].chars().next()
            && other(self.classes.of(first))
        {
            let end = self.skip(text, start + first.len_utf8(), other);
            return self.skip(text, end, |k| k & NEWLINE != 0);
        }
        // 5-7. `c` is whitespace: scan its run.
        let mut end = i;
        let mut last_newline_end = None;
        let mut last_start = i;
        let mut count = 0usize;
        for w in text[i..].chars() {
            let k = self.classes.of(w);
            if k & SPACE == 0 {
                break;
            }
            last_start = end;
            end += w.len_utf8();
            count += 1;
            if k & NEWLINE != 0 {
                last_newline_end = Some(end);
            }
        }
        if let Some(e) = last_newline_end {
            return e;
        }
        if end == i {
            // Not whitespace after all: cannot happen when the classes are
            // consistent; take the character alone so progress is made.
            return after_c;
        }
        if end == text.len() || count == 1 {
            end
        } else {
            last_start
        }
    }

    /// The end of `'` + a contraction whose letters start at `at`, if any.
    fn contraction(&self, text: &str, at: usize) -> Option<usize> {
        'next: for word in CONTRACTIONS {
            let mut end = at;
            let mut chars = text[at..].chars();
            for &letter in word {
                match chars.next() {
                    Some(c) if self.classes.folds_to(c, letter) => end += c.len_utf8(),
                    _ => continue 'next,
                }
            }
            return Some(end);
        }
        None
    }

    /// The end of the run of characters from `at` whose class passes `keep`.
    #[inline]
    fn skip(&self, text: &str, at: usize, keep: impl Fn(u8) -> bool) -> usize {
        let mut end = at;
        for c in text[at..].chars() {
            if !keep(self.classes.of(c)) {
                break;
            }
            end += c.len_utf8();
        }
        end
    }
}
