//! Gzip bodies assembled from pieces compressed independently.
//!
//! Lines are compressed once, when they are queued, as a raw deflate
//! *segment*: the compressed blocks end with a sync flush (an empty stored
//! block), so they stop on a byte boundary and carry no final-block flag.
//! Segments written at different times then concatenate into one deflate
//! stream, and a batch becomes a single gzip member: a 10-byte header, the
//! segments, an empty final block, and a trailer whose CRC-32 is combined
//! from the segments' own.
//!
//! A single member matters: concatenated gzip members are valid gzip, but
//! some remotes decode only the first member (InfluxDB 3 reads request bodies
//! with a single-member decoder), which would drop the rest of a batch after
//! answering 204.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// gzip header: magic, CM=deflate, no flags, no mtime, XFL=0, OS=unknown.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
/// An empty fixed-Huffman block with the final-block flag set.
const FINAL_BLOCK: [u8; 2] = [0x03, 0x00];

/// Appends `data` compressed at `level` to `out` as a segment (raw deflate,
/// ending with a sync flush). Returns the CRC-32 of `data`.
pub fn segment(data: &[u8], level: u32, out: &mut Vec<u8>) -> u32 {
    thread_local! {
        // A compressor holds a few hundred kB of tables: one per thread,
        // reset between segments, rather than one allocated per segment.
        static COMPRESSOR: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
    }
    let level = level.min(9);
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        match cell.as_mut() {
            Some((l, c)) if *l == level => c.reset(),
            _ => *cell = Some((level, Compress::new(Compression::new(level), false))),
        }
        let (_, c) = cell.as_mut().expect("set above");
        deflate_sync(c, data, out);
    });
    crc32fast::hash(data)
}

fn deflate_sync(c: &mut Compress, data: &[u8], out: &mut Vec<u8>) {
    loop {
        out.reserve(data.len() / 4 + 256);
        let consumed = c.total_in() as usize;
        c.compress_vec(&data[consumed..], out, FlushCompress::Sync)
            .expect("deflate into a vector cannot fail");
        // The flush is complete once all input is taken and the output
        // buffer was not filled to the brim.
        if c.total_in() as usize == data.len() && out.len() < out.capacity() {
            break;
        }
    }
}

/// Inflates one segment (or several concatenated) into `out`, which must
/// receive exactly `len` bytes.
pub fn inflate_segment(seg: &[u8], len: usize, out: &mut Vec<u8>) -> Result<(), String> {
    let mut d = Decompress::new(false);
    let start = out.len();
    out.reserve(len);
    loop {
        let consumed = d.total_in() as usize;
        let status = d
            .decompress_vec(&seg[consumed..], out, FlushDecompress::Sync)
            .map_err(|e| format!("bad deflate segment: {e}"))?;
        let done_in = d.total_in() as usize == seg.len();
        if out.len() - start > len {
            return Err("deflate segment longer than recorded".into());
        }
        if done_in || status == Status::StreamEnd {
            break;
        }
        if out.len() == out.capacity() {
            out.reserve(len.max(4096));
        } else if status == Status::BufError {
            return Err("truncated deflate segment".into());
        }
    }
    if out.len() - start != len {
        return Err(format!(
            "deflate segment inflates to {} bytes, {len} recorded",
            out.len() - start
        ));
    }
    Ok(())
}

/// A gzip member under construction.
pub struct GzipBody {
    buf: Vec<u8>,
    crc: crc32fast::Hasher,
    len: u64,
}

impl GzipBody {
    /// Starts a body in `buf` (cleared; its allocation is reused).
    pub fn new(mut buf: Vec<u8>) -> GzipBody {
        buf.clear();
        buf.extend_from_slice(&HEADER);
        GzipBody {
            buf,
            crc: crc32fast::Hasher::new(),
            len: 0,
        }
    }

    /// Compresses `lines` at `level` into the body.
    pub fn push_lines(&mut self, lines: &[u8], level: u32) {
        if lines.is_empty() {
            return;
        }
        let crc = segment(lines, level, &mut self.buf);
        self.add(crc, lines.len() as u64);
    }

    /// Appends a segment compressed earlier: `len` bytes of lines whose
    /// CRC-32 is `crc`.
    pub fn push_segment(&mut self, seg: &[u8], len: u32, crc: u32) {
        self.buf.extend_from_slice(seg);
        self.add(crc, len as u64);
    }

    fn add(&mut self, crc: u32, len: u64) {
        self.crc
            .combine(&crc32fast::Hasher::new_with_initial_len(crc, len));
        self.len += len;
    }

    /// Bytes of lines in the body so far.
    pub fn lines_len(&self) -> u64 {
        self.len
    }

    /// Ends the member: final block and trailer (CRC-32, length mod 2^32).
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&FINAL_BLOCK);
        self.buf
            .extend_from_slice(&self.crc.clone().finalize().to_le_bytes());
        self.buf.extend_from_slice(&(self.len as u32).to_le_bytes());
        self.buf
    }
}

/// Inflates the first gzip member only: the strictest reading a remote may
/// do (InfluxDB 3 reads no further), so bodies are checked against it.
#[cfg(test)]
pub(crate) fn gunzip_first_member(body: &[u8]) -> Vec<u8> {
    use std::io::Read as _;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body)
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    #[test]
    fn segments_made_apart_form_one_member() {
        let a = b"cpu,host=a usage=1.5 1\n".repeat(3000);
        let b = b"mem,host=a used=42i 2\n".repeat(10);
        let c = b"disk,host=a free=7i 3\n".repeat(5000);
        let mut seg_b = Vec::new();
        let crc_b = segment(&b, 6, &mut seg_b);
        let mut body = GzipBody::new(Vec::new());
        body.push_lines(&a, 6);
        body.push_segment(&seg_b, b.len() as u32, crc_b);
        body.push_lines(&c, 1);
        body.push_lines(b"", 6);
        let gz = body.finish();
        assert_eq!(gunzip_first_member(&gz), [a, b, c].concat());
        // The trailer is checked by the decoder; a wrong one is refused.
        let mut bad = gz.clone();
        let n = bad.len();
        bad[n - 8] ^= 1;
        let mut out = Vec::new();
        assert!(flate2::read::GzDecoder::new(&bad[..])
            .read_to_end(&mut out)
            .is_err());
    }

    #[test]
    fn segments_inflate_alone() {
        for data in [
            Vec::new(),
            b"x f=1 1\n".to_vec(),
            b"m,t=1 v=2 3\n".repeat(100_000),
        ] {
            let mut seg = Vec::new();
            let crc = segment(&data, 6, &mut seg);
            assert_eq!(crc, crc32fast::hash(&data));
            let mut back = b"prefix".to_vec();
            inflate_segment(&seg, data.len(), &mut back).unwrap();
            assert_eq!(&back[6..], &data[..]);
            let mut short = Vec::new();
            assert!(inflate_segment(&seg, data.len() + 1, &mut short).is_err());
        }
        let mut out = Vec::new();
        assert!(inflate_segment(b"\xff\xff\xff", 10, &mut out).is_err());
    }
}
