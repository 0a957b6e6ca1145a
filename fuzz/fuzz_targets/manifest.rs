//! Any bytes given to the manifest decoder: an error or a valid manifest, never a panic
//! or an allocation beyond the declared limits; a decoded manifest re-encodes to one
//! that decodes to the same value.
#![no_main]

use cacher::chunk::format::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = Manifest::decode("fuzz", data) {
        let again = Manifest::decode("fuzz", &manifest.encode()).expect("re-encoded manifest");
        assert_eq!(again, manifest);
    }
});
