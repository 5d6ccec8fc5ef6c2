//! The attestation policy: what a peer must be running, checked on its verified quote inside the
//! handshake ([`crate::Policy::attested`]). The quote is verified once per certificate: the
//! verdict is cached by the leaf's fingerprint until the certificate or the collateral expires,
//! so a handshake with a known peer costs a hash and a map lookup.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use aws_lc_rs::digest::{digest, SHA256};

use crate::{
    attestation::Attestation,
    quote::{self, Collateral, CollateralSet, QuoteFacts, TdxRoot},
    AppId,
};

/// Most verdicts kept; past it the cache starts afresh (a flood of new certificates costs
/// verifications, never memory).
const MAX_CACHED: usize = 10_000;

/// Pins for one app (federation: each app its own compose files).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AppRules {
    /// Compose hashes (hex) this app may run; empty: the global list.
    pub compose_hashes: BTreeSet<String>,
    /// OS image hashes (hex) it may run; empty: the global list.
    pub os_image_hashes: BTreeSet<String>,
}

/// What a peer's verified quote must show.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Rules {
    /// TCB statuses accepted (`UpToDate`; add `SWHardeningNeeded`, ... deliberately).
    pub tcb_statuses: BTreeSet<String>,
    /// Intel advisories accepted; a quote naming any other is refused.
    pub advisories: BTreeSet<String>,
    /// Compose hashes (hex) accepted; empty: any.
    pub compose_hashes: BTreeSet<String>,
    /// OS image hashes (hex) accepted; empty: any.
    pub os_image_hashes: BTreeSet<String>,
    /// MRTD values (hex) accepted; empty: any.
    pub mrtd: BTreeSet<String>,
    /// RTMR0-2 values (hex) accepted, each; empty: any.
    pub rtmr: [BTreeSet<String>; 3],
    /// Per-app pins, over the global lists.
    pub apps: BTreeMap<AppId, AppRules>,
    /// Take the app id from the measured event log when the certificate carries none (the
    /// simulator's certificates without app-info): only a verified quote vouches for it.
    pub app_id_from_event_log: bool,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            tcb_statuses: BTreeSet::from(["UpToDate".to_owned()]),
            advisories: BTreeSet::new(),
            compose_hashes: BTreeSet::new(),
            os_image_hashes: BTreeSet::new(),
            mrtd: BTreeSet::new(),
            rtmr: Default::default(),
            apps: BTreeMap::new(),
            app_id_from_event_log: false,
        }
    }
}

/// Why a peer's attestation did not satisfy the policy. Each carries a bounded reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestationRejection {
    /// The quote itself did not verify (or no collateral to verify it).
    #[error(transparent)]
    Quote(#[from] quote::QuoteError),
    /// A rule of the policy failed.
    #[error("{rule}: {detail}")]
    Rule {
        /// The rule (`tcb_status`, `compose_hash_not_allowed`, ...).
        rule: &'static str,
        /// What the quote showed.
        detail: String,
    },
}

impl AttestationRejection {
    /// A bounded label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Quote(e) => e.reason(),
            Self::Rule { rule, .. } => rule,
        }
    }

    fn rule(rule: &'static str, detail: impl Into<String>) -> Self {
        Self::Rule {
            rule,
            detail: detail.into(),
        }
    }
}

/// Verifies peers' quotes against collateral and holds them to [`Rules`]. Shared by every
/// policy of a sidecar; the collateral is swapped in as it is refreshed, never fetched here.
pub struct Attestor {
    rules: ArcSwap<Rules>,
    root: TdxRoot,
    collateral: ArcSwap<CollateralSet>,
    verdicts: Mutex<HashMap<[u8; 32], Verdict>>,
}

/// A quote's facts, or why it proves nothing, and until when that stands (unix seconds). A
/// failure is kept only where new collateral cannot change it (a bad signature, a log that
/// does not replay), and only until new collateral arrives: a peer presenting a bad quote
/// costs one verification, not one per handshake.
type Verdict = (Result<Arc<QuoteFacts>, quote::QuoteError>, i64);

impl std::fmt::Debug for Attestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attestor")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

