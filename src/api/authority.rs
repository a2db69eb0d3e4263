//! The `:authority` some gRPC clients send over a Unix socket, made acceptable to the HTTP/2
//! server.
//!
//! Owns: rewriting the client-to-server HTTP/2 byte stream of a Unix-socket connection whose
//! requests carry an `:authority` the `h2` crate refuses. gRPC C-core (Python's grpcio, so
//! py-spiffe; C++, so c-spiffe; Ruby) sends the %-encoded socket path, grpc-java the raw path.
//! `h2` parses the value as a URI authority, refuses both, and resets every such stream with
//! PROTOCOL_ERROR, so those SPIFFE clients could not use the Workload API at all (hyperium/h2
//! PR #487 is still open). gRPC itself ignores `:authority` on a Unix socket.
//!
//! The first complete header block of a connection decides. If its `:authority` parses (Go,
//! Rust and most clients send `localhost` or a host name) or is absent, the connection is
//! passed through untouched from then on. Otherwise every header block the client sends is
//! decoded with a decoder that follows the client's HPACK state and sent on re-encoded as
//! literals that never enter the server's dynamic table (so its table stays empty and in
//! step), with `:authority: localhost`. Frames other than HEADERS and CONTINUATION pass
//! through as they are. Anything malformed in the first block is passed through for the
//! server to refuse; after the switch, it closes the connection, since the server's HPACK
//! state could no longer follow the client's.

use std::io;

use loona_hpack::Decoder;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// SETTINGS_MAX_FRAME_SIZE's initial value (RFC 9113 §6.5.2), which the server keeps: larger
/// frames are refused by it anyway, and re-encoded blocks are cut to this size.
const MAX_FRAME: usize = 16_384;
/// Largest header block held while it is completed.
const MAX_BLOCK: usize = 64 * 1024;
/// Largest decoded header list (by RFC 9113's count: name + value + 32 per field) a
/// rewritten block may have: twice the server's own limit (hyper's 16 KiB), so nothing the
/// server would take is refused here, while a block of one-byte references to large table
/// entries cannot expand much.
const MAX_DECODED: usize = 32 * 1024;
/// [`AuthorityFix::process`] stops taking input, at a frame boundary, once this much output
/// waits: with one-byte references a few kilobytes in can decode to megabytes, and output is
/// held until the server reads it.
pub const MAX_PENDING_OUT: usize = 64 * 1024;
/// SETTINGS_HEADER_TABLE_SIZE's initial value, which the server keeps: the most a client's
/// encoder may use.
const TABLE_SIZE: usize = 4096;
/// What such clients' `:authority` becomes; gRPC over a Unix socket ignores it.
const LOCALHOST: &[u8] = b"localhost";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No complete header block seen yet.
    Undecided,
    /// Bytes go through unread.
    Passthrough,
    /// Header blocks are rewritten.
    Rewrite,
    /// The connection must close: every later call fails too.
    Failed,
}

/// Where the parser is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    Preface(usize),
    FrameHeader,
    /// Inside the payload of a frame that passes through: bytes left.
    Passing(usize),
    /// Inside the payload of a HEADERS or CONTINUATION frame: bytes left.
    Block(usize),
}

/// The rewriter for one connection's client-to-server bytes.
pub struct AuthorityFix {
    mode: Mode,
    at: At,
    /// Bytes of a frame header read so far.
    header: Vec<u8>,
    /// The frame whose payload is being read.
    frame: Frame,
    /// The header block being completed: its fragments, the stream and the first frame's
    /// END_STREAM.
    block: Vec<u8>,
    block_stream: Option<u32>,
    block_end_stream: bool,
    /// Undecided: the block's frames as received, forwarded unchanged if it passes.
    raw: Vec<u8>,
    /// The payload of the HEADERS or CONTINUATION frame being read.
    payload: Vec<u8>,
    decoder: Decoder<'static>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
}

impl Default for AuthorityFix {
    fn default() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Self {
            mode: Mode::Undecided,
            at: At::Preface(PREFACE_LEN),
            header: Vec::with_capacity(FRAME_HEADER_LEN),
            frame: Frame::default(),
            block: Vec::new(),
            block_stream: None,
            block_end_stream: false,
            raw: Vec::new(),
            payload: Vec::new(),
            decoder,
        }
    }
}

