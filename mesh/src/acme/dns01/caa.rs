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
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = text.split(';');
        let domain = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let mut params = Vec::new();
        for p in parts.map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = p.split_once('=') else {
                return Err(format!("CAA parameter {p:?} is not key=value"));
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

/// Judge the relevant CAA set for `name` (`*.` for a wildcard): `Ok` when some record lets
/// this request through (or none restricts it), else why, naming each record.
pub fn evaluate(name: &str, set: &[Record], req: &Request<'_>) -> Result<(), String> {
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
        return Err(format!(
            "CAA record `{r}` has a critical property no CA understands: no CA may issue for {name}"
        ));
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
    let mut reasons = Vec::new();
    for (record, _, _, value) in relevant {
        let why = match IssueValue::parse(value) {
            Err(e) => e,
            Ok(v) if v.domain.is_empty() => "forbids every CA".to_owned(),
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
                    (false, ..) => format!(
                        "names another CA ({}; this CA is {})",
                        v.domain,
                        req.identities.join(", ")
                    ),
                    (_, false, _) => format!(
                        "pins another ACME account ({}; ours is {})",
                        v.param("accounturi").unwrap_or_default(),
                        req.account.unwrap_or("not registered yet")
                    ),
                    (.., false) => format!(
                        "allows only {} (this domain uses {})",
                        v.param("validationmethods").unwrap_or_default(),
                        req.method
                    ),
                }
            }
        };
        reasons.push(format!("`{record}` {why}"));
    }
    Err(format!(
        "CAA forbids issuing {name} here: {}",
        reasons.join("; ")
    ))
}

#[cfg(test)]
mod tests;
