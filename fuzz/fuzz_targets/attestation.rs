//! The attestation extension payload (V0 SCALE, V1 msgpack) on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(att) = ratls::attestation::Attestation::parse(data) {
        let _ = att.report_data();
        let _ = att.binds_key(data);
    }
});