fn closed(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 header rewriting: {why}"),
    )
}

impl AuthorityFix {
    /// True once the connection is passed through untouched: the caller may then read
    /// straight into the server's buffer.
    pub fn passthrough(&self) -> bool {
        self.mode == Mode::Passthrough
    }

    /// Takes the next bytes from the client, appending what the server is to read to `out`,
    /// and returns how many it took: all of them, unless `out` held [`MAX_PENDING_OUT`] at a
    /// frame boundary (the caller hands the rest over once `out` is drained). An error means
    /// the connection must be closed.
    pub fn process(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<usize> {
        let r = self.take(input, out);
        if r.is_err() {
            self.mode = Mode::Failed;
        }
        r
    }

    fn take(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> io::Result<usize> {
        let given = input.len();
        while !input.is_empty() {
            match self.mode {
                Mode::Failed => return Err(closed("the connection already failed")),
                Mode::Passthrough => {
                    out.extend_from_slice(input);
                    return Ok(given);
                }
                Mode::Undecided | Mode::Rewrite => {}
            }
            if self.at == At::FrameHeader && self.header.is_empty() && out.len() >= MAX_PENDING_OUT
            {
                return Ok(given - input.len());
            }
            match self.at {
                At::Preface(left) => {
                    let n = left.min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.at = if n == left {
                        At::FrameHeader
                    } else {
                        At::Preface(left - n)
                    };
                }
                At::FrameHeader => {
                    let n = (FRAME_HEADER_LEN - self.header.len()).min(input.len());
                    self.header.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.header.len() == FRAME_HEADER_LEN {
                        self.start_frame(out)?;
                    }
                }
                At::Passing(left) => {
                    let n = left.min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.at = Self::after_payload(left - n);
                }
                At::Block(left) => {
                    let n = left.min(input.len());
                    self.payload.extend_from_slice(&input[..n]);
                    if self.mode == Mode::Undecided {
                        self.raw.extend_from_slice(&input[..n]);
                    }
                    input = &input[n..];
                    if n == left {
                        self.at = At::FrameHeader;
                        self.end_block_frame(out)?;
                    } else {
                        self.at = At::Block(left - n);
                    }
                }
            }
        }
        Ok(given)
    }

    fn after_payload(left: usize) -> At {
        if left == 0 {
            At::FrameHeader
        } else {
            At::Passing(left)
        }
    }

    /// A frame header is complete: decides how its payload is handled.
    fn start_frame(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let h = std::mem::take(&mut self.header);
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        self.frame = Frame {
            kind: h[3],
            flags: h[4],
            stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
        };
        let in_block = self.block_stream.is_some();
        let block_frame = match self.frame.kind {
            HEADERS => !in_block,
            CONTINUATION => in_block && self.block_stream == Some(self.frame.stream),
            _ => false,
        };
        if !block_frame || len > MAX_FRAME || self.block.len() + len > MAX_BLOCK {
            // Passed through; if it breaks into a header block or is one this cannot follow
            // (a protocol error the server is to report), the rewriting stops.
            if in_block || self.frame.kind == CONTINUATION || block_frame {
                self.give_up(out)?;
            }
            out.extend_from_slice(&h);
            self.at = Self::after_payload(len);
            return Ok(());
        }
        if self.mode == Mode::Undecided {
            self.raw.extend_from_slice(&h);
        }
        if self.frame.kind == HEADERS {
            self.block_stream = Some(self.frame.stream);
            self.block_end_stream = self.frame.flags & END_STREAM != 0;
        }
        self.payload.clear();
        self.at = At::Block(len);
        if len == 0 {
            self.at = At::FrameHeader;
            self.end_block_frame(out)?;
        }
        Ok(())
    }

    /// Undecided: forwards what was held unchanged and stops reading; after the switch to
    /// rewriting, the connection cannot go on.
    fn give_up(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        match self.mode {
            Mode::Undecided => {
                out.append(&mut self.raw);
                self.mode = Mode::Passthrough;
                self.block.clear();
                self.block_stream = None;
                Ok(())
            }
            _ => Err(closed("a header block the server's state could not follow")),
        }
    }

    /// The payload of a HEADERS or CONTINUATION frame is complete.
    fn end_block_frame(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let p = std::mem::take(&mut self.payload);
        let fragment = if self.frame.kind == HEADERS {
            let mut start = 0;
            let mut end = p.len();
            if self.frame.flags & PADDED != 0 {
                let pad = usize::from(p.first().copied().unwrap_or(u8::MAX));
                start = 1;
                end = match end.checked_sub(pad) {
                    Some(e) if e >= start => e,
                    _ => return self.give_up(out),
                };
            }
            if self.frame.flags & PRIORITY != 0 {
                start += 5;
            }
            match p.get(start..end) {
                Some(f) => f,
                None => return self.give_up(out),
            }
        } else {
            &p[..]
        };
        self.block.extend_from_slice(fragment);
        if self.frame.flags & END_HEADERS != 0 {
            self.end_block(out)?;
        }
        Ok(())
    }

    /// A header block is complete: decides (first block) and rewrites.
    fn end_block(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let block = std::mem::take(&mut self.block);
        let stream = self.block_stream.take().unwrap_or_default();
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0usize;
        let decoded = self.decoder.decode_with_cb(&block, |name, value| {
            size = size.saturating_add(name.len() + value.len() + 32);
            if size <= MAX_DECODED {
                fields.push((name.into_owned(), value.into_owned()));
            }
        });
        if decoded.is_err() || size > MAX_DECODED {
            return self.give_up(out);
        }
        if self.mode == Mode::Undecided {
            let refused = fields.iter().any(|(n, v)| {
                n == b":authority" && ::http::uri::Authority::try_from(&v[..]).is_err()
            });
            if !refused {
                out.append(&mut self.raw);
                self.mode = Mode::Passthrough;
                return Ok(());
            }
            self.raw = Vec::new();
            self.mode = Mode::Rewrite;
        }
        let mut encoded = Vec::with_capacity(size);
        for (name, value) in &fields {
            let value = if name == b":authority" {
                LOCALHOST
            } else {
                &value[..]
            };
            // Literal header field without indexing, new name (RFC 7541 §6.2.2).
            encoded.push(0);
            encode_string(&mut encoded, name);
            encode_string(&mut encoded, value);
        }
        // One HEADERS frame, then CONTINUATION frames; an empty block is one empty HEADERS.
        let chunks: Vec<&[u8]> = if encoded.is_empty() {
            vec![&[]]
        } else {
            encoded.chunks(MAX_FRAME).collect()
        };
        for (i, chunk) in chunks.iter().enumerate() {
            let (kind, mut flags) = match (i, self.block_end_stream) {
                (0, true) => (HEADERS, END_STREAM),
                (0, false) => (HEADERS, 0),
                _ => (CONTINUATION, 0),
            };
            if i + 1 == chunks.len() {
                flags |= END_HEADERS;
            }
            write_frame(out, kind, flags, stream, chunk);
        }
        Ok(())
    }
}

/// An HPACK string literal, not Huffman-coded (RFC 7541 §5.2), its length a 7-bit-prefix
/// integer (§5.1).
fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    let mut n = s.len();
    if n < 127 {
        out.push(n as u8);
    } else {
        out.push(127);
        n -= 127;
        while n >= 128 {
            out.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        out.push(n as u8);
    }
    out.extend_from_slice(s);
}

fn write_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        write_frame(&mut f, kind, flags, stream, payload);
        f
    }

