//! ACME Renewal Information (RFC 9773) and what else a directory says beyond its URLs: the
//! CA's suggested renewal window for each certificate, fetched with a plain GET of
//! `<renewalInfo>/<base64url(AKI keyIdentifier)>.<base64url(serial)>`, asked again after its
//! `Retry-After`; the profiles it offers (`meta.profiles`); its CAA identities.

use std::time::{Duration, SystemTime};

use super::client::{AcmeClient, IssueError};

/// `Retry-After` is kept within these bounds (RFC 9773 §4.3.2: a minute to a day); the
/// floor is lowered to `acme.retry_min` when that is shorter.
pub const RETRY_MIN: Duration = Duration::from_secs(60);
const RETRY_MAX: Duration = Duration::from_secs(86400);
/// Without `Retry-After`, or after a long-term failure (a 4xx), ask again after this.
pub const RETRY_LONG: Duration = Duration::from_secs(6 * 3600);

/// What a directory says beyond the protocol's URLs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirectoryMeta {
    /// `renewalInfo`: the CA speaks ARI.
    pub renewal_info: Option<String>,
    /// `meta.profiles`' names.
    pub profiles: Vec<String>,
    /// `meta.caaIdentities`, lowercase.
    pub caa_identities: Vec<String>,
}

impl DirectoryMeta {
    /// From a directory object.
    pub fn read(dir: &serde_json::Value) -> Self {
        Self {
            renewal_info: dir["renewalInfo"]
                .as_str()
                .map(|u| u.trim_end_matches('/').to_owned()),
            profiles: dir
                .pointer("/meta/profiles")
                .and_then(serde_json::Value::as_object)
                .map(|p| p.keys().cloned().collect())
                .unwrap_or_default(),
            caa_identities: dir
                .pointer("/meta/caaIdentities")
                .and_then(serde_json::Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_ascii_lowercase))
                .collect(),
        }
    }
}

/// The CA's suggested renewal window.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    /// Renew no earlier (Unix seconds).
    pub start: u64,
    /// Renew no later (Unix seconds).
    pub end: u64,
    /// Why, when the CA says (a revocation notice).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub explanation: Option<String>,
}

impl Window {
    /// Its start.
    pub fn start_time(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.start)
    }

    /// Its end.
    pub fn end_time(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.end)
    }
}

/// A renewal-information answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Suggestion {
    /// The window, and when to ask again.
    Window(Window, Duration),
    /// The directory has no `renewalInfo`.
    Unsupported,
}

/// Why no window came back.
#[derive(Debug, thiserror::Error)]
pub enum AriError {
    /// The CA could not be asked.
    #[error(transparent)]
    Ca(#[from] IssueError),
    /// It answered an error status (a 404 for a certificate it does not know, a 5xx).
    #[error("renewalInfo answered {0}")]
    Status(http::StatusCode),
    /// The answer is not a window.
    #[error("renewalInfo answer unusable: {0}")]
    Malformed(String),
    /// The certificate has no authority key identifier to name it by.
    #[error("the certificate cannot be named for renewalInfo: {0}")]
    CertId(String),
}

impl AriError {
    /// When to ask again after this failure: soon for a server error (`failures` in a row,
    /// doubling from `floor`), else after [`RETRY_LONG`].
    pub fn retry_after(&self, failures: u32, floor: Duration) -> Duration {
        let backoff = || {
            floor
                .saturating_mul(1 << failures.saturating_sub(1).min(10))
                .min(RETRY_LONG)
        };
        match self {
            Self::Status(s) if s.is_server_error() => backoff(),
            Self::Ca(IssueError::Unreachable(_) | IssueError::Server(_)) => backoff(),
            _ => RETRY_LONG,
        }
    }
}

/// The RFC 9773 identifier of a certificate (DER).
pub fn cert_id(leaf: &[u8]) -> Result<instant_acme::CertificateIdentifier<'static>, String> {
    let der = rustls_pki_types::CertificateDer::from(leaf);
    instant_acme::CertificateIdentifier::try_from(&der).map(|id| id.into_owned())
}

/// `Retry-After` as a wait: seconds or an HTTP date; bounded (RFC 9773 §4.3.2) between
/// `floor` and a day.
pub(crate) fn retry_after(value: Option<&str>, now: SystemTime, floor: Duration) -> Duration {
    let Some(v) = value.map(str::trim) else {
        return RETRY_LONG;
    };
    let wait = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => match httpdate(v) {
            Some(t) => t.duration_since(now).unwrap_or_default(),
            None => RETRY_LONG,
        },
    };
    wait.clamp(floor, RETRY_MAX)
}

/// The wait a refusal's `Retry-After` header asks for (at least a second, at most a day), if
/// it has one: a rate-limited CA or DNS API.
pub(crate) fn retry_after_header(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get(http::header::RETRY_AFTER)?;
    Some(retry_after(
        value.to_str().ok(),
        SystemTime::now(),
        Duration::from_secs(1),
    ))
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn httpdate(v: &str) -> Option<SystemTime> {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let t = time::PrimitiveDateTime::parse(v, &format)
        .ok()?
        .assume_utc();
    u64::try_from(t.unix_timestamp())
        .ok()
        .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
}

fn rfc3339(v: &str) -> Option<u64> {
    let t = time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp()).ok()
}

