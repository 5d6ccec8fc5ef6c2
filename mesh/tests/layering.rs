//! The layering DESIGN.md draws, checked on the source: lower layers never reach up.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// Files under `module` that name any of `forbidden` (as `crate::x` paths).
fn offenders(module: &str, forbidden: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let dir = root.join(module);
    let files = match dir.is_dir() {
        true => sources(&dir),
        false => vec![root.join(format!("{module}.rs"))],
    };
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            for name in forbidden {
                // `crate::inbound::...`, or `inbound::` inside a `use crate::{...}` block.
                // `crate::run` is not `crate::runtime`.
                let direct = line
                    .match_indices(&format!("crate::{name}"))
                    .any(|(at, m)| {
                        !line[at + m.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
                    });
                let grouped = line.trim_start().starts_with(&format!("{name}::"))
                    || line.trim_start().starts_with(&format!("{name},"))
                    || line.trim_start().starts_with(&format!("{name}::{{"));
                if direct || (grouped && text.contains("use crate::{")) {
                    found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                }
            }
        }
    }
    found
}

#[test]
fn acme_knows_nothing_of_the_listener_or_the_cli() {
    let found = offenders(
        "acme",
        &["inbound", "outbound", "tools", "cli", "run", "admin", "app"],
    );
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn config_is_read_by_everyone_and_reads_no_one() {
    let found = offenders(
        "config",
        &[
            "acme", "inbound", "outbound", "auth", "admin", "tools", "cli", "run", "app",
        ],
    );
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn admin_and_the_listeners_do_not_reach_into_the_cli() {
    for module in ["admin", "inbound", "outbound", "auth", "proxy", "trust"] {
        let found = offenders(module, &["cli", "tools", "run", "status", "app"]);
        assert!(found.is_empty(), "{module}: {found:#?}");
    }
}

#[test]
fn inbound_returns_no_admin_types() {
    let found = offenders("inbound", &["admin"]);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn no_test_reads_outside_the_repository() {
    // The fixtures live in testdata/: a clone alone runs the suite. (The needles are built
    // here so that this file does not match them.)
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let needles = [["..", "shared"].join("/"), ["shared", "fixtures"].join("/")];
    for dir in [
        "mesh",
        "ratls",
        "gateway-client",
        "nginx-compat",
        "tests",
        "fuzz",
    ] {
        for file in sources(&root.join(dir)) {
            if file.components().any(|c| c.as_os_str() == "target") {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(
                !needles.iter().any(|n| text.contains(n.as_str())),
                "{} reads the shared folder beside the repository",
                file.display()
            );
        }
    }
}
