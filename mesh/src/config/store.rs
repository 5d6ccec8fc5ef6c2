//! `[store]`: where certificates, keys and ACME state are shared. `file` (the default) keeps
//! them in `acme.store` for this instance alone; `etcd` shares them, sealed with the app's key,
//! between every instance of the app, with `acme.store` as each instance's local copy.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{raw::DurationValue, secs, source::Source, Check};

/// Environment variables.
pub mod env {
    /// `file` or `etcd`.
    pub const BACKEND: &[&str] = &["DSTACK_MESH_STORE"];
    /// etcd endpoints, comma-separated.
    pub const ENDPOINTS: &[&str] = &["DSTACK_MESH_ETCD_ENDPOINTS"];
    /// The key prefix.
    pub const PREFIX: &[&str] = &["DSTACK_MESH_ETCD_PREFIX"];
    /// CA of etcd's server certificates.
    pub const CA_FILE: &[&str] = &["DSTACK_MESH_ETCD_CA_FILE"];
    /// Client certificate (mTLS to etcd).
    pub const CERT_FILE: &[&str] = &["DSTACK_MESH_ETCD_CERT_FILE"];
    /// Client key.
    pub const KEY_FILE: &[&str] = &["DSTACK_MESH_ETCD_KEY_FILE"];
}

/// The default key prefix; the app id is appended, so apps sharing a cluster never meet.
pub const DEFAULT_PREFIX: &str = "/dstack-mesh";
/// Default deadline of one etcd request (attempts included).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default lease of an order's lock: a holder that dies frees it this long after.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(15);

/// `[store]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub backend: Option<String>,
    pub endpoints: Option<Vec<String>>,
    pub prefix: Option<String>,
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub timeout: Option<DurationValue>,
    pub lock_ttl: Option<DurationValue>,
}

/// Where certificates and ACME state live.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "backend", rename_all = "snake_case")]
pub enum StoreConfig {
    /// This instance's directory (`acme.store`) alone.
    #[default]
    File,
    /// Shared through etcd by every instance of the app.
    Etcd(EtcdConfig),
}

/// `[store] backend = "etcd"`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EtcdConfig {
    /// Client URLs of the members.
    pub endpoints: Vec<String>,
    /// Key prefix; the app id is appended at start.
    pub prefix: String,
    /// CA of etcd's server certificates.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (mTLS).
    pub cert_file: Option<PathBuf>,
    /// Client key.
    pub key_file: Option<PathBuf>,
    /// One request's deadline.
    #[serde(with = "secs")]
    pub timeout: Duration,
    /// An order lock's lease.
    #[serde(with = "secs")]
    pub lock_ttl: Duration,
}

