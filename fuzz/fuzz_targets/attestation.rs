//! The attestation extension payload (V0 SCALE with its event log, V1 msgpack) on arbitrary
//! bytes, and the RTMR3 replay of what it decoded.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(att) = ratls::attestation::Attestation::parse(data) {
        let _ = att.report_data();
        let _ = att.binds_key(data);
        let _ = ratls::quote::replay_rtmr3(&att.event_log);
    }
});
