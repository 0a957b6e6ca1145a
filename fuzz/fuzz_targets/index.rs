//! Any bytes given to the index segment decoder: an error or a table, never a panic.
#![no_main]

use cacher::chunk::format::ChunkTable;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(table) = ChunkTable::decode_index("fuzz", data) {
        let again = ChunkTable::decode_index("fuzz", &table.encode_index()).expect("re-encoded");
        assert_eq!(again, table);
    }
});
