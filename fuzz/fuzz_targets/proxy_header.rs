//! The PROXY protocol header (v1 text, v2 binary) a gateway writes before the ClientHello.
#![no_main]

use dstack_mesh::inbound::proxy_protocol::{read_slice, Accept};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for accept in [Accept::V1, Accept::V2, Accept::Any] {
        let mut rest = data;
        let _ = read_slice(&mut rest, accept);
        // Never past a header: v2's 16 bytes and 1 KiB body, or v1's 107.
        assert!(data.len() - rest.len() <= 16 + 1024);
    }
});
