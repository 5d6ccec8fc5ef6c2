//! The attestation extension payload (V0 SCALE with its event log, V1 msgpack with its) and a
//! GetQuote answer's JSON event log on arbitrary bytes; the RTMR3 replay of what they decoded
//! and the FMSPC read from the quote's PCK chain.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(att) = ratls::attestation::Attestation::parse(data) {
        let _ = att.report_data();
        let _ = att.binds_key(data);
        let _ = ratls::quote::replay_rtmr3(&att.event_log);
        // The PCK certificate chain inside the quote, where the FMSPC is read.
        let _ = ratls::quote::fmspc_of(&att.quote);
    }
    // A GetQuote answer's JSON event log (evidence bundles).
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(att) = ratls::attestation::Attestation::from_get_quote("040002008100", text) {
            let _ = ratls::quote::replay_rtmr3(&att.event_log);
        }
    }
});
