//! Where raw settings come from besides the file: the environment, read in one place.

use std::collections::HashMap;

/// A source of string settings by name. Tests use a `HashMap`, never `std::env::set_var`.
pub trait Source {
    /// The value of `key`, if set and not empty.
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Env;

impl Source for Env {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.trim().is_empty())
    }
}

impl Source for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key)
            .cloned()
            .filter(|v| !v.trim().is_empty())
    }
}

impl Source for HashMap<&str, &str> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key)
            .map(|v| (*v).to_owned())
            .filter(|v| !v.trim().is_empty())
    }
}

/// The first of `keys` that is set, with its name (for error messages).
pub fn first(source: &dyn Source, keys: &[&'static str]) -> Option<(&'static str, String)> {
    keys.iter().find_map(|k| source.get(k).map(|v| (*k, v)))
}
