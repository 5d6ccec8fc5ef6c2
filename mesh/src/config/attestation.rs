//! `[attestation]`: verify every peer's TDX quote inside the handshake and hold it to rules
//! (what the peer must be running), with collateral from a directory of PCCS answers.

use std::{collections::BTreeMap, path::PathBuf};

use ratls::{
    attested::{AppRules, Rules},
    AppId,
};
use serde::Deserialize;

use super::Check;

/// `[attestation]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAttestation {
    pub required: Option<bool>,
    pub tdx_root: Option<String>,
    pub collateral_dir: Option<String>,
    pub pccs_url: Option<String>,
    /// One FMSPC, several comma-separated, or a list (a fleet on several CPU models).
    pub fmspc: Option<super::raw::AllowValue>,
    pub tcb_statuses: Option<Vec<String>>,
    pub advisories: Option<Vec<String>>,
    pub compose_hashes: Option<Vec<String>>,
    pub os_image_hashes: Option<Vec<String>>,
    pub mrtd: Option<Vec<String>>,
    pub rtmr0: Option<Vec<String>>,
    pub rtmr1: Option<Vec<String>>,
    pub rtmr2: Option<Vec<String>>,
    pub app_id_from_event_log: Option<bool>,
    pub apps: Option<BTreeMap<String, RawAppRules>>,
}

/// `[attestation.apps.<app id>]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAppRules {
    pub compose_hashes: Option<Vec<String>>,
    pub os_image_hashes: Option<Vec<String>>,
}

/// The attestation policy, when required.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AttestationConfig {
    /// The TDX root (PEM); `None`: Intel's.
    pub tdx_root: Option<PathBuf>,
    /// PCCS answers (`tcb.json`, `qe_identity.json`, `pckcrl.der`, `rootcacrl.hex` with their
    /// `.headers`), for air-gapped setups.
    pub collateral_dir: PathBuf,
    /// Fetch collateral from this PCCS (v4 API) for this FMSPC, cached in `collateral_dir`.
    pub pccs: Option<Pccs>,
    /// What a peer must be running.
    pub rules: Rules,
}

/// A PCCS and the platforms (FMSPCs) whose collateral is kept.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Pccs {
    /// Its base URL (`https://api.trustedservices.intel.com`, or a caching PCCS).
    pub url: String,
    /// The FMSPCs (12 hex digits, lowercase) of the peers' platforms.
    pub fmspcs: Vec<String>,
}

/// TCB statuses Intel's collateral reports.
const TCB_STATUSES: [&str; 7] = [
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
];

/// A standalone policy (`verify-cert --policy FILE`): a configuration's `[attestation]` table,
/// or its keys at the top level. Required is implied; the collateral directory is optional
/// (empty when not given: the command line names the collateral).
pub fn policy_file(text: &str) -> Result<AttestationConfig, super::ConfigErrors> {
    let error = |message: String| {
        super::ConfigErrors(vec![super::ConfigError {
            key: "policy".into(),
            message,
        }])
    };
    let mut table: toml::Table = toml::from_str(text).map_err(|e| error(e.message().into()))?;
    if let Some(toml::Value::Table(inner)) = table.remove("attestation") {
        table = inner;
    }
    let raw: RawAttestation = table
        .try_into()
        .map_err(|e: toml::de::Error| error(e.message().into()))?;
    let mut c = Check { errors: Vec::new() };
    let config = checked(raw, false, &mut c);
    match c.errors.is_empty() {
        true => Ok(config),
        false => Err(super::ConfigErrors(c.errors)),
    }
}

/// `[attestation]`, checked: `None` unless `required = true`.
pub(super) fn attestation(
    raw: Option<&RawAttestation>,
    c: &mut Check,
) -> Option<AttestationConfig> {
    let r = raw.cloned().unwrap_or_default();
    if !r.required.unwrap_or(false) {
        if raw.is_some_and(|r| r.collateral_dir.is_some() || r.compose_hashes.is_some()) {
            c.fail(
                "attestation.required",
                "rules are configured but not required: set required = true to enforce them",
            );
        }
        return None;
    }
    Some(checked(r, true, c))
}