impl Attestor {
    /// An attestor for `rules` under `root`, with no collateral yet (every quote is refused
    /// as `collateral_unavailable` until [`Attestor::set_collateral`]).
    pub fn new(rules: Rules, root: TdxRoot) -> Self {
        Self {
            rules: ArcSwap::from_pointee(rules),
            root,
            collateral: ArcSwap::from_pointee(CollateralSet::default()),
            verdicts: Mutex::new(HashMap::new()),
        }
    }

    /// Use `collateral` for its platform from now on (a refresh); the other platforms' stays;
    /// cached verdicts stand until they expire.
    pub fn set_collateral(&self, collateral: Collateral) {
        let collateral = Arc::new(collateral);
        self.collateral.rcu(|set| {
            let mut set = CollateralSet::clone(set);
            set.insert(collateral.clone());
            set
        });
        self.forget_failures();
    }

    /// Use `set` from now on, for every platform (a directory reloaded).
    pub fn replace_collateral(&self, set: CollateralSet) {
        self.collateral.store(Arc::new(set));
        self.forget_failures();
    }

    /// New collateral: failed quotes get another verification.
    fn forget_failures(&self) {
        let mut verdicts = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        verdicts.retain(|_, (verdict, _)| verdict.is_ok());
    }

    /// The collateral in use, per platform.
    pub fn collateral(&self) -> Arc<CollateralSet> {
        self.collateral.load_full()
    }

    /// The collateral in use for the platform `fmspc`.
    pub fn collateral_for(&self, fmspc: &str) -> Option<Arc<Collateral>> {
        self.collateral.load().get(fmspc).cloned()
    }

    /// The rules in force.
    pub fn rules(&self) -> Arc<Rules> {
        self.rules.load_full()
    }

    /// Hold peers to `rules` from the next handshake on (a reload). Cached verdicts are the
    /// quotes' facts, not the rules' outcome, so every peer meets the new rules at once.
    pub fn set_rules(&self, rules: Rules) {
        self.rules.store(Arc::new(rules));
    }

    /// The facts `attestation` proves for the leaf `leaf_der` (valid until `leaf_not_after`),
    /// held to the rules for `app_id` (`None`: the certificate names none, so the measured one
    /// is taken if the rules allow). Cached by the leaf's fingerprint.
    pub fn check(
        &self,
        leaf_der: &[u8],
        leaf_not_after: i64,
        attestation: &Attestation,
        app_id: Option<&AppId>,
        now: i64,
    ) -> Result<Arc<QuoteFacts>, AttestationRejection> {
        let facts = self.verified(leaf_der, leaf_not_after, attestation, now)?;
        self.apply(&facts, app_id)?;
        Ok(facts)
    }

    /// The facts a quote outside any certificate proves (evidence bundles: the report data
    /// binds a file, not a key), held to the rules for the app its event log measured.
    pub fn check_evidence(
        &self,
        attestation: &Attestation,
        now: i64,
    ) -> Result<Arc<QuoteFacts>, AttestationRejection> {
        let facts = self.verified(&attestation.quote, i64::MAX, attestation, now)?;
        let measured = facts
            .app_id
            .as_deref()
            .and_then(|a| a.parse::<AppId>().ok());
        self.apply(&facts, measured.as_ref())?;
        Ok(facts)
    }

    /// The quote's facts, from the cache (keyed by the SHA-256 of `leaf_der`) or verified now.
    fn verified(
        &self,
        leaf_der: &[u8],
        leaf_not_after: i64,
        attestation: &Attestation,
        now: i64,
    ) -> Result<Arc<QuoteFacts>, AttestationRejection> {
        let mut key = [0u8; 32];
        key.copy_from_slice(digest(&SHA256, leaf_der).as_ref());
        {
            let verdicts = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((verdict, until)) = verdicts.get(&key) {
                if now <= *until {
                    return verdict.clone().map_err(Into::into);
                }
            }
        }
        let set = self.collateral.load();
        if set.is_empty() {
            return Err(quote::QuoteError::Collateral(
                "none loaded yet (PCCS not reached, no directory)".into(),
            )
            .into());
        }
        let collateral = set.for_quote(&attestation.quote)?;
        let verdict = quote::verify(
            attestation,
            collateral,
            &self.root,
            u64::try_from(now).unwrap_or(0),
        )
        .map(Arc::new);
        let until = match &verdict {
            Ok(facts) => leaf_not_after.min(facts.valid_until),
            Err(
                quote::QuoteError::Signature(_)
                | quote::QuoteError::EventLogMismatch
                | quote::QuoteError::Malformed(_),
            ) => leaf_not_after.min(collateral.next_update),
            // Collateral missing or expired: the next collateral decides.
            Err(e) => return Err(e.clone().into()),
        };
        let mut verdicts = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        if verdicts.len() >= MAX_CACHED {
            verdicts.retain(|_, (_, until)| *until >= now);
            if verdicts.len() >= MAX_CACHED {
                verdicts.clear();
            }
        }
        verdicts.insert(key, (verdict.clone(), until));
        verdict.map_err(Into::into)
    }

