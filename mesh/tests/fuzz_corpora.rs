//! Every fuzz target's inputs (`fuzz/seeds/<target>/` from the fixtures, `fuzz/corpus/<target>/`
//! what campaigns found interesting, `fuzz/regressions/<target>/` each crash found, named for
//! the bug) through its entry point, in
//! the normal suite: a parser change that panics on any input once seen fails here, without
//! nightly. Then deterministic mutations of each input, so the suite also explores a little.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use dstack_mesh::fuzz::TARGETS;
use ratls::fuzz::{mutate, Rng};

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn inputs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .into_iter()
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

/// Runs `entry` on `input`, naming the file when it panics.
fn run(target: &str, entry: dstack_mesh::fuzz::Entry, path: &Path, input: &[u8]) {
    if std::panic::catch_unwind(|| entry(input)).is_err() {
        panic!(
            "fuzz target {target} panicked on {} ({} bytes)",
            path.display(),
            input.len()
        );
    }
}

#[test]
fn every_target_has_a_cargo_fuzz_binary_and_a_seeded_corpus() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    let bins: BTreeSet<String> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .map(|n| n.trim_end_matches('"').to_owned())
        .filter(|n| n != "dstack-mesh-fuzz")
        .collect();
    let targets: BTreeSet<String> = TARGETS.iter().map(|(n, _)| (*n).to_owned()).collect();
    assert_eq!(
        bins, targets,
        "fuzz/Cargo.toml and dstack_mesh::fuzz::TARGETS differ"
    );
    for (name, _) in TARGETS {
        let source =
            std::fs::read_to_string(fuzz_dir().join(format!("fuzz_targets/{name}.rs"))).unwrap();
        assert!(
            source.contains(&format!("run(\"{name}\", data)")),
            "fuzz_targets/{name}.rs does not run its own entry point"
        );
        let seeds = inputs(&fuzz_dir().join("seeds").join(name)).len();
        assert!(seeds > 0, "fuzz/seeds/{name} has no seed");
    }
}

#[test]
fn every_corpus_and_regression_input_runs_without_panic() {
    let mut total = 0;
    for (name, entry) in TARGETS {
        for dir in ["seeds", "corpus", "regressions"] {
            for (path, input) in inputs(&fuzz_dir().join(dir).join(name)) {
                run(name, *entry, &path, &input);
                total += 1;
            }
        }
    }
    eprintln!("{total} corpus inputs over {} targets", TARGETS.len());
}

#[test]
fn mutations_of_every_seed_run_without_panic() {
    // 50 mutations of each seed: a few seconds, and new code paths get a first look in CI.
    let mut rng = Rng(0x5eed_f022_c0de_0005);
    for (name, entry) in TARGETS {
        for (path, seed) in inputs(&fuzz_dir().join("seeds").join(name)) {
            for _ in 0..50 {
                let input = mutate(&mut rng, &seed);
                run(name, *entry, &path, &input);
            }
        }
    }
}