/// `[store]` and its environment, checked.
pub(super) fn store(raw: Option<&RawStore>, env: &dyn Source, c: &mut Check) -> StoreConfig {
    let raw = raw.cloned().unwrap_or_default();
    let first = |keys: &[&'static str]| super::source::first(env, keys).map(|(_, v)| v);
    let backend = first(env::BACKEND).or(raw.backend.clone());
    match backend.as_deref().map(str::trim) {
        None | Some("file") => {
            let set = raw.endpoints.is_some() || first(env::ENDPOINTS).is_some();
            if set {
                c.fail(
                    "store.endpoints",
                    "etcd endpoints are set but store.backend is not \"etcd\"",
                );
            }
            StoreConfig::File
        }
        Some("etcd") => etcd(raw, &first, c).map_or(StoreConfig::File, StoreConfig::Etcd),
        Some(other) => {
            c.fail(
                "store.backend",
                format!("{other:?} is not a store backend (file or etcd)"),
            );
            StoreConfig::File
        }
    }
}

fn etcd(
    raw: RawStore,
    first: &dyn Fn(&[&'static str]) -> Option<String>,
    c: &mut Check,
) -> Option<EtcdConfig> {
    if !cfg!(feature = "etcd") {
        c.fail(
            "store.backend",
            "this build has no etcd support (build with `--features etcd`, as the image is)",
        );
        return None;
    }
    let endpoints: Vec<String> = match first(env::ENDPOINTS) {
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect(),
        None => raw.endpoints.clone().unwrap_or_default(),
    };
    if endpoints.is_empty() {
        c.fail(
            "store.endpoints",
            "backend \"etcd\" needs at least one endpoint (http://host:2379)",
        );
    }
    let path = |keys: &[&'static str], value: &Option<String>| {
        first(keys).or(value.clone()).map(PathBuf::from)
    };
    let config = EtcdConfig {
        prefix: first(env::PREFIX)
            .or(raw.prefix.clone())
            .unwrap_or_else(|| DEFAULT_PREFIX.to_owned())
            .trim_end_matches('/')
            .to_owned(),
        ca_file: path(env::CA_FILE, &raw.ca_file),
        cert_file: path(env::CERT_FILE, &raw.cert_file),
        key_file: path(env::KEY_FILE, &raw.key_file),
        timeout: c.duration("store.timeout", raw.timeout.as_ref(), DEFAULT_TIMEOUT),
        lock_ttl: c.duration("store.lock_ttl", raw.lock_ttl.as_ref(), DEFAULT_LOCK_TTL),
        endpoints,
    };
    let tls = config.ca_file.is_some() || config.cert_file.is_some();
    for endpoint in &config.endpoints {
        let scheme_ok = match endpoint.split_once("://") {
            Some(("https", rest)) | Some(("http", rest)) => rest.contains(':'),
            _ => false,
        };
        if !scheme_ok {
            c.fail(
                "store.endpoints",
                format!("{endpoint:?} is not http://host:port or https://host:port"),
            );
        } else if tls != endpoint.starts_with("https://") {
            c.fail(
                "store.endpoints",
                format!(
                    "{endpoint:?}: https:// goes with store.ca_file (and cert_file), http:// without"
                ),
            );
        }
    }
    if config.cert_file.is_some() != config.key_file.is_some() {
        c.fail(
            "store.cert_file",
            "a client certificate needs its key (store.key_file), and the other way round",
        );
    }
    if !config.prefix.starts_with('/') || config.prefix.len() < 2 {
        c.fail(
            "store.prefix",
            format!("{:?} must start with / and name something", config.prefix),
        );
    }
    if config.lock_ttl < Duration::from_secs(2) {
        c.fail(
            "store.lock_ttl",
            "at least 2 s (etcd leases count whole seconds)",
        );
    }
    Some(config)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn parse(raw: &str, env: &[(&'static str, &'static str)]) -> Result<StoreConfig, Vec<String>> {
        let raw: RawStore = toml::from_str(raw).unwrap();
        let env: HashMap<&str, &str> = env.iter().copied().collect();
        let mut c = Check { errors: Vec::new() };
        let config = store(Some(&raw), &env, &mut c);
        match c.errors.is_empty() {
            true => Ok(config),
            false => Err(c.errors.into_iter().map(|e| e.to_string()).collect()),
        }
    }

    #[test]
    #[cfg(feature = "etcd")]
    fn file_is_the_default_and_etcd_takes_its_settings_from_the_file_or_the_environment() {
        assert_eq!(parse("", &[]), Ok(StoreConfig::File));
        let Ok(StoreConfig::Etcd(etcd)) = parse(
            "backend = \"etcd\"\nendpoints = [\"http://etcd-1:2379\", \"http://etcd-2:2379\"]\n",
            &[],
        ) else {
            panic!("not etcd");
        };
        assert_eq!(etcd.endpoints.len(), 2);
        assert_eq!(etcd.prefix, DEFAULT_PREFIX);
        assert_eq!(etcd.lock_ttl, DEFAULT_LOCK_TTL);
        let Ok(StoreConfig::Etcd(etcd)) = parse(
            "",
            &[
                ("DSTACK_MESH_STORE", "etcd"),
                (
                    "DSTACK_MESH_ETCD_ENDPOINTS",
                    "https://a:2379, https://b:2379",
                ),
                ("DSTACK_MESH_ETCD_CA_FILE", "/etc/etcd/ca.pem"),
                ("DSTACK_MESH_ETCD_PREFIX", "/fleet/"),
            ],
        ) else {
            panic!("not etcd");
        };
        assert_eq!(etcd.endpoints, ["https://a:2379", "https://b:2379"]);
        assert_eq!(etcd.prefix, "/fleet");
        assert_eq!(etcd.ca_file, Some(PathBuf::from("/etc/etcd/ca.pem")));
    }

    #[test]
    #[cfg(not(feature = "etcd"))]
    fn a_build_without_etcd_says_so() {
        assert_eq!(parse("", &[]), Ok(StoreConfig::File));
        let errors = parse("backend = \"etcd\"\nendpoints = [\"http://e:2379\"]", &[]).unwrap_err();
        assert!(errors[0].contains("no etcd support"), "{errors:?}");
    }

    #[test]
    #[cfg(feature = "etcd")]
    fn mistakes_name_the_setting() {
        for (raw, env, key) in [
            ("backend = \"consul\"", vec![], "store.backend"),
            ("backend = \"etcd\"", vec![], "store.endpoints"),
            ("backend = \"etcd\"\nendpoints = [\"etcd:2379\"]", vec![], "store.endpoints"),
            (
                "backend = \"etcd\"\nendpoints = [\"https://etcd:2379\"]",
                vec![],
                "store.endpoints",
            ),
            (
                "backend = \"etcd\"\nendpoints = [\"https://e:2379\"]\nca_file = \"c\"\ncert_file = \"x\"",
                vec![],
                "store.cert_file",
            ),
            (
                "backend = \"etcd\"\nendpoints = [\"http://e:2379\"]\nprefix = \"x\"",
                vec![],
                "store.prefix",
            ),
            (
                "backend = \"etcd\"\nendpoints = [\"http://e:2379\"]\nlock_ttl = \"1s\"",
                vec![],
                "store.lock_ttl",
            ),
            ("endpoints = [\"http://e:2379\"]", vec![], "store.endpoints"),
            ("", vec![("DSTACK_MESH_STORE", "zookeeper")], "store.backend"),
        ] {
            let errors = parse(raw, &env).unwrap_err();
            assert!(errors.iter().any(|e| e.contains(key)), "{raw}: {errors:?}");
        }
    }
}
