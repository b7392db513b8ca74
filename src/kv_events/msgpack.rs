//! A bounded, zero-copy MessagePack reader over one payload.
//!
//! Only what the KV-event schema needs: nil, bool, ints, floats, str, bin,
//! arrays and maps, plus skipping any value (ext included). Invariants:
//! - never reads past the slice; every read is checked and fails with
//!   [`Error::Truncated`] instead;
//! - a declared length is never trusted for allocation: callers reserve at
//!   most [`Reader::remaining`] elements (each element takes at least one
//!   byte), so an array claiming 2^32 entries in a 30-byte payload costs
//!   nothing;
//! - skipping is iterative (a count of values still to skip), so deep
//!   nesting cannot overflow the stack.

use super::error::{Error, Result};

/// A cursor over one MessagePack payload.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes not read yet: an upper bound on the elements any container can
    /// still hold.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    pub fn peek(&self) -> Result<u8> {
        self.buf.get(self.pos).copied().ok_or(Error::Truncated)
    }

    fn byte(&mut self) -> Result<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::Truncated);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn len_u8(&mut self) -> Result<usize> {
        Ok(usize::from(self.byte()?))
    }
    fn len_u16(&mut self) -> Result<usize> {
        Ok(usize::from(u16::from_be_bytes(self.be()?)))
    }
    fn len_u32(&mut self) -> Result<usize> {
        usize::try_from(u32::from_be_bytes(self.be()?)).map_err(|_| Error::Range)
    }

    /// Consumes a nil if one is next.
    pub fn nil(&mut self) -> Result<bool> {
        if self.peek()? == 0xc0 {
            self.pos += 1;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// An array header; the count is checked against the bytes left.
    pub fn array_len(&mut self) -> Result<usize> {
        let m = self.peek()?;
        let n = match m {
            0x90..=0x9f => {
                self.pos += 1;
                usize::from(m & 0x0f)
            }
            0xdc => {
                self.pos += 1;
                self.len_u16()?
            }
            0xdd => {
                self.pos += 1;
                self.len_u32()?
            }
            _ => return Err(self.type_err("array")),
        };
        if n > self.remaining() {
            return Err(Error::Truncated);
        }
        Ok(n)
    }

    /// A map header (pairs); checked against the bytes left.
    pub fn map_len(&mut self) -> Result<usize> {
        let m = self.peek()?;
        let n = match m {
            0x80..=0x8f => {
                self.pos += 1;
                usize::from(m & 0x0f)
            }
            0xde => {
                self.pos += 1;
                self.len_u16()?
            }
            0xdf => {
                self.pos += 1;
                self.len_u32()?
            }
            _ => return Err(self.type_err("map")),
        };
        if n.saturating_mul(2) > self.remaining() {
            return Err(Error::Truncated);
        }
        Ok(n)
    }

    fn type_err(&self, expected: &'static str) -> Error {
        match self.peek() {
            Ok(0xc1) => Error::Reserved,
            Ok(marker) => Error::Type { expected, marker },
            Err(e) => e,
        }
    }

    /// A str, as raw bytes (not validated as UTF-8: only compared).
    pub fn str(&mut self) -> Result<&'a [u8]> {
        let m = self.peek()?;
        let n = match m {
            0xa0..=0xbf => {
                self.pos += 1;
                usize::from(m & 0x1f)
            }
            0xd9 => {
                self.pos += 1;
                self.len_u8()?
            }
            0xda => {
                self.pos += 1;
                self.len_u16()?
            }
            0xdb => {
                self.pos += 1;
                self.len_u32()?
            }
            _ => return Err(self.type_err("str")),
        };
        self.take(n)
    }

    /// A bin.
    pub fn bin(&mut self) -> Result<&'a [u8]> {
        let m = self.peek()?;
        let n = match m {
            0xc4 => {
                self.pos += 1;
                self.len_u8()?
            }
            0xc5 => {
                self.pos += 1;
                self.len_u16()?
            }
            0xc6 => {
                self.pos += 1;
                self.len_u32()?
            }
            _ => return Err(self.type_err("bin")),
        };
        self.take(n)
    }

    /// Any integer, as i128 so every MessagePack integer fits.
    pub fn int(&mut self) -> Result<i128> {
        let m = self.peek()?;
        self.pos += 1;
        Ok(match m {
            0x00..=0x7f => i128::from(m),
            0xe0..=0xff => i128::from(m as i8),
            0xcc => i128::from(self.byte()?),
            0xcd => i128::from(u16::from_be_bytes(self.be()?)),
            0xce => i128::from(u32::from_be_bytes(self.be()?)),
            0xcf => i128::from(u64::from_be_bytes(self.be()?)),
            0xd0 => i128::from(i8::from_be_bytes(self.be()?)),
            0xd1 => i128::from(i16::from_be_bytes(self.be()?)),
            0xd2 => i128::from(i32::from_be_bytes(self.be()?)),
            0xd3 => i128::from(i64::from_be_bytes(self.be()?)),
            _ => {
                self.pos -= 1;
                return Err(self.type_err("int"));
            }
        })
    }

    /// A non-negative integer that fits `u32`.
    pub fn u32(&mut self) -> Result<u32> {
        u32::try_from(self.int()?).map_err(|_| Error::Range)
    }

    /// A float, or an integer taken as one (msgspec writes `ts` as float, a
    /// hand-rolled publisher may not).
    pub fn f64(&mut self) -> Result<f64> {
        match self.peek()? {
            0xca => {
                self.pos += 1;
                Ok(f64::from(f32::from_be_bytes(self.be()?)))
            }
            0xcb => {
                self.pos += 1;
                Ok(f64::from_be_bytes(self.be()?))
            }
            _ => self.int().map(|i| i as f64),
        }
    }

    /// The encoded bytes of the next value (consumed), to be read again
    /// later with a fresh reader or hashed as they are.
    pub fn raw(&mut self) -> Result<&'a [u8]> {
        let start = self.pos;
        self.skip()?;
        Ok(&self.buf[start..self.pos])
    }

    /// Skips one value of any type, iteratively.
    pub fn skip(&mut self) -> Result<()> {
        let mut pending: usize = 1;
        while pending > 0 {
            pending -= 1;
            let m = self.byte()?;
            let (data, children): (usize, usize) = match m {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
                0x80..=0x8f => (0, 2 * usize::from(m & 0x0f)),
                0x90..=0x9f => (0, usize::from(m & 0x0f)),
                0xa0..=0xbf => (usize::from(m & 0x1f), 0),
                0xc1 => return Err(Error::Reserved),
                0xc4 | 0xd9 => (self.len_u8()?, 0),
                0xc5 | 0xda => (self.len_u16()?, 0),
                0xc6 | 0xdb => (self.len_u32()?, 0),
                0xc7 => (self.len_u8()? + 1, 0),
                0xc8 => (self.len_u16()? + 1, 0),
                0xc9 => (self.len_u32()?.saturating_add(1), 0),
                0xca => (4, 0),
                0xcb => (8, 0),
                0xcc | 0xd0 => (1, 0),
                0xcd | 0xd1 => (2, 0),
                0xce | 0xd2 => (4, 0),
                0xcf | 0xd3 => (8, 0),
                0xd4 => (2, 0),
                0xd5 => (3, 0),
                0xd6 => (5, 0),
                0xd7 => (9, 0),
                0xd8 => (17, 0),
                0xdc => (0, self.len_u16()?),
                0xdd => (0, self.len_u32()?),
                0xde => (0, self.len_u16()?.saturating_mul(2)),
                0xdf => (0, self.len_u32()?.saturating_mul(2)),
            };
            self.take(data)?;
            pending = pending.saturating_add(children);
            if pending > self.remaining() {
                return Err(Error::Truncated);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: &rmpv::Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }

    #[test]
    fn reads_every_integer_width() {
        for v in [
            0i64,
            1,
            127,
            128,
            255,
            256,
            65535,
            65536,
            -1,
            -32,
            -33,
            -129,
            -40000,
            i64::MIN,
            i64::MAX,
        ] {
            let b = enc(&rmpv::Value::from(v));
            assert_eq!(Reader::new(&b).int().unwrap(), i128::from(v), "{v}");
            let mut r = Reader::new(&b);
            r.skip().unwrap();
            assert!(r.is_empty());
        }
        let b = enc(&rmpv::Value::from(u64::MAX));
        assert_eq!(Reader::new(&b).int().unwrap(), i128::from(u64::MAX));
    }

    #[test]
    fn lengths_beyond_the_payload_are_truncation_not_allocation() {
        // array32 claiming u32::MAX entries, then nothing.
        let b = [0xdd, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(Reader::new(&b).array_len(), Err(Error::Truncated)));
        assert!(matches!(Reader::new(&b).skip(), Err(Error::Truncated)));
        let b = [0xdb, 0xff, 0xff, 0xff, 0xff, b'a'];
        assert!(matches!(Reader::new(&b).str(), Err(Error::Truncated)));
    }

    #[test]
    fn skip_handles_deep_nesting_without_recursion() {
        let mut b = vec![0x91; 100_000];
        b.push(0xc0);
        let mut r = Reader::new(&b);
        r.skip().unwrap();
        assert!(r.is_empty());
        assert!(matches!(
            Reader::new(&b[..50]).skip(),
            Err(Error::Truncated)
        ));
    }
}
