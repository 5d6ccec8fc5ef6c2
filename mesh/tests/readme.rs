//! The README's configuration reference states the defaults the code has: the block is loaded
//! as a configuration and must equal the empty configuration, except for the few values it
//! shows as examples on purpose.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;

use dstack_mesh::config::Config;

/// The `toml` code blocks of the README, in order.
fn toml_blocks() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```toml") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), text) => {
                block.push_str(text);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

fn effective(text: &str) -> serde_json::Value {
    let config = Config::from_toml(text, &HashMap::<&str, &str>::new())
        .unwrap_or_else(|e| panic!("the README's block does not load: {e}\n{text}"));
    serde_json::to_value(&config).unwrap()
}

#[test]
fn the_configuration_reference_states_the_defaults() {
    let block = toml_blocks()
        .into_iter()
        .find(|b| b.contains("[inbound]") && b.contains("[outbound]"))
        .expect("the README's configuration reference");
    let mut documented = effective(&block);
    let mut defaults = effective("");
    // Shown as examples, not defaults (the text around the block says what the defaults are).
    for (section, key) in [
        ("inbound", "allow"),
        ("auth", "allow"),
        ("agent", "address"),
    ] {
        documented[section][key] = serde_json::Value::Null;
        defaults[section][key] = serde_json::Value::Null;
    }
    documented["gateway_domain"] = serde_json::Value::Null;
    defaults["gateway_domain"] = serde_json::Value::Null;
    for (section, value) in defaults.as_object().unwrap() {
        assert_eq!(
            &documented[section], value,
            "README's [{section}] differs from the code's defaults"
        );
    }
}
