//! Request bodies sent with `Content-Encoding: gzip`: arbitrary bytes never
//! panic the reader, and it never returns more than the limit.
#![no_main]

use edge_replicator::ingest::body::{decompress, BodyError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let max = 64 << 10;
    match decompress(data, max) {
        Ok(out) => assert!(out.len() as u64 <= max),
        Err(BodyError::TooLarge(m)) => assert_eq!(m, max),
        Err(_) => {}
    }
});
