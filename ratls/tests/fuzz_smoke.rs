//! A few thousand random and mutated inputs through every parser that sees untrusted bytes, in
//! the normal suite (the coverage-guided targets are in `fuzz/`). Deterministic: a fixed seed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::path::PathBuf;

use ratls::fuzz::{mutate, Rng};

fn seeds() -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/dstack-sim/certs");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    // Directory order differs between file systems; the run must not.
    dirs.sort();
    let mut seeds = Vec::new();
    for path in dirs {
        let pem = std::fs::read(path.join("chain.pem")).unwrap();
        let chain = ratls::cert::parse_chain(&pem).unwrap();
        seeds.push(chain[0].to_vec());
        seeds.push(chain.iter().flat_map(|c| c.to_vec()).collect());
        seeds.push(pem);
    }
    seeds
}

#[test]
fn random_and_mutated_certificates_never_panic() {
    let seeds = seeds();
    let mut rng = Rng(0x5eed_d57a_c4e5_0001);
    let mut parsed = 0;
    let mut viewed = 0;
    for i in 0..4000 {
        let input = if i % 10 == 0 {
            (0..rng.below(2048)).map(|_| rng.next() as u8).collect()
        } else {
            let seed = &seeds[rng.below(seeds.len())];
            mutate(&mut rng, seed)
        };
        if ratls::cert::parse_chain(&input).is_ok() {
            parsed += 1;
        }
        if ratls::ChainView::from_bytes(&input).is_ok() {
            viewed += 1;
        }
        ratls::fuzz::certificate(&input);
    }
    // The mutations must reach past the DER parser, or this test checks little (the shared
    // mutator makes up to five edits: about one input in nine still parses).
    eprintln!("{parsed} of 4000 inputs parsed, {viewed} made a view");
    assert!(parsed > 300, "only {parsed} of 4000 inputs parsed");
}

#[test]
fn random_and_mutated_attestations_never_panic() {
    let pem = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../testdata/dstack-sim/api/app1/quote_post.json"),
    )
    .unwrap();
    let quote: ratls::agent::QuoteResponse = serde_json::from_slice(&pem).unwrap();
    let v1 = hex::decode(quote.attestation.unwrap()).unwrap();
    let parsed = ratls::attestation::Attestation::parse(&v1).unwrap();
    assert_eq!(parsed.format, ratls::attestation::Format::V1Msgpack);
    assert_eq!(
        parsed.report_data().map(hex::encode),
        Some(quote.report_data)
    );
    let mut v0 = vec![0u8, 0u8, 0x49, 0x4e];
    v0.extend_from_slice(&hex::decode(&quote.quote).unwrap()[..5010.min(quote.quote.len() / 2)]);
    let mut rng = Rng(0x5eed_a77e_57a7_0002);
    for i in 0..3000 {
        let input = match i % 3 {
            0 => mutate(&mut rng, &v1),
            1 => mutate(&mut rng, &v0),
            _ => (0..rng.below(512)).map(|_| rng.next() as u8).collect(),
        };
        if let Ok(att) = ratls::attestation::Attestation::parse(&input) {
            let _ = att.report_data();
        }
    }
}

#[test]
fn mutated_signed_attestations_never_panic_the_quote_verifier() {
    // The simulator's mock-signed V0 attestation (quote and event log) and its collateral:
    // mutations reach the event-log decoder, the RTMR3 replay and dcap-qvl's quote parser.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/dstack-sim");
    let pem = std::fs::read(dir.join("certs/sim-app1-signed-ratls/leaf.pem")).unwrap();
    let leaf = ratls::cert::parse_chain(&pem).unwrap().remove(0);
    let att = ratls::cert::attestation_of(&leaf).unwrap().unwrap();
    let collateral = ratls::quote::Collateral::from_dir(&dir.join("mock-pccs")).unwrap();
    let root = ratls::quote::TdxRoot::from_pem(
        &std::fs::read(dir.join("mock-pccs/tdx-root-ca.pem")).unwrap(),
    )
    .unwrap();
    // 2026-12-01: inside the collateral's validity, so the quote itself is what is checked.
    let now = 1_796_083_200;
    let mut rng = Rng(0x5eed_9e07_e5c0_0003);
    // Only RTMR3's events are replayed (and read); the boot events of RTMR0-2 are not claims.
    let measured: Vec<usize> = (0..att.event_log.len())
        .filter(|i| att.event_log[*i].imr == 3)
        .collect();
    let (mut quote_ok, mut event_ok) = (0, 0);
    for i in 0..400 {
        let mut mutated = att.clone();
        let quote_mutation = i % 2 == 0;
        if quote_mutation {
            mutated.quote = mutate(&mut rng, &att.quote);
        } else {
            let event = &mut mutated.event_log[measured[rng.below(measured.len())]];
            event.payload = mutate(&mut rng, &event.payload);
        }
        if mutated == att {
            continue; // a mutation that changed nothing
        }
        let _ = ratls::quote::replay_rtmr3(&mutated.event_log);
        let ok = ratls::quote::verify(&mutated, &collateral, &root, now).is_ok();
        match (ok, quote_mutation) {
            (true, true) => quote_ok += 1,
            (true, false) => event_ok += 1,
            _ => {}
        }
    }
    // A changed measured event never verifies; a changed quote only where no signature covers
    // it (trailing bytes the parser does not read).
    assert_eq!(event_ok, 0, "a mutated RTMR3 event verified");
    assert!(quote_ok < 20, "{quote_ok} of 200 mutated quotes verified");
}

#[test]
fn mutated_get_quote_answers_never_panic_the_json_event_log_or_fmspc_readers() {
    // The signed simulator's GetQuote answer: its JSON event log and its quote's PCK chain
    // (where the FMSPC is read to pick collateral) under mutation.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/dstack-sim");
    let body = std::fs::read(dir.join("api/app1-signed/get_quote_post.json")).unwrap();
    let answer: ratls::agent::QuoteResponse = serde_json::from_slice(&body).unwrap();
    let quote = hex::decode(&answer.quote).unwrap();
    assert_eq!(ratls::quote::fmspc_of(&quote).unwrap(), "000000000000");
    let mut rng = Rng(0x5eed_e7e0_1090_0004);
    let mut parsed = 0;
    for i in 0..2000 {
        if i % 2 == 0 {
            let log = mutate(&mut rng, answer.event_log.as_bytes());
            let log = String::from_utf8_lossy(&log);
            if ratls::attestation::Attestation::from_get_quote(&answer.quote, &log).is_ok() {
                parsed += 1;
            }
        } else {
            let _ = ratls::quote::fmspc_of(&mutate(&mut rng, &quote));
        }
    }
    eprintln!("{parsed} of 1000 mutated event logs parsed");
}
