//! CAA (RFC 8659, RFC 8657): would the CA be allowed to issue this name to this account with
//! this challenge? Checked before ordering so the error names the record, instead of the
//! CA's generic refusal after a full order.

use super::{Data, Record};

/// The value of an `issue` / `issuewild` property: `domain; key=value; …`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssueValue {
    /// The CA's domain; empty forbids every CA.
    pub domain: String,
    /// Parameters (`accounturi`, `validationmethods`, …) in order.
    pub params: Vec<(String, String)>,
}

impl IssueValue {
    /// Parse the RFC 8659 §4.2 grammar, tolerating spaces around `;` and `=`.
    pub fn parse(text: &str) -> Result<Self, BadParameter> {
        let mut parts = text.split(';');
        let domain = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let mut params = Vec::new();
        for p in parts.map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = p.split_once('=') else {
                return Err(BadParameter(p.to_owned()));
            };
            params.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        Ok(Self { domain, params })
    }

    fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value as written in a record.
    pub fn render(&self) -> String {
        let mut out = self.domain.clone();
        for (k, v) in &self.params {
            out.push_str(&format!("; {k}={v}"));
        }
        out
    }
}

/// Who is asking: the CA's identities (empty when unknown), our account, the method.
#[derive(Debug)]
pub struct Request<'a> {
    /// `caaIdentities` of the CA.
    pub identities: &'a [String],
    /// Our account URL.
    pub account: Option<&'a str>,
    /// `dns-01`, `http-01` or `tls-alpn-01`.
    pub method: &'a str,
}

const KNOWN_TAGS: &[&str] = &[
    "issue",
    "issuewild",
    "iodef",
    "issuemail",
    "issuevmc",
    "contactemail",
    "contactphone",
];

/// A CAA `issue`/`issuewild` parameter that is not `key=value` (RFC 8659 §4.2).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("CAA parameter {0:?} is not key=value")]
pub struct BadParameter(pub String);

/// Why the CAA set at a name forbids this request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Forbidden {
    /// A critical property no CA understands forbids every CA (RFC 8659 §4.1).
    #[error("CAA record `{record}` has a critical property no CA understands: no CA may issue for {name}")]
    UnknownCritical {
        /// The record.
        record: String,
        /// The name asked for.
        name: String,
    },
    /// No relevant record lets this request through.
    #[error("CAA forbids issuing {name} here: {}", join(refusals))]
    Refused {
        /// The name asked for.
        name: String,
        /// Each relevant record and why it refuses.
        refusals: Vec<Refusal>,
    },
}

/// One relevant record and why it does not admit this request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{record}` {why}")]
pub struct Refusal {
    /// The record.
    pub record: String,
    /// Why.
    pub why: Why,
}

/// Why one CAA record does not admit this request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Why {
    /// Its value does not parse.
    #[error(transparent)]
    Unparsable(#[from] BadParameter),
    /// An empty issuer: no CA may issue.
    #[error("forbids every CA")]
    ForbidsAll,
    /// It names another CA.
    #[error("names another CA ({named}; this CA is {ours})")]
    OtherCa {
        /// The CA it names.
        named: String,
        /// Our CA's identities.
        ours: String,
    },
    /// It pins another ACME account (RFC 8657 `accounturi`).
    #[error("pins another ACME account ({pinned}; ours is {ours})")]
    OtherAccount {
        /// The account it pins.
        pinned: String,
        /// Ours, or "not registered yet".
        ours: String,
    },
    /// It allows other validation methods only (RFC 8657 `validationmethods`).
    #[error("allows only {allowed} (this domain uses {ours})")]
    OtherMethod {
        /// What it allows.
        allowed: String,
        /// Ours.
        ours: String,
    },
}

fn join(refusals: &[Refusal]) -> String {
    refusals
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Judge the relevant CAA set for `name` (`*.` for a wildcard): `Ok` when some record lets
/// this request through (or none restricts it), else why, naming each record.
pub fn evaluate(name: &str, set: &[Record], req: &Request<'_>) -> Result<(), Forbidden> {
    let caa: Vec<(&Record, bool, &str, &str)> = set
        .iter()
        .filter_map(|r| match &r.data {
            Data::Caa {
                critical,
                tag,
                value,
            } => Some((r, *critical, tag.as_str(), value.as_str())),
            _ => None,
        })
        .collect();
    if let Some((r, ..)) = caa.iter().find(|(_, critical, tag, _)| {
        *critical && !KNOWN_TAGS.contains(&tag.to_ascii_lowercase().as_str())
    }) {
        return Err(Forbidden::UnknownCritical {
            record: r.to_string(),
            name: name.to_owned(),
        });
    }
    let wildcard = name.starts_with("*.");
    let has = |t: &str| caa.iter().any(|(_, _, tag, _)| tag.eq_ignore_ascii_case(t));
    let tag = match wildcard && has("issuewild") {
        true => "issuewild",
        false => "issue",
    };
    let relevant: Vec<_> = caa
        .iter()
        .filter(|(_, _, t, _)| t.eq_ignore_ascii_case(tag))
        .collect();
    if relevant.is_empty() {
        return Ok(());
    }
    let mut refusals = Vec::new();
    for (record, _, _, value) in relevant {
        let why = match IssueValue::parse(value) {
            Err(e) => Why::Unparsable(e),
            Ok(v) if v.domain.is_empty() => Why::ForbidsAll,
            Ok(v) => {
                let ca_ok = req.identities.is_empty() || req.identities.contains(&v.domain);
                let account_ok = match (v.param("accounturi"), req.account) {
                    (Some(pinned), Some(ours)) => pinned == ours,
                    (Some(_), None) => false,
                    (None, _) => true,
                };
                let method_ok = v.param("validationmethods").is_none_or(|m| {
                    m.split(',')
                        .any(|x| x.trim().eq_ignore_ascii_case(req.method))
                });
                match (ca_ok, account_ok, method_ok) {
                    (true, true, true) => return Ok(()),
                    (false, ..) => Why::OtherCa {
                        named: v.domain.clone(),
                        ours: req.identities.join(", "),
                    },
                    (_, false, _) => Why::OtherAccount {
                        pinned: v.param("accounturi").unwrap_or_default().to_owned(),
                        ours: req.account.unwrap_or("not registered yet").to_owned(),
                    },
                    (.., false) => Why::OtherMethod {
                        allowed: v.param("validationmethods").unwrap_or_default().to_owned(),
                        ours: req.method.to_owned(),
                    },
                }
            }
        };
        refusals.push(Refusal {
            record: record.to_string(),
            why,
        });
    }
    Err(Forbidden::Refused {
        name: name.to_owned(),
        refusals,
    })
}

#[cfg(test)]
mod tests;
