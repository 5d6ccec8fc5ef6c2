//! Evidence that the certificates were obtained inside the TEE, in dstack-ingress's format:
//! `acme-account.json`, `cert-<domain>.pem`, `sha256sum.txt` (`sha256sum` lines over those) and
//! `quote.json` (the guest agent's `GetQuote` whose report data is the SHA-256 of
//! `sha256sum.txt`, zero-padded to 64 bytes). Rewritten whenever a certificate changes; served
//! at `https://<domain>/evidences/`; checked by `dstack-mesh evidence verify`.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use ratls::{agent::AgentClient, attestation::Attestation, attested::Attestor};

use super::store::{CertStore, DirStore};

/// The checksum list.
pub const SUMS: &str = "sha256sum.txt";
/// The quote over the checksum list.
pub const QUOTE: &str = "quote.json";
/// The ACME account(s) the certificates were ordered with.
pub const ACCOUNT: &str = "acme-account.json";

/// The file name of a domain's certificate (`*.` becomes `_wildcard.`).
pub fn cert_file(domain: &str) -> String {
    match domain.strip_prefix("*.") {
        Some(base) => format!("cert-_wildcard.{base}.pem"),
        None => format!("cert-{domain}.pem"),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref())
}

/// The evidence directory and the agent that quotes it.
pub struct Evidence {
    files: DirStore,
    location: String,
    agent: AgentClient,
    /// One writer at a time: a rewrite is files, then their sums, then the quote.
    writing: tokio::sync::Mutex<()>,
    /// What is served: the names in the current `sha256sum.txt`, plus it and the quote.
    listed: std::sync::RwLock<Vec<String>>,
}

impl std::fmt::Debug for Evidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Evidence")
            .field("dir", &self.location)
            .finish_non_exhaustive()
    }
}

impl Evidence {
    /// Evidence kept in `dir`, quoted by `agent`.
    pub fn new(dir: &Path, agent: AgentClient) -> Arc<Self> {
        let files = DirStore::new(dir);
        let listed = files
            .read(SUMS)
            .ok()
            .flatten()
            .map(|sums| listing(&String::from_utf8_lossy(&sums)))
            .unwrap_or_default();
        Arc::new(Self {
            location: dir.display().to_string(),
            files,
            agent,
            writing: tokio::sync::Mutex::new(()),
            listed: std::sync::RwLock::new(listed),
        })
    }

    /// Write `account` and the certificates, their sums and a fresh quote over the sums.
    pub async fn write(
        &self,
        account: &serde_json::Value,
        certs: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let _one = self.writing.lock().await;
        let mut files: Vec<(String, Vec<u8>)> = vec![(
            ACCOUNT.to_owned(),
            serde_json::to_vec_pretty(account).map_err(|e| e.to_string())?,
        )];
        for (domain, pem) in certs {
            files.push((cert_file(domain), pem.clone().into_bytes()));
        }
        let mut sums = String::new();
        for (name, bytes) in &files {
            self.files
                .write(name, bytes, false)
                .map_err(|e| e.to_string())?;
            sums.push_str(&format!("{}  {name}\n", sha256_hex(bytes)));
        }
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, sums.as_bytes());
        let quote = self
            .agent
            .get_quote(digest.as_ref())
            .await
            .map_err(|e| format!("GetQuote: {e}"))?;
        let quote = serde_json::to_vec_pretty(&quote).map_err(|e| e.to_string())?;
        // The quote goes last: a reader that sees the new sums before it sees a mismatch, never
        // a quote over files that are not there yet.
        self.files
            .write(SUMS, sums.as_bytes(), false)
            .and_then(|()| self.files.write(QUOTE, &quote, false))
            .map_err(|e| e.to_string())?;
        if let Ok(mut listed) = self.listed.write() {
            *listed = listing(&sums);
        }
        Ok(())
    }

    /// The files served, in order.
    pub fn listed(&self) -> Vec<String> {
        self.listed.read().map(|l| l.clone()).unwrap_or_default()
    }

    /// A served file's bytes; `None` for anything not listed.
    pub fn read(&self, name: &str) -> Option<Vec<u8>> {
        if !self.listed().iter().any(|n| n == name) {
            return None;
        }
        self.files.read(name).ok().flatten()
    }
}

