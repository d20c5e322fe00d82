//! The chunked transfer coding of an upstream response body (RFC 9112 §7.1), decoded in place from
//! the connection's read buffer: framing bytes are consumed here, chunk data is left at the front
//! of the buffer for the body to split off without copying.

use bytes::{Buf, BytesMut};
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

use super::Malformed;

/// Longest chunk-size line (size, extensions, CRLF) accepted.
const MAX_SIZE_LINE: usize = 4096;
/// Largest trailer section accepted.
const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// Most trailer fields accepted.
const MAX_TRAILERS: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// Where the decoder stands after consuming what framing it could.
#[derive(Debug)]
pub enum Step {
    /// This many bytes of chunk data are at the front of the buffer; report them with
    /// [`Decoder::consumed`] once split off.
    Data(usize),
    /// The buffer ends inside framing: read more.
    NeedMore,
    /// The last chunk and a non-empty trailer section.
    Trailers(HeaderMap),
    /// The last chunk and an empty trailer section: the body is complete.
    End,
}

#[derive(Debug)]
pub struct Decoder {
    state: State,
}

impl Decoder {
    pub fn new() -> Self {
        Decoder { state: State::Size }
    }

    /// Consumes framing from the front of `buf` until data, the end, or a partial element.
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Step, Malformed> {
        loop {
            match self.state {
                State::Size => {
                    let window = &buf[..buf.len().min(MAX_SIZE_LINE)];
                    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
                        return if buf.len() >= MAX_SIZE_LINE {
                            Err(Malformed("chunk size line too long"))
                        } else {
                            Ok(Step::NeedMore)
                        };
                    };
                    let line = window[..lf]
                        .strip_suffix(b"\r")
                        .ok_or(Malformed("chunk size line without CRLF"))?;
                    let size = chunk_size(line)?;
                    buf.advance(lf + 1);
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::Data(size)
                    };
                }
                State::Data(0) => self.state = State::DataEnd,
                State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    return Ok(Step::Data(n));
                }
                State::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Malformed("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = State::Size;
                }
                State::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.state = State::Done;
                        return Ok(Step::End);
                    }
                    let window = &buf[..buf.len().min(MAX_TRAILER_BYTES)];
                    let Some(end) = window.windows(4).position(|w| w == b"\r\n\r\n") else {
                        return if buf.len() >= MAX_TRAILER_BYTES {
                            Err(Malformed("trailer section too large"))
                        } else {
                            Ok(Step::NeedMore)
                        };
                    };
                    let trailers = trailers(&window[..end + 4])?;
                    buf.advance(end + 4);
                    self.state = State::Done;
                    return Ok(if trailers.is_empty() {
                        Step::End
                    } else {
                        Step::Trailers(trailers)
                    });
                }
                State::Done => return Ok(Step::End),
            }
        }
    }

    /// After a chunk's last data byte was taken: consumes the framing that ends the body when it
    /// is already buffered in its usual form (CRLF, `0`, empty trailer section). True if it ended.
    pub fn try_finish(&mut self, buf: &mut BytesMut) -> bool {
        const END: &[u8] = b"\r\n0\r\n\r\n";
        if self.state == State::Data(0) && buf.starts_with(END) {
            buf.advance(END.len());
            self.state = State::Done;
            return true;
        }
        false
    }

    /// `n` bytes of the data announced by [`Step::Data`] were taken from the buffer.
    pub fn consumed(&mut self, n: usize) {
        if let State::Data(left) = &mut self.state {
            *left = left.saturating_sub(n as u64);
        }
    }
}

/// The hexadecimal size of a chunk-size line (extensions and whitespace before them ignored).
fn chunk_size(line: &[u8]) -> Result<u64, Malformed> {
    let digits_end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (digits, rest) = line.split_at(digits_end);
    if digits.is_empty() || digits.len() > 16 {
        return Err(Malformed("bad chunk size"));
    }
    let rest = rest.trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return Err(Malformed("bad chunk size"));
    }
    let mut size = 0u64;
    for &d in digits {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => d - b'A' + 10,
        };
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(v)))
            .ok_or(Malformed("chunk size overflows"))?;
    }
    Ok(size)
}

fn trailers(section: &[u8]) -> Result<HeaderMap, Malformed> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILERS];
    let parsed = match httparse::parse_headers(section, &mut fields) {
        Ok(httparse::Status::Complete((_, parsed))) => parsed,
        _ => return Err(Malformed("bad trailer section")),
    };
    let mut map = HeaderMap::with_capacity(parsed.len());
    for f in parsed {
        let name =
            HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| Malformed("bad trailer"))?;
        let value = HeaderValue::from_bytes(f.value).map_err(|_| Malformed("bad trailer"))?;
        map.append(name, value);
    }
    Ok(map)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Decodes `wire` fed in pieces of `piece` bytes; returns the data and trailers.
    fn decode(wire: &[u8], piece: usize) -> Result<(Vec<u8>, Option<HeaderMap>), Malformed> {
        let mut d = Decoder::new();
        let mut buf = BytesMut::new();
        let mut input = wire.chunks(piece);
        let mut data = Vec::new();
        loop {
            match d.step(&mut buf)? {
                Step::Data(n) => {
                    data.extend_from_slice(&buf.split_to(n));
                    d.consumed(n);
                }
                Step::NeedMore => match input.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => return Err(Malformed("truncated")),
                },
                Step::Trailers(t) => return Ok((data, Some(t))),
                Step::End => return Ok((data, None)),
            }
        }
    }

    #[test]
    fn decodes_chunks_fed_byte_by_byte_and_whole() {
        let wire = b"5\r\nhello\r\n1;name=v\r\n \r\nA \r\n0123456789\r\n0\r\n\r\n";
        for piece in [1, 2, 3, 7, wire.len()] {
            let (data, trailers) = decode(wire, piece).unwrap();
            assert_eq!(data, b"hello 0123456789");
            assert!(trailers.is_none());
        }
    }

    #[test]
    fn trailers_are_returned() {
        let wire = b"2\r\nhi\r\n0\r\ngrpc-status: 0\r\nx-sum: ab\r\n\r\n";
        let (data, trailers) = decode(wire, 3).unwrap();
        assert_eq!(data, b"hi");
        let t = trailers.unwrap();
        assert_eq!(t["grpc-status"], "0");
        assert_eq!(t["x-sum"], "ab");
    }

    #[test]
    fn malformed_framing_is_an_error() {
        for wire in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"ffffffffffffffff0\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"0\r\nbad trailer\r\n\r\n",
        ] {
            assert!(
                decode(wire, 4).is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let long = vec![b'1'; MAX_SIZE_LINE + 1];
        assert!(decode(&long, 512).is_err());
    }
}
