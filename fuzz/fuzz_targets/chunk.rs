//! Any stored bytes and declared length given to the chunk decoder: `None`, or exactly
//! `len` bytes with the asked-for id, never a panic or more than `len` bytes of output.
#![no_main]

use cacher::chunk::format::decode_chunk;
use cacher::chunk::{CHUNK_MAX, Id};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, stored)) = data.split_first_chunk::<4>() else {
        return;
    };
    let len = u32::from_le_bytes(*head) % (CHUNK_MAX + 1);
    // The id of whatever the bytes inflate to is accepted exactly when the length fits.
    if let Ok(plain) = zstd::bulk::decompress(stored, len as usize) {
        let decoded = decode_chunk(stored, len, &Id::of(&plain));
        assert_eq!(decoded.is_some(), plain.len() == len as usize);
    }
    // Any other id is refused.
    let other = Id([0x5a; 32]);
    if let Some(decoded) = decode_chunk(stored, len, &other) {
        assert_eq!(Id::of(&decoded), other);
    }
});