/// The policy `r` describes; a sidecar (`need_dir`) must name its collateral directory.
fn checked(r: RawAttestation, need_dir: bool, c: &mut Check) -> AttestationConfig {
    let hex_list = |c: &mut Check, key: &str, list: Option<Vec<String>>, bytes: usize| {
        let mut out = std::collections::BTreeSet::new();
        for v in list.unwrap_or_default() {
            let v = v.trim().to_ascii_lowercase();
            match hex::decode(&v) {
                Ok(b) if b.len() == bytes => {
                    out.insert(v);
                }
                _ => c.fail(key, format!("{v:?} is not {bytes} bytes of hex")),
            }
        }
        out
    };
    let tcb_statuses: std::collections::BTreeSet<String> = match r.tcb_statuses {
        None => Rules::default().tcb_statuses,
        Some(list) => list.into_iter().collect(),
    };
    for s in &tcb_statuses {
        if !TCB_STATUSES.contains(&s.as_str()) {
            c.fail(
                "attestation.tcb_statuses",
                format!("{s:?} is not one of {}", TCB_STATUSES.join(", ")),
            );
        }
        if s == "Revoked" {
            c.fail(
                "attestation.tcb_statuses",
                "a revoked platform is never accepted",
            );
        }
    }
    let mut apps = BTreeMap::new();
    for (id, rules) in r.apps.unwrap_or_default() {
        let key = format!("attestation.apps.{id}");
        match id.parse::<AppId>() {
            Ok(app) => {
                let pins = AppRules {
                    compose_hashes: hex_list(
                        c,
                        &format!("{key}.compose_hashes"),
                        rules.compose_hashes,
                        32,
                    ),
                    os_image_hashes: hex_list(
                        c,
                        &format!("{key}.os_image_hashes"),
                        rules.os_image_hashes,
                        32,
                    ),
                };
                apps.insert(app, pins);
            }
            Err(e) => c.fail(&key, e.to_string()),
        }
    }
    let collateral_dir = match r.collateral_dir {
        Some(dir) => PathBuf::from(dir),
        None if !need_dir => PathBuf::new(),
        None => {
            c.fail(
                "attestation.collateral_dir",
                "required: a directory of PCCS answers (tcb.json, qe_identity.json, pckcrl.der, rootcacrl.hex)",
            );
            PathBuf::new()
        }
    };
    let pccs = match (r.pccs_url, r.fmspc) {
        (None, None) => None,
        (Some(url), Some(fmspc)) => {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                c.fail(
                    "attestation.pccs_url",
                    format!("{url:?} is not an http(s) URL"),
                );
            }
            let fmspcs: Vec<String> = match fmspc {
                super::raw::AllowValue::Text(t) => t.split(',').map(str::to_owned).collect(),
                super::raw::AllowValue::List(l) => l,
            };
            let mut seen = std::collections::BTreeSet::new();
            for fmspc in &fmspcs {
                let fmspc = fmspc.trim().to_ascii_lowercase();
                if fmspc.len() != 12 || hex::decode(&fmspc).is_err() {
                    c.fail(
                        "attestation.fmspc",
                        format!("{fmspc:?} is not 6 bytes of hex"),
                    );
                }
                seen.insert(fmspc);
            }
            if seen.is_empty() {
                c.fail("attestation.fmspc", "names no platform");
            }
            Some(Pccs {
                url,
                fmspcs: seen.into_iter().collect(),
            })
        }
        (Some(_), None) => {
            c.fail(
                "attestation.fmspc",
                "required with pccs_url: the platform whose collateral to keep",
            );
            None
        }
        (None, Some(_)) => {
            c.fail("attestation.pccs_url", "required with fmspc");
            None
        }
    };
    AttestationConfig {
        tdx_root: r.tdx_root.map(PathBuf::from),
        collateral_dir,
        pccs,
        rules: Rules {
            tcb_statuses,
            advisories: r.advisories.unwrap_or_default().into_iter().collect(),
            compose_hashes: hex_list(c, "attestation.compose_hashes", r.compose_hashes, 32),
            os_image_hashes: hex_list(c, "attestation.os_image_hashes", r.os_image_hashes, 32),
            mrtd: hex_list(c, "attestation.mrtd", r.mrtd, 48),
            rtmr: [
                hex_list(c, "attestation.rtmr0", r.rtmr0, 48),
                hex_list(c, "attestation.rtmr1", r.rtmr1, 48),
                hex_list(c, "attestation.rtmr2", r.rtmr2, 48),
            ],
            apps,
            app_id_from_event_log: r.app_id_from_event_log.unwrap_or(false),
        },
    }
}