impl Evidence {
    /// The answer to `path` on a public domain: the listing at `/evidences/`, a file below it;
    /// `None` for paths that belong to the app.
    pub fn answer(&self, path: &str) -> Option<http::Response<crate::proxy::Body>> {
        use http::{header, HeaderValue, StatusCode};
        let rest = path.strip_prefix("/evidences")?;
        let name = match rest {
            "" | "/" => None,
            r if r.starts_with('/') => Some(&r[1..]),
            _ => return None,
        };
        let Some(name) = name else {
            let links: String = self
                .listed()
                .iter()
                .map(|n| format!("<li><a href=\"{n}\">{n}</a></li>\n"))
                .collect();
            let page = format!(
                "<!doctype html>\n<title>evidences</title>\n<h1>Evidence</h1>\n\
                 <p>Certificates obtained inside the TEE: check with <code>dstack-mesh evidence verify</code>.</p>\n<ul>\n{links}</ul>\n"
            );
            let mut resp = http::Response::new(crate::proxy::full(page));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            return Some(resp);
        };
        let Some(bytes) = self.read(name) else {
            return Some(crate::proxy::text_response(
                StatusCode::NOT_FOUND,
                "no such evidence file\n",
            ));
        };
        let kind = match name.rsplit('.').next() {
            Some("json") => "application/json",
            Some("pem") => "application/x-pem-file",
            _ => "text/plain; charset=utf-8",
        };
        let mut resp = http::Response::new(crate::proxy::full(bytes));
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
        Some(resp)
    }
}

fn listing(sums: &str) -> Vec<String> {
    let mut names: Vec<String> = parse_sums(sums).into_iter().map(|(_, n)| n).collect();
    names.push(SUMS.to_owned());
    names.push(QUOTE.to_owned());
    names
}

/// `sha256sum` lines: `<hex>  <name>` (or `<hex> *<name>`).
pub fn parse_sums(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let (hash, name) = line.split_once(' ')?;
            let name = name.trim_start_matches([' ', '*']);
            let plain = !name.is_empty() && !name.contains('/') && !name.starts_with('.');
            (hash.len() == 64 && plain).then(|| (hash.to_ascii_lowercase(), name.to_owned()))
        })
        .collect()
}

/// One finding of `evidence verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Checked and right.
    Ok(String),
    /// Checked and wrong.
    Failed(String),
    /// Could not be checked here, and why.
    NotChecked(String),
}

/// Check evidence files fetched by `get` (a directory or a URL): every listed file against its
/// sum, the quote's report data against the sums, and, with `attested` (an attestor holding
/// collateral, and the time), the quote itself: its signature, TCB status, event log and the
/// attestor's rules.
pub fn verify(
    get: &mut dyn FnMut(&str) -> Result<Vec<u8>, String>,
    attested: Option<(&Attestor, i64)>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let sums = match get(SUMS) {
        Ok(s) => s,
        Err(e) => return vec![Finding::Failed(format!("{SUMS}: {e}"))],
    };
    let entries = parse_sums(&String::from_utf8_lossy(&sums));
    if entries.is_empty() {
        out.push(Finding::Failed(format!("{SUMS} lists no file")));
    }
    for (hash, name) in &entries {
        match get(name) {
            Ok(bytes) if sha256_hex(&bytes) == *hash => {
                out.push(Finding::Ok(format!("{name}: SHA-256 matches {SUMS}")));
            }
            Ok(_) => out.push(Finding::Failed(format!(
                "{name}: SHA-256 differs from {SUMS}: the file was changed"
            ))),
            Err(e) => out.push(Finding::Failed(format!("{name}: {e}"))),
        }
    }
    let expected = {
        let mut data = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &sums)
            .as_ref()
            .to_vec();
        data.resize(64, 0);
        data
    };
    let quote = get(QUOTE).and_then(|bytes| {
        serde_json::from_slice::<ratls::agent::QuoteResponse>(&bytes)
            .map_err(|e| format!("not a GetQuote answer: {e}"))
    });
    match quote {
        Err(e) => out.push(Finding::Failed(format!("{QUOTE}: {e}"))),
        Ok(q) => match hex::decode(q.quote.trim_start_matches("0x")) {
            Err(_) => out.push(Finding::Failed(format!("{QUOTE}: the quote is not hex"))),
            Ok(raw) => {
                match ratls::attestation::quote_report_data(&raw) {
                    Some(rd) if rd == expected.as_slice() => out.push(Finding::Ok(format!(
                        "{QUOTE}: the quote's report data is the SHA-256 of {SUMS}"
                    ))),
                    Some(rd) => out.push(Finding::Failed(format!(
                        "{QUOTE}: the quote's report data ({}) is not the SHA-256 of {SUMS} ({})",
                        hex::encode(rd),
                        hex::encode(&expected)
                    ))),
                    None => out.push(Finding::Failed(format!(
                        "{QUOTE}: not a TDX quote (v4, or v5 with a TD report) that carries report data"
                    ))),
                }
                // The signature section follows the 632 bytes of header and report body.
                let signed = raw.len() > 636;
                out.push(match (signed, attested) {
                    (false, _) => Finding::NotChecked(
                        "the quote carries no signature: it comes from a development agent and \
                         proves nothing about a TEE"
                            .into(),
                    ),
                    (true, None) => Finding::NotChecked(
                        "the quote's signature, TCB status and measurements: give --collateral DIR \
                         or --pccs URL (and --policy FILE for the measurements to expect)"
                            .into(),
                    ),
                    (true, Some((attestor, now))) => quote_finding(&q, attestor, now),
                });
            }
        },
    }
    out
}

