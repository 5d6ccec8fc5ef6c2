//! One TLS crypto backend in the build: every rustls config comes from `ratls::crypto`, and
//! the lockfile (what the workspace really compiles) holds ring's backend and not aws-lc's.
//! A dependency whose default features pull aws-lc-rs in fails here, not in a binary twice
//! the size with two providers and an ambiguous process default.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

/// The package names of the workspace's lockfile.
fn locked_packages() -> Vec<String> {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"))
        .expect("the workspace's Cargo.lock");
    lock.lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .map(|n| n.trim_end_matches('"').to_owned())
        .collect()
}

#[test]
fn the_build_holds_one_crypto_backend() {
    let packages = locked_packages();
    assert!(packages.iter().any(|p| p == "ring"), "ring is the backend");
    let second: Vec<&String> = packages
        .iter()
        .filter(|p| p.starts_with("aws-lc"))
        .collect();
    assert!(
        second.is_empty(),
        "a second backend is compiled in: {second:?} (check the new dependency's default features)"
    );
}

#[test]
fn every_config_uses_the_chosen_provider() {
    let provider = ratls::crypto::provider();
    // ring's suites and groups, in its order: no group of another backend.
    let groups: Vec<String> = provider
        .kx_groups
        .iter()
        .map(|g| format!("{:?}", g.name()))
        .collect();
    assert_eq!(groups, ["X25519", "secp256r1", "secp384r1"], "{groups:?}");
    assert!(std::sync::Arc::ptr_eq(
        &provider,
        &ratls::crypto::provider()
    ));
}
