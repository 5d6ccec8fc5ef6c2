//! One TLS crypto backend in the build: every rustls config comes from `ratls::crypto`, and
//! what the workspace compiles holds aws-lc-rs and neither ring nor OpenSSL. A dependency
//! whose default features pull another one in fails here, not in a binary with two crypto
//! libraries and an ambiguous process default.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

/// `cargo tree -i <package>` over the whole workspace (every member, every feature the suite
/// builds, dev and build dependencies, every target): what depends on `package` when Cargo's
/// feature resolver has decided, empty when it is not compiled at all. The lockfile is no
/// guide: it lists optional packages no feature enables. Not `--offline`: every target's
/// packages must be known, and a fresh machine has fetched only its own (`--locked` keeps the
/// versions).
fn dependents(package: &str) -> String {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let out = std::process::Command::new(cargo)
        .args(["tree", "--locked", "--workspace", "--target", "all"])
        .args([
            "--features",
            "dstack-mesh/etcd",
            "--prefix",
            "none",
            "-i",
            package,
        ])
        .args(["--manifest-path", manifest])
        .output()
        .expect("cargo tree runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("did not match any packages") {
        return String::new(); // not even in the lockfile
    }
    assert!(out.status.success(), "cargo tree -i {package}: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_build_holds_one_crypto_backend() {
    assert!(
        dependents("aws-lc-rs").contains("rustls v"),
        "rustls is built on aws-lc-rs"
    );
    for second in ["ring", "openssl"] {
        let tree = dependents(second);
        assert!(
            tree.is_empty(),
            "a second crypto library is compiled in: {second}, through\n{tree}(check the new dependency's default features)"
        );
    }
}

#[test]
fn every_config_uses_the_chosen_provider_with_the_hybrid_first() {
    let provider = ratls::crypto::provider();
    let groups: Vec<String> = provider
        .kx_groups
        .iter()
        .map(|g| format!("{:?}", g.name()))
        .collect();
    assert_eq!(
        groups,
        ["X25519MLKEM768", "X25519", "secp256r1", "secp384r1"],
        "{groups:?}"
    );
    assert!(std::sync::Arc::ptr_eq(
        &provider,
        &ratls::crypto::provider()
    ));
    // A library that asks rustls for the process default gets the same groups.
    ratls::crypto::install_default();
    let default = rustls::crypto::CryptoProvider::get_default().expect("installed");
    let names = |p: &rustls::crypto::CryptoProvider| -> Vec<rustls::NamedGroup> {
        p.kx_groups.iter().map(|g| g.name()).collect()
    };
    assert_eq!(names(default), names(&provider));
}
