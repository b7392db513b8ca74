//! Byte-level scanning shared by the two text parsers: request bodies
//! (JSON, `request::skeleton`) and metrics pages (Prometheus label values,
//! `scrape::parse`). Both quote strings the same way: a backslash escapes
//! the byte after it.

/// Index of the quote that closes a string whose content starts at `i`
/// (just after its opening quote), or `None` if it is unterminated.
///
/// Searching for quotes alone and then counting the backslashes before one
/// (an odd count escapes it) stops once per escaped quote rather than once
/// per escape: text with a `\n` on every line costs one search, not one per
/// line. The count stops at the opening quote at the latest.
pub fn closing_quote(text: &[u8], mut i: usize) -> Option<usize> {
    loop {
        // `i` passes the end when the text ends in a backslash.
        let quote = i + memchr::memchr(b'"', text.get(i..)?)?;
        let before = text.get(..quote).unwrap_or_default();
        let backslashes = before.iter().rev().take_while(|&&b| b == b'\\').count();
        if backslashes % 2 == 0 {
            return Some(quote);
        }
        i = quote + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closing_quote_agrees_with_a_forward_scan() {
        fn forward(text: &[u8], mut i: usize) -> Option<usize> {
            while let Some(&b) = text.get(i) {
                match b {
                    b'\\' => i += 2,
                    b'"' => return Some(i),
                    _ => i += 1,
                }
            }
            None
        }
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..20_000 {
            // Content starts after an opening quote, as in a real body.
            let mut text = vec![b'"'];
            text.extend((0..rng.usize(0..24)).map(|_| [b'"', b'\\', b'a'][rng.usize(0..3)]));
            let shown = String::from_utf8_lossy(&text);
            assert_eq!(closing_quote(&text, 1), forward(&text, 1), "{shown}");
        }
    }
}