    /// A request's header block as a client's encoder writes it: `:method POST`, `:scheme
    /// http` (static table), then `:authority` as a literal added to the dynamic table, and
    /// `:path` as a literal that is not.
    fn first_block(authority: &[u8]) -> Vec<u8> {
        let mut b = vec![0x83, 0x86, 0x41];
        encode_string(&mut b, authority);
        b.push(0x04);
        encode_string(&mut b, b"/SpiffeWorkloadAPI/FetchX509SVID");
        b
    }

    /// The next request: `:authority` by its dynamic-table index (62, the newest entry).
    fn second_block() -> Vec<u8> {
        let mut b = vec![0x83, 0x86, 0x80 | 62, 0x04];
        encode_string(&mut b, b"/SpiffeWorkloadAPI/FetchJWTSVID");
        b
    }

    fn client_bytes(authority: &[u8]) -> Vec<u8> {
        let mut c = PREFACE.to_vec();
        c.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        c.extend(frame(HEADERS, END_HEADERS, 1, &first_block(authority)));
        c.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0])); // DATA: an empty gRPC message
        c.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &second_block()));
        c
    }

    /// Feeds `input` in pieces of `step`, draining the output as the server would; the
    /// largest output one call left waiting is checked against the bound.
    fn run(input: &[u8], step: usize) -> io::Result<(Vec<u8>, bool)> {
        let mut fix = AuthorityFix::default();
        let (mut all, mut out) = (Vec::new(), Vec::new());
        for mut chunk in input.chunks(step) {
            while !chunk.is_empty() {
                let n = fix.process(chunk, &mut out)?;
                assert!(
                    out.len() <= MAX_PENDING_OUT + MAX_DECODED + 2 * MAX_FRAME,
                    "{} bytes waiting after one call",
                    out.len()
                );
                chunk = &chunk[n..];
                all.append(&mut out);
            }
        }
        Ok((all, fix.passthrough()))
    }

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    /// The server's view: each frame, with header blocks decoded by a fresh decoder.
    fn server_view(bytes: &[u8]) -> Vec<(u8, u8, u32, Fields, Vec<u8>)> {
        assert_eq!(&bytes[..PREFACE_LEN], PREFACE);
        let mut rest = &bytes[PREFACE_LEN..];
        let mut decoder = Decoder::new();
        let mut frames = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let (kind, flags) = (rest[3], rest[4]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            let payload = rest[9..9 + len].to_vec();
            let fields = if kind == HEADERS {
                decoder.decode(&payload).unwrap()
            } else {
                Vec::new()
            };
            frames.push((kind, flags, stream, fields, payload));
            rest = &rest[9 + len..];
        }
        frames
    }

    fn field<'a>(fields: &'a [(Vec<u8>, Vec<u8>)], name: &[u8]) -> Option<&'a [u8]> {
        fields.iter().find(|(n, _)| n == name).map(|(_, v)| &v[..])
    }

    #[test]
    fn an_authority_the_server_takes_passes_through_byte_for_byte() {
        for authority in [&b"localhost"[..], b"tessera.internal:443"] {
            let input = client_bytes(authority);
            let (out, passthrough) = run(&input, input.len()).unwrap();
            assert_eq!(out, input);
            assert!(passthrough);
        }
    }

    #[test]
    fn socket_path_authorities_become_localhost_in_every_block() {
        // gRPC C-core's %-encoded path and grpc-java's raw one.
        for authority in [
            &b"%2Frun%2Ftessera%2Fworkload.sock"[..],
            b"/run/tessera/workload.sock",
        ] {
            let input = client_bytes(authority);
            let (out, passthrough) = run(&input, input.len()).unwrap();
            assert!(!passthrough);
            let frames = server_view(&out);
            let kinds: Vec<(u8, u8, u32)> = frames.iter().map(|f| (f.0, f.1, f.2)).collect();
            assert_eq!(
                kinds,
                [
                    (0x4, 0, 0),
                    (HEADERS, END_HEADERS, 1),
                    (0x0, END_STREAM, 1),
                    (HEADERS, END_HEADERS | END_STREAM, 3)
                ]
            );
            for (i, path) in [(1, "FetchX509SVID"), (3, "FetchJWTSVID")] {
                let fields = &frames[i].3;
                assert_eq!(field(fields, b":authority"), Some(&b"localhost"[..]));
                assert_eq!(field(fields, b":method"), Some(&b"POST"[..]));
                assert_eq!(
                    field(fields, b":path"),
                    Some(format!("/SpiffeWorkloadAPI/{path}").as_bytes())
                );
            }
            assert_eq!(frames[2].4, [0, 0, 0, 0, 0]);
            // Byte by byte, the same.
            assert_eq!(run(&input, 1).unwrap().0, out);
        }
    }

    #[test]
    fn padding_priority_and_continuation_frames_are_followed() {
        let block = first_block(b"%2Fw.sock");
        let (a, b) = block.split_at(5);
        let mut payload = vec![3u8]; // pad length
        payload.extend([0, 0, 0, 0, 16]); // priority: dependency 0, weight 16
        payload.extend(a);
        payload.extend([0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 1, &payload));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        let (out, _) = run(&input, 7).unwrap();
        let frames = server_view(&out);
        assert_eq!(frames.len(), 1);
        assert_eq!(
            (frames[0].0, frames[0].1),
            (HEADERS, END_HEADERS | END_STREAM)
        );
        assert_eq!(field(&frames[0].3, b":authority"), Some(&b"localhost"[..]));
    }

    #[test]
    fn a_first_block_that_does_not_decode_is_left_for_the_server_to_refuse() {
        let mut input = PREFACE.to_vec();
        // An index past both tables.
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0x80 | 100]));
        input.extend(frame(0x0, END_STREAM, 1, b"x"));
        let (out, passthrough) = run(&input, 3).unwrap();
        assert_eq!(out, input);
        assert!(passthrough);
    }

    #[test]
    fn a_block_that_would_expand_without_bound_closes_the_connection() {
        let mut input = client_bytes(b"%2Fw.sock");
        // A 4,000-byte entry, then 8,000 one-byte references to it: 32 MB decoded.
        let mut add = vec![0x40];
        encode_string(&mut add, b"x-big");
        encode_string(&mut add, &[b'a'; 4000]);
        input.extend(frame(HEADERS, END_HEADERS, 5, &add));
        for chunk in vec![0x80 | 62; 8000].chunks(MAX_FRAME) {
            input.extend(frame(HEADERS, END_HEADERS, 7, chunk));
        }
        let e = run(&input, 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn output_waiting_for_the_server_stays_bounded_however_the_input_expands() {
        // A 4,000-byte table entry, then many small blocks each referring to it a few times
        // (under the server's own header-list limit, so nothing is refused): every block
        // decodes to ~12 KB from ~20 bytes.
        let mut input = client_bytes(b"%2Fw.sock");
        let mut add = vec![0x40];
        encode_string(&mut add, b"x-big");
        encode_string(&mut add, &[b'a'; 4000]);
        input.extend(frame(HEADERS, END_HEADERS, 5, &add));
        let block = [0x83, 0x86, 0x80 | 62, 0x80 | 62, 0x80 | 62];
        for i in 0..2000u32 {
            input.extend(frame(HEADERS, END_HEADERS, 7 + 2 * i, &block));
        }
        let mut fix = AuthorityFix::default();
        let mut out = Vec::new();
        let mut fed = 0;
        let mut calls = 0;
        while fed < input.len() {
            let n = fix.process(&input[fed..], &mut out).unwrap();
            assert!(out.len() <= MAX_PENDING_OUT + MAX_DECODED + 2 * MAX_FRAME);
            fed += n;
            calls += 1;
            out.clear();
        }
        // It stopped early many times rather than expanding everything at once.
        assert!(calls > 100, "{calls}");
    }

    #[test]
    fn continuation_frames_without_end_are_not_held_without_bound() {
        let mut input = client_bytes(b"%2Fw.sock");
        input.extend(frame(HEADERS, 0, 5, &[0x83]));
        for _ in 0..10 {
            input.extend(frame(CONTINUATION, 0, 5, &[0x83; MAX_FRAME]));
        }
        let e = run(&input, 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_long_block_is_cut_into_continuation_frames() {
        let mut block = first_block(b"%2Fw.sock");
        // About 28 KB decoded: more than one frame, within what a rewritten block may hold.
        for i in 0..30 {
            block.push(0x00);
            encode_string(&mut block, format!("x-h{i}").as_bytes());
            encode_string(&mut block, &[b'v'; 900]);
        }
        let mut input = PREFACE.to_vec();
        // The client's own frames, each within the server's 16,384 bytes.
        let (a, b) = block.split_at(12_000);
        let (b, c) = b.split_at(12_000);
        input.extend(frame(HEADERS, 0, 1, a));
        input.extend(frame(CONTINUATION, 0, 1, b));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, c));
        let (out, _) = run(&input, 1000).unwrap();
        let mut rest = &out[PREFACE_LEN..];
        let mut kinds = Vec::new();
        let mut joined = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            assert!(len <= MAX_FRAME, "{len}");
            kinds.push((rest[3], rest[4]));
            joined.extend(&rest[9..9 + len]);
            rest = &rest[9 + len..];
        }
        assert_eq!(kinds, [(HEADERS, 0), (CONTINUATION, END_HEADERS)]);
        let fields = Decoder::new().decode(&joined).unwrap();
        assert_eq!(fields.len(), 34);
        assert_eq!(field(&fields, b":authority"), Some(&b"localhost"[..]));
    }
}
