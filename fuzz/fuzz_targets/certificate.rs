//! Certificate parsing and verification on arbitrary bytes (PEM or DER, one or many).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ratls::cert::fuzz_entry(data);
});
