//! The body serde parses, with its long strings taken out.
//!
//! serde_json checks a string's bytes eight at a time for a quote, a
//! backslash or a control byte, then validates their UTF-8; with a long
//! prompt that is most of a parse. memchr finds quotes and backslashes 32
//! bytes at a time and simdutf8 validates several times faster than
//! `str::from_utf8`, so long strings are handled here (the `parse/openai_*`
//! benches against their `_serde_only` twins; figures in bench/results/perf.md):
//!
//! 1. [`scan`] walks the body once, stepping over string contents with
//!    memchr. It checks the nesting depth (serde limits only what it
//!    deserializes, not what it skips) and lists the string values (not
//!    keys, which serde matches against field names) of at least `min_len`
//!    bytes.
//! 2. [`Skeleton::new`] decodes each listed string (escapes, UTF-8, no raw
//!    control bytes) and copies the body without their contents: the
//!    skeleton, in which each decoded string is `""`. A string it cannot
//!    decode stays in the skeleton, for serde to judge.
//! 3. serde parses the skeleton. [`BodyMap::text`] then turns each string
//!    serde borrowed from the skeleton back into the body's own bytes, and
//!    each emptied string into its decoded value.
//!
//! Invariants:
//! - Up to a body's first syntax error, the scan sees strings exactly where
//!   a JSON lexer does. A string is cut only if its whole content decoded,
//!   so every cut is one complete, valid string token, and emptying it
//!   changes no verdict: the skeleton is valid JSON exactly when the body
//!   is. serde's messages name a line and column, which only the body gets
//!   right, so callers re-parse the body itself to report an error.
//! - A skeleton offset maps to the body by adding the bytes cut before it.
//!   At a cut's own offset, a slice starting there starts before the cut and
//!   a slice ending there ends after it (an emptied string's `""` spans it).

use std::{borrow::Cow, ops::Range};

use super::ParseError;
use crate::text::closing_quote;

/// Strings shorter than this are left to serde: for them, cutting costs
/// more in bookkeeping than serde's scan does.
pub(super) const LONG_STRING: usize = 256;

/// Checks that arrays and objects nest at most `max_depth` deep, and lists
/// the content ranges of string values at least `min_len` bytes long, in
/// order.
///
/// An unterminated string ends the scan: the parser reports it.
pub(super) fn scan(
    body: &[u8],
    max_depth: usize,
    min_len: usize,
) -> Result<Vec<Range<usize>>, ParseError> {
    let mut long = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&byte) = body.get(i) {
        match byte {
            b'"' => {
                let start = i + 1;
                let Some(end) = closing_quote(body, start) else {
                    break;
                };
                // Keys stay: serde matches them against field names.
                if end - start >= min_len && !is_key(body.get(end + 1..).unwrap_or_default()) {
                    long.push(start..end);
                }
                i = end + 1;
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(ParseError::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(long)
}

/// True if what follows a string makes it an object key.
fn is_key(after: &[u8]) -> bool {
    after.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b':')
}

/// The skeleton's bytes and the way back from them to the body.
pub(super) struct Skeleton<'b> {
    text: Cow<'b, [u8]>,
    body: &'b [u8],
    cuts: Vec<Cut<'b>>,
}

/// One emptied string.
struct Cut<'b> {
    /// Skeleton offset where the string's content was (between its quotes).
    at: usize,
    /// Bytes cut from the body up to and including this cut.
    cut_through: usize,
    /// The decoded content; taken when serde hands the empty string back.
    value: Cow<'b, str>,
}

impl<'b> Skeleton<'b> {
    /// Cuts every string in `long` (content ranges from [`scan`], in order)
    /// that decodes. Without any, the skeleton is the body itself.
    pub fn new(body: &'b [u8], long: &[Range<usize>]) -> Self {
        let mut cuts = Vec::new();
        let mut text = Vec::new();
        let mut copied = 0;
        let mut cut = 0;
        for range in long {
            let (Some(kept), Some(content)) =
                (body.get(copied..range.start), body.get(range.clone()))
            else {
                continue;
            };
            let Some(value) = decode(content) else {
                continue;
            };
            if cuts.is_empty() {
                let long_bytes: usize = long.iter().map(|r| r.len()).sum();
                text.reserve(body.len().saturating_sub(long_bytes));
            }
            text.extend_from_slice(kept);
            cut += content.len();
            cuts.push(Cut {
                at: text.len(),
                cut_through: cut,
                value,
            });
            copied = range.end;
        }
        if cuts.is_empty() {
            return Self::verbatim(body);
        }
        text.extend_from_slice(body.get(copied..).unwrap_or_default());
        Self {
            text: Cow::Owned(text),
            body,
            cuts,
        }
    }

