//! Headless Chromium (Debian's `chromium`) for pages the sidecar serves: the DOM after the
//! page's scripts ran, and screenshots. Each run gets its own profile directory.

use std::{path::Path, process::Command, time::Duration};

use crate::program;

/// Flags for a quiet, sandbox-less headless run (as in CI containers).
const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--no-first-run",
];
/// A run that takes longer than this is a failure, not a wait.
const LIMIT: Duration = Duration::from_secs(90);

fn run(profile: &Path, args: &[String]) -> std::process::Output {
    let mut cmd = Command::new(program("chromium"));
    cmd.args(FLAGS)
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .env("HOME", profile);
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start chromium (scripts/setup-test-deps installs it)");
    let end = std::time::Instant::now() + LIMIT;
    loop {
        if let Some(_status) = child.try_wait().expect("wait for chromium") {
            return child.wait_with_output().expect("chromium output");
        }
        if std::time::Instant::now() > end {
            let _ = child.kill();
            let out = child.wait_with_output().expect("chromium output");
            panic!(
                "chromium ran longer than {LIMIT:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The page's DOM once it has loaded and its scripts have run.
pub fn dump_dom(profile: &Path, url: &str) -> String {
    dump_dom_with(profile, url, &[])
}

/// [`dump_dom`] with more flags (`--host-resolver-rules=...`, say).
pub fn dump_dom_with(profile: &Path, url: &str, flags: &[&str]) -> String {
    let mut args: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    args.extend(["--dump-dom".into(), url.into()]);
    let out = run(profile, &args);
    assert!(
        out.status.success(),
        "chromium --dump-dom {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A PNG of the page at `width`×`height` CSS pixels, written to `path`.
pub fn screenshot(profile: &Path, url: &str, path: &Path, (width, height): (u32, u32)) {
    let out = run(
        profile,
        &[
            format!("--screenshot={}", path.display()),
            format!("--window-size={width},{height}"),
            url.into(),
        ],
    );
    let png = std::fs::read(path).unwrap_or_default();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "chromium wrote no PNG to {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}