/// A `renewalInfo` body as a window (start before end).
pub fn window(body: &[u8]) -> Result<Window, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let w = &v["suggestedWindow"];
    let (Some(start), Some(end)) = (
        w["start"].as_str().and_then(rfc3339),
        w["end"].as_str().and_then(rfc3339),
    ) else {
        return Err(format!("no suggestedWindow start and end in {v}"));
    };
    if end <= start {
        return Err(format!("the window ends before it starts: {v}"));
    }
    Ok(Window {
        start,
        end,
        explanation: v["explanationURL"].as_str().map(str::to_owned),
    })
}

impl AcmeClient {
    /// The CA's suggested renewal window for `leaf` (DER), and when to ask again (not before
    /// `floor`).
    pub async fn renewal_info(&self, leaf: &[u8], floor: Duration) -> Result<Suggestion, AriError> {
        let meta = self.meta().await?;
        let Some(base) = &meta.renewal_info else {
            return Ok(Suggestion::Unsupported);
        };
        let id = cert_id(leaf).map_err(AriError::CertId)?;
        let (status, retry, body) = self.get(&format!("{base}/{id}")).await?;
        if !status.is_success() {
            return Err(AriError::Status(status));
        }
        let w = window(&body).map_err(AriError::Malformed)?;
        Ok(Suggestion::Window(
            w,
            retry_after(retry.as_deref(), SystemTime::now(), floor),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_retry_after_read_as_rfc_9773_writes_them() {
        let w = window(br#"{"suggestedWindow": {"start": "2025-01-02T04:00:00Z", "end": "2025-01-03T04:00:00Z"}, "explanationURL": "https://acme.example.com/docs/ari"}"#).unwrap();
        assert_eq!(w.end - w.start, 86400);
        assert_eq!(
            w.explanation.as_deref(),
            Some("https://acme.example.com/docs/ari")
        );
        assert!(window(br#"{"suggestedWindow": {"start": "2025-01-03T04:00:00Z", "end": "2025-01-02T04:00:00Z"}}"#).is_err());
        assert!(window(b"{}").is_err());
        assert!(window(b"<html>").is_err());
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(
            retry_after(Some("21600"), now, RETRY_MIN),
            Duration::from_secs(21600)
        );
        assert_eq!(
            retry_after(Some("1"), now, RETRY_MIN),
            RETRY_MIN,
            "clamped up"
        );
        assert_eq!(
            retry_after(Some("9999999"), now, RETRY_MIN),
            RETRY_MAX,
            "clamped down"
        );
        assert_eq!(retry_after(None, now, RETRY_MIN), RETRY_LONG);
        assert_eq!(
            retry_after(
                Some("Sun, 06 Nov 1994 08:49:37 GMT"),
                now - Duration::from_secs(600),
                RETRY_MIN
            ),
            Duration::from_secs(600)
        );
        assert_eq!(
            AriError::Status(http::StatusCode::INTERNAL_SERVER_ERROR).retry_after(3, RETRY_MIN),
            Duration::from_secs(240)
        );
        assert_eq!(
            AriError::Status(http::StatusCode::NOT_FOUND).retry_after(1, RETRY_MIN),
            RETRY_LONG
        );
        let dir = serde_json::json!({"renewalInfo": "https://ca/renewal-info/", "meta": {"profiles": {"classic": "x", "shortlived": "y"}, "caaIdentities": ["LetsEncrypt.org"]}});
        let meta = DirectoryMeta::read(&dir);
        assert_eq!(
            meta.renewal_info.as_deref(),
            Some("https://ca/renewal-info")
        );
        assert_eq!(meta.profiles, ["classic", "shortlived"]);
        assert_eq!(meta.caa_identities, ["letsencrypt.org"]);
    }

    // RFC 9773 §4.1's example: AKI 69:88:5B:6B:87:46:40:41:E1:B3:7B:84:7B:A0:AE:2C:DE:01:C8:D4,
    // serial 00:87:65:43:21.
    #[test]
    fn the_certificate_identifier_is_the_rfcs() {
        let aki = [
            0x69, 0x88, 0x5B, 0x6B, 0x87, 0x46, 0x40, 0x41, 0xE1, 0xB3, 0x7B, 0x84, 0x7B, 0xA0,
            0xAE, 0x2C, 0xDE, 0x01, 0xC8, 0xD4,
        ];
        let serial = [0x00, 0x87, 0x65, 0x43, 0x21];
        let id = instant_acme::CertificateIdentifier::new(
            rustls_pki_types::Der::from_slice(&aki),
            rustls_pki_types::Der::from_slice(&serial),
        );
        assert_eq!(id.to_string(), "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE");
    }
}