    /// The body as it is, nothing cut.
    pub fn verbatim(body: &'b [u8]) -> Self {
        Self {
            text: Cow::Borrowed(body),
            body,
            cuts: Vec::new(),
        }
    }

    pub fn is_verbatim(&self) -> bool {
        self.cuts.is_empty()
    }

    /// Splits into the bytes for serde and the map that resolves what serde
    /// borrows from them.
    pub fn into_parts(self) -> (Cow<'b, [u8]>, BodyMap<'b>) {
        let map = BodyMap {
            body: self.body,
            base: self.text.as_ptr() as usize,
            len: self.text.len(),
            cuts: self.cuts,
        };
        (self.text, map)
    }
}

/// Resolves slices of a skeleton's bytes to the body they came from.
pub(super) struct BodyMap<'b> {
    body: &'b [u8],
    /// Address and length of the skeleton's bytes (they do not move when the
    /// skeleton is split), to compute offsets from the slices serde returns.
    base: usize,
    len: usize,
    cuts: Vec<Cut<'b>>,
}

impl<'b> BodyMap<'b> {
    /// The body's version of a string serde produced from the skeleton: an
    /// emptied string's decoded value, the same bytes of the body for any
    /// other borrowed slice, an owned (unescaped) string unchanged.
    pub fn text(&mut self, s: Cow<'_, str>) -> Result<Cow<'b, str>, ParseError> {
        let s = match s {
            Cow::Owned(s) => return Ok(Cow::Owned(s)),
            Cow::Borrowed(s) => s,
        };
        let start = (s.as_ptr() as usize).wrapping_sub(self.base);
        if start > self.len || s.len() > self.len - start {
            // Not from the skeleton (nothing the parser returns is, but a
            // copy keeps this correct should that change).
            return Ok(Cow::Owned(s.to_owned()));
        }
        if s.is_empty() {
            return Ok(match self.cuts.binary_search_by_key(&start, |c| c.at) {
                Ok(i) => self
                    .cuts
                    .get_mut(i)
                    .map_or(Cow::Borrowed(""), |c| std::mem::take(&mut c.value)),
                Err(_) => Cow::Borrowed(""),
            });
        }
        let bytes = self
            .body
            .get(self.span(start..start + s.len()))
            .ok_or_else(|| mapping_error("a slice maps outside the body"))?;
        // A range spanning a cut holds bytes serde never saw; they were
        // validated when decoded, and checking again is cheap next to the
        // scan that was saved.
        simdutf8::basic::from_utf8(bytes)
            .map(Cow::Borrowed)
            .map_err(|_| mapping_error("invalid UTF-8"))
    }

    /// The body range a skeleton range came from.
    pub fn span(&self, range: Range<usize>) -> Range<usize> {
        let cut_before = |pos: usize, inclusive: bool| {
            let n = self
                .cuts
                .partition_point(|c| c.at < pos || (inclusive && c.at == pos));
            n.checked_sub(1)
                .and_then(|i| self.cuts.get(i))
                .map_or(0, |c| c.cut_through)
        };
        range.start + cut_before(range.start, false)..range.end + cut_before(range.end, true)
    }
}

fn mapping_error(what: &str) -> ParseError {
    ParseError::InvalidJson(format!("request body could not be mapped back: {what}"))
}

/// The value of a JSON string's content (the bytes between its quotes), or
/// `None` if it is not valid: serde then judges it, with its own message.
fn decode(content: &[u8]) -> Option<Cow<'_, str>> {
    if has_control_byte(content) {
        return None;
    }
    // Escapes are ASCII, so valid UTF-8 here means every unescaped run is.
    let text = simdutf8::basic::from_utf8(content).ok()?;
    let Some(mut escape) = memchr::memchr(b'\\', content) else {
        return Some(Cow::Borrowed(text));
    };
    let mut out = String::with_capacity(content.len());
    let mut done = 0;
    loop {
        out.push_str(text.get(done..escape)?);
        let (ch, len) = unescape(content.get(escape + 1..)?)?;
        out.push(ch);
        done = escape + 1 + len;
        match memchr::memchr(b'\\', content.get(done..)?) {
            Some(off) => escape = done + off,
            None => {
                out.push_str(text.get(done..)?);
                return Some(Cow::Owned(out));
            }
        }
    }
}