    /// How many verdicts are cached (tests, the status page).
    pub fn cached(&self) -> usize {
        self.verdicts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// The rules, on verified facts.
    fn apply(
        &self,
        facts: &QuoteFacts,
        app_id: Option<&AppId>,
    ) -> Result<(), AttestationRejection> {
        let r = self.rules.load();
        if !r.tcb_statuses.contains(&facts.tcb_status) {
            return Err(AttestationRejection::rule(
                "tcb_status",
                format!("{} is not accepted", facts.tcb_status),
            ));
        }
        if let Some(a) = facts
            .advisory_ids
            .iter()
            .find(|a| !r.advisories.contains(*a))
        {
            return Err(AttestationRejection::rule(
                "advisory_not_allowed",
                a.clone(),
            ));
        }
        // The app the certificate names must be the app the TEE measured.
        let measured = facts
            .app_id
            .as_deref()
            .and_then(|a| a.parse::<AppId>().ok());
        let app = match (app_id, &measured) {
            (Some(named), Some(measured)) if named != measured => {
                return Err(AttestationRejection::rule(
                    "app_id_not_measured",
                    format!("the certificate says {named}, the event log {measured}"),
                ))
            }
            (Some(named), _) => Some(named.clone()),
            (None, Some(measured)) if r.app_id_from_event_log => Some(measured.clone()),
            (None, _) => None,
        };
        // An app's own pins, where it has some, else the global ones.
        let pins = app.as_ref().and_then(|a| r.apps.get(a));
        let compose = own_or(pins.map(|p| &p.compose_hashes), &r.compose_hashes);
        pinned(
            compose,
            facts.compose_hash.as_deref(),
            "compose_hash_not_allowed",
        )?;
        let os = own_or(pins.map(|p| &p.os_image_hashes), &r.os_image_hashes);
        pinned(os, facts.os_image_hash.as_deref(), "os_image_not_allowed")?;
        pinned(&r.mrtd, Some(&facts.mr_td), "mrtd_not_allowed")?;
        for (i, rule) in [
            "rtmr0_not_allowed",
            "rtmr1_not_allowed",
            "rtmr2_not_allowed",
        ]
        .into_iter()
        .enumerate()
        {
            pinned(&r.rtmr[i], Some(&facts.rtmr[i]), rule)?;
        }
        Ok(())
    }

    /// The app id the measured event log names, when the rules take it from there.
    pub fn measured_app_id(&self, facts: &QuoteFacts) -> Option<AppId> {
        if !self.rules.load().app_id_from_event_log {
            return None;
        }
        facts.app_id.as_deref().and_then(|a| a.parse().ok())
    }
}

/// An app's own list where it has one, else the global one.
fn own_or<'a>(
    own: Option<&'a BTreeSet<String>>,
    global: &'a BTreeSet<String>,
) -> &'a BTreeSet<String> {
    own.filter(|l| !l.is_empty()).unwrap_or(global)
}

/// `value` must be in `allowed`, unless `allowed` is empty.
fn pinned(
    allowed: &BTreeSet<String>,
    value: Option<&str>,
    rule: &'static str,
) -> Result<(), AttestationRejection> {
    if allowed.is_empty() {
        return Ok(());
    }
    match value {
        Some(v) if allowed.iter().any(|a| a.eq_ignore_ascii_case(v)) => Ok(()),
        Some(v) => Err(AttestationRejection::rule(
            rule,
            format!("{v} is not pinned"),
        )),
        None => Err(AttestationRejection::rule(rule, "not measured")),
    }
}
