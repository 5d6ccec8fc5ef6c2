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

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        if out.is_empty() {
            out.push(rng.next() as u8);
        }
        let at = rng.below(out.len());
        match rng.below(7) {
            0 => out[at] ^= 1 << rng.below(8),
            1 => out[at] = rng.next() as u8,
            2 => out.truncate(at),
            3 => out.insert(at, rng.next() as u8),
            // Length bytes and separators are what parsers trust most.
            4 => out[at] = [0x00, 0x7f, 0x80, 0x81, 0xff, b'"', b'\n', b'%'][rng.below(8)],
            5 => {
                let len = rng.below(64).min(out.len() - at);
                let chunk = out[at..at + len].to_vec();
                let to = rng.below(out.len());
                out.splice(to..to, chunk);
            }
            _ => {
                let len = rng.below(32).min(out.len() - at);
                out.drain(at..at + len);
            }
        }
    }
    out
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
