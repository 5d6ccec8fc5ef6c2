//! `scripts/bench-check`: a build is failed when a row is worse than recorded by more than the
//! noise of either run (with a floor), and passed within it. Fed recorded figures
//! (`PERF_NOW`), so no benchmark runs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{path::Path, process::Output};

/// A figure as `scripts/perf-bench` records it: the median of its rounds and their range.
fn figure(median: f64, spread: f64) -> serde_json::Value {
    serde_json::json!({ "median": median, "lo": median - spread / 2.0, "hi": median + spread / 2.0 })
}

fn run(dir: &Path, baseline: &serde_json::Value, now: &serde_json::Value) -> Output {
    let (b, n) = (dir.join("baseline.json"), dir.join("now.json"));
    std::fs::write(&b, baseline.to_string()).unwrap();
    std::fs::write(&n, now.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench-check");
    std::process::Command::new("bash")
        .arg(script)
        .env("PERF_BASELINE", &b)
        .env("PERF_NOW", &n)
        .output()
        .unwrap()
}

fn rows(instructions: f64, pinned: f64) -> serde_json::Value {
    serde_json::json!({ "rows": {
        // 0.5% range: the 1% floor applies to instructions.
        "c_h1": { "instructions": figure(instructions, instructions * 0.005) },
        // 2% range: the 3% floor applies to requests/s.
        "pa": { "pinned_rps": figure(pinned, pinned * 0.02) },
    }})
}

#[test]
fn within_noise_passes_and_beyond_it_fails_naming_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let recorded = rows(40_000.0, 30_000.0);

    // 0.8% more instructions, 2.5% fewer requests/s: inside the floors.
    let out = run(dir.path(), &recorded, &rows(40_320.0, 29_250.0));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("2 figures within their noise"), "{said}");

    // 5% more instructions: worse, and only that row is named.
    let out = run(dir.path(), &recorded, &rows(42_000.0, 30_000.0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("worse than recorded beyond noise: c_h1 instructions"),
        "{err}"
    );
    assert!(!err.contains("pa pinned_rps"), "{err}");

    // 10% fewer requests/s.
    let out = run(dir.path(), &recorded, &rows(40_000.0, 27_000.0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("pa pinned_rps"), "{err}");
    assert!(!err.contains("c_h1"), "{err}");

    // A noisy run widens what is allowed: 10% fewer with a 25% range is within it.
    let mut noisy = rows(40_000.0, 27_000.0);
    noisy["rows"]["pa"]["pinned_rps"] = figure(27_000.0, 27_000.0 * 0.25);
    let out = run(dir.path(), &recorded, &noisy);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Faster is never worse.
    let out = run(dir.path(), &recorded, &rows(30_000.0, 40_000.0));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn nothing_to_compare_fails() {
    let dir = tempfile::tempdir().unwrap();
    let other = serde_json::json!({ "rows": { "oc": { "instructions": figure(1.0, 0.0) } } });
    let out = run(dir.path(), &rows(40_000.0, 30_000.0), &other);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no figure in common"), "{err}");
}