/// The quote of `q` verified by `attestor` at `now`, as a finding.
fn quote_finding(q: &ratls::agent::QuoteResponse, attestor: &Attestor, now: i64) -> Finding {
    let attestation = match Attestation::from_get_quote(&q.quote, &q.event_log) {
        Ok(a) => a,
        Err(e) => return Finding::Failed(format!("{QUOTE}: {e}")),
    };
    match attestor.check_evidence(&attestation, now) {
        Ok(facts) => Finding::Ok(format!(
            "{QUOTE}: the quote verifies (TCB {}), its event log replays to RTMR3 and meets the \
             policy: app {}, compose hash {}, OS image {}",
            facts.tcb_status,
            facts.app_id.as_deref().unwrap_or("(none measured)"),
            facts.compose_hash.as_deref().unwrap_or("(none measured)"),
            facts.os_image_hash.as_deref().unwrap_or("(none measured)"),
        )),
        Err(r) => Finding::Failed(format!("{QUOTE}: refused ({}): {r}", r.reason())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_parse_as_sha256sum_writes_them() {
        let h = "a".repeat(64);
        let text = format!(
            "{h}  cert-a.example.pem\n{h} *acme-account.json\nbad line\n{h}  ../etc/passwd\n"
        );
        assert_eq!(
            parse_sums(&text),
            [
                (h.clone(), "cert-a.example.pem".into()),
                (h, "acme-account.json".into())
            ]
        );
        assert_eq!(cert_file("*.example.com"), "cert-_wildcard.example.com.pem");
    }

    #[test]
    fn verify_reports_each_check() {
        let account = b"{}".to_vec();
        let cert = b"-----BEGIN CERTIFICATE-----\n".to_vec();
        let sums = format!(
            "{}  acme-account.json\n{}  cert-a.example.pem\n",
            sha256_hex(&account),
            sha256_hex(&cert)
        );
        let mut rd = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, sums.as_bytes())
            .as_ref()
            .to_vec();
        rd.resize(64, 0);
        // The shape the development agent produces: a TDX v4 header, the report body, no
        // signature.
        let mut quote = vec![0u8; 636];
        quote[0..2].copy_from_slice(&4u16.to_le_bytes());
        quote[4..8].copy_from_slice(&0x81u32.to_le_bytes());
        quote[568..632].copy_from_slice(&rd);
        let quote_json = serde_json::json!({
            "quote": hex::encode(&quote), "event_log": "[]", "report_data": hex::encode(&rd), "vm_config": "{}"
        })
        .to_string();
        let files = |cert: Vec<u8>| {
            let sums = sums.clone();
            let (account, quote_json) = (account.clone(), quote_json.clone());
            move |name: &str| -> Result<Vec<u8>, String> {
                match name {
                    SUMS => Ok(sums.clone().into_bytes()),
                    QUOTE => Ok(quote_json.clone().into_bytes()),
                    ACCOUNT => Ok(account.clone()),
                    "cert-a.example.pem" => Ok(cert.clone()),
                    other => Err(format!("no {other}")),
                }
            }
        };
        let good = verify(&mut files(cert.clone()), None);
        assert!(
            !good.iter().any(|f| matches!(f, Finding::Failed(_))),
            "{good:?}"
        );
        assert!(good
            .iter()
            .any(|f| matches!(f, Finding::NotChecked(m) if m.contains("development agent"))));
        let mut altered = cert.clone();
        altered.push(b'x');
        let bad = verify(&mut files(altered), None);
        assert!(
            bad.contains(&Finding::Failed(
                "cert-a.example.pem: SHA-256 differs from sha256sum.txt: the file was changed"
                    .into()
            )),
            "{bad:?}"
        );
    }
}