/// One escape, from the byte after its backslash: the character and how
/// many bytes it took. Lone surrogates are refused, as serde refuses them
/// for strings it returns.
fn unescape(s: &[u8]) -> Option<(char, usize)> {
    let ch = match *s.first()? {
        b'"' => '"',
        b'\\' => '\\',
        b'/' => '/',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        b'u' => {
            let high = hex4(s.get(1..5)?)?;
            if !(0xD800..0xDC00).contains(&high) {
                // A low surrogate alone is not a char: `from_u32` refuses it.
                return Some((char::from_u32(high)?, 5));
            }
            if s.get(5..7)? != b"\\u" {
                return None;
            }
            let low = hex4(s.get(7..11)?)?;
            if !(0xDC00..0xE000).contains(&low) {
                return None;
            }
            let code = 0x1_0000 + ((high - 0xD800) << 10) + (low - 0xDC00);
            return Some((char::from_u32(code)?, 11));
        }
        _ => return None,
    };
    Some((ch, 1))
}

fn hex4(digits: &[u8]) -> Option<u32> {
    digits
        .iter()
        .try_fold(0u32, |acc, &d| Some(acc << 4 | char::from(d).to_digit(16)?))
}

/// True if any byte is below 0x20, which JSON strings may not hold raw.
/// Folding fixed 64-byte chunks with `min` lets the compiler vectorise it.
fn has_control_byte(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(64);
    let found = chunks.any(|c| c.iter().fold(u8::MAX, |m, &b| m.min(b)) < 0x20);
    found || chunks.remainder().iter().any(|&b| b < 0x20)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Random string contents as a client might encode them: text, every
    /// escape, surrogate pairs and, unless `valid`, now and then something
    /// serde refuses.
    pub(in crate::request) fn random_content(rng: &mut fastrand::Rng, valid: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..rng.usize(0..40) {
            match rng.u8(0..if valid { 7 } else { 12 }) {
                0 => out.extend_from_slice(br#"\n"#),
                1 => out.extend_from_slice(br#"\"\\\/\b\f\r\t"#),
                2 => out
                    .extend_from_slice(format!("\\u{:04x}", rng.u32(0xe000..0x1_0000)).as_bytes()),
                3 => out.extend_from_slice(br#"\ud83d\ude00"#),
                4 => out.extend_from_slice("é€😀".as_bytes()),
                5 | 6 => {
                    let n = rng.usize(1..100);
                    out.extend(
                        (0..n)
                            .map(|_| rng.u8(b' '..=b'~'))
                            .filter(|&b| b != b'\\' && b != b'"'),
                    );
                }
                // Maybe invalid UTF-8 or a control byte; never a bare quote,
                // which the scan would have taken as the string's end.
                7 => out.extend(Some(rng.u8(..)).filter(|&b| b != b'"')),
                // Any code unit, lone surrogates included.
                8 => out.extend_from_slice(format!("\\u{:04x}", rng.u32(0..0x1_0000)).as_bytes()),
                9 => out.extend_from_slice(br#"\uD83D"#),
                10 => out.extend_from_slice(br#"\x"#),
                _ => out.extend_from_slice(br#"\u12G4"#),
            }
        }
        out
    }

    #[test]
    fn decode_agrees_with_serde() {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let mut decoded = 0;
        for _ in 0..20_000 {
            let content = random_content(&mut rng, false);
            let mut quoted = Vec::with_capacity(content.len() + 2);
            quoted.push(b'"');
            quoted.extend_from_slice(&content);
            quoted.push(b'"');
            let ours = decode(&content);
            let theirs = serde_json::from_slice::<String>(&quoted).ok();
            // A string we leave alone is one serde must refuse too, else
            // long strings of that kind would silently take the slow path.
            assert_eq!(
                ours.as_deref(),
                theirs.as_deref(),
                "{}",
                String::from_utf8_lossy(&content)
            );
            decoded += usize::from(ours.is_some());
        }
        assert!(decoded > 1_000, "only {decoded} valid contents generated");
    }

    #[test]
    fn strings_without_escapes_borrow() {
        assert!(matches!(
            decode(b"plain text"),
            Some(Cow::Borrowed("plain text"))
        ));
        assert!(matches!(decode(br#"a\nb"#), Some(Cow::Owned(s)) if s == "a\nb"));
        assert_eq!(decode(b"tab\there"), None);
        assert_eq!(decode(&[b'a', 0xff]), None);
    }

    #[test]
    fn control_bytes_found_in_chunks_and_remainder() {
        for len in [0usize, 1, 63, 64, 65, 200] {
            let clean = vec![b'x'; len];
            assert!(!has_control_byte(&clean));
            for pos in 0..len {
                let mut dirty = clean.clone();
                dirty[pos] = 0x1f;
                assert!(has_control_byte(&dirty), "len {len} pos {pos}");
            }
        }
    }

    #[test]
    fn scan_checks_depth_and_lists_long_strings() {
        assert!(scan(br#"{"a":"[[[[[[[[[[","b":"\\\"[[["}"#, 2, 100).is_ok());
        assert_eq!(scan(br#"{"a":[[1]]}"#, 2, 100), Err(ParseError::TooDeep));
        assert!(scan(br#"{"a":[[1]]}"#, 3, 100).is_ok());
        let body = br#"{"k":"abc","long" :"x\"yz","e":"", "arr":["four"]}"#;
        let found = scan(body, 8, 3).unwrap();
        let texts: Vec<&[u8]> = found.iter().map(|r| &body[r.clone()]).collect();
        assert_eq!(texts, [&b"abc"[..], br#"x\"yz"#, b"four"]);
        // Unterminated, or ending in a backslash: the scan stops, no panic.
        assert_eq!(
            scan(br#"{"a":"abc"#, 8, 2).unwrap(),
            Vec::<Range<usize>>::new()
        );
        assert!(scan(b"{\"a\":\"\\", 8, 0).is_ok());
    }

    #[test]
    fn spans_and_strings_map_back_to_the_body() {
        let body = br#"{"a":"0123456789","b":["xy","0123456789"],"c":"q"}"#;
        let long = scan(body, 8, 5).unwrap();
        let skeleton = Skeleton::new(body, &long);
        assert!(!skeleton.is_verbatim());
        let (text, mut map) = skeleton.into_parts();
        assert_eq!(&*text, br#"{"a":"","b":["xy",""],"c":"q"}"#);
        let text = std::str::from_utf8(&text).unwrap();

        // An emptied string resolves to its value, once.
        let at = text.find(r#""","b""#).unwrap() + 1;
        assert_eq!(
            map.text(Cow::Borrowed(&text[at..at])).unwrap(),
            "0123456789"
        );
        // A short string maps to the body's bytes.
        let xy = text.find("xy").unwrap();
        let r = map.text(Cow::Borrowed(&text[xy..xy + 2])).unwrap();
        assert!(matches!(r, Cow::Borrowed("xy")));
        // A raw value spanning a cut maps to the whole original.
        let arr = text.find('[').unwrap()..text.find(']').unwrap() + 1;
        let r = map.text(Cow::Borrowed(&text[arr.clone()])).unwrap();
        assert_eq!(r, r#"["xy","0123456789"]"#);
        assert_eq!(&body[map.span(arr)], br#"["xy","0123456789"]"#);
        // After the cuts, offsets shift by everything cut.
        let q = text.rfind('q').unwrap();
        assert_eq!(&body[map.span(q..q + 1)], b"q");
        // A string from elsewhere is copied, not mis-mapped.
        assert_eq!(map.text(Cow::Borrowed("other")).unwrap(), "other");
    }

    #[test]
    fn undecodable_strings_stay_for_serde() {
        let body = b"{\"a\":\"0123456789\\x\",\"b\":\"0123456789\"}";
        let long = scan(body, 8, 5).unwrap();
        let (text, _) = Skeleton::new(body, &long).into_parts();
        assert_eq!(&*text, b"{\"a\":\"0123456789\\x\",\"b\":\"\"}");
    }
}
