//! dstack's private certificate extensions (arc `1.3.6.1.4.1.62397.1`).
//!
//! Every extension is non-critical and its `extnValue` holds a DER OCTET STRING that wraps the raw
//! payload (`04 <len> <raw>`), as dstack's `ra-tls` crate writes it with yasna.

use crate::{msgpack, AppId};

/// OID arcs of the dstack extensions, for minting certificates (rcgen takes `&[u64]`).
pub mod oid {
    /// Application id: the 20 raw id bytes. On KMS leaves and on the per-app App CA.
    pub const APP_ID: &[u64] = &[1, 3, 6, 1, 4, 1, 62397, 1, 3];
    /// Certificate usage: `app:custom` on application leaves, `app:ca` on the App CA.
    pub const CERT_USAGE: &[u64] = &[1, 3, 6, 1, 4, 1, 62397, 1, 4];
    /// Attestation (TDX quote + event log), present when the leaf was requested with RA-TLS.
    pub const ATTESTATION: &[u64] = &[1, 3, 6, 1, 4, 1, 62397, 1, 8];
    /// App info: msgpack array, present when GetTlsKey was called with `with_app_info`.
    pub const APP_INFO: &[u64] = &[1, 3, 6, 1, 4, 1, 62397, 1, 9];
    /// Legacy TDX quote extension (older agents).
    pub const LEGACY_QUOTE: &[u64] = &[1, 3, 6, 1, 4, 1, 62397, 1, 1];
    /// Legacy event log extension (older agents).
    pub const LEGACY_EVENT_LOG: &[u64] = &[1, 3, 6, 1, 4, 1, 62397, 1, 2];
}

/// Usage value that marks an application leaf.
pub const USAGE_APP: &str = "app:custom";
/// Usage value that marks the per-app CA of the KMS.
pub const USAGE_APP_CA: &str = "app:ca";

/// Which dstack extension an OID names, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    AppId,
    Usage,
    Attestation,
    AppInfo,
    Legacy,
    Other,
}

/// Encoded content of `1.3.6.1.4.1.62397.1`: the arc every dstack extension sits under.
const DSTACK_ARC: &[u8] = &[0x2b, 0x06, 0x01, 0x04, 0x01, 0x83, 0xe7, 0x3d, 0x01];

pub(crate) fn kind(oid_content: &[u8]) -> Kind {
    match oid_content.strip_prefix(DSTACK_ARC) {
        Some([3]) => Kind::AppId,
        Some([4]) => Kind::Usage,
        Some([8]) => Kind::Attestation,
        Some([9]) => Kind::AppInfo,
        Some([1] | [2]) => Kind::Legacy,
        _ => Kind::Other,
    }
}

/// Why an extension's content could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExtensionError {
    /// The extnValue does not hold exactly one DER OCTET STRING.
    #[error("{0} extension is not a DER OCTET STRING")]
    NotOctetString(&'static str),
    /// The app id extension holds no usable id.
    #[error("app id extension: {0}")]
    AppId(#[from] crate::app_id::AppIdError),
    /// The usage extension is not UTF-8.
    #[error("usage extension is not UTF-8")]
    UsageNotUtf8,
    /// The app-info extension is not the msgpack array dstack writes.
    #[error("app-info extension: {0}")]
    AppInfo(String),
}

/// Strip the DER OCTET STRING that wraps every dstack extension payload.
pub(crate) fn unwrap_octet_string<'a>(
    name: &'static str,
    der: &'a [u8],
) -> Result<&'a [u8], ExtensionError> {
    let err = ExtensionError::NotOctetString(name);
    let (&tag, rest) = der.split_first().ok_or(err.clone())?;
    if tag != 0x04 {
        return Err(err);
    }
    let (&first, rest) = rest.split_first().ok_or(err.clone())?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(err);
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() != len {
        return Err(err);
    }
    Ok(rest)
}

/// Wrap a payload in a DER OCTET STRING: the `extnValue` content of every dstack extension
/// (for minting certificates, e.g. with rcgen's `CustomExtension::from_oid_content`).
pub fn wrap_octet_string(payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = Vec::with_capacity(len + 6);
    out.push(0x04);
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = (len as u32).to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (4 - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(payload);
    out
}

pub(crate) fn app_id(der: &[u8]) -> Result<AppId, ExtensionError> {
    Ok(AppId::from_bytes(unwrap_octet_string("app id", der)?)?)
}

pub(crate) fn usage(der: &[u8]) -> Result<String, ExtensionError> {
    let raw = unwrap_octet_string("usage", der)?;
    String::from_utf8(raw.to_vec()).map_err(|_| ExtensionError::UsageNotUtf8)
}

/// The app-info extension, decoded. Hashes are lowercase hex, as the guest agent's `Info` shows them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AppInfo {
    /// The application id (first field).
    pub app_id: AppId,
    /// SHA-256 of the app-compose document.
    pub compose_hash: Option<String>,
    /// The CVM instance id, when the app has one.
    pub instance_id: Option<String>,
    /// The device id.
    pub device_id: Option<String>,
    /// The measurement of the system (firmware, kernel, …).
    pub mr_system: Option<String>,
    /// The aggregated measurement.
    pub mr_aggregated: Option<String>,
    /// The OS image hash.
    pub os_image_hash: Option<String>,
    /// The key provider description (JSON text, e.g. `{"name":"kms","id":"…"}`).
    pub key_provider_info: Option<String>,
}

/// Field order of the rmp-serde array dstack writes.
const APP_INFO_FIELDS: usize = 9;

pub(crate) fn app_info(der: &[u8]) -> Result<AppInfo, ExtensionError> {
    let raw = unwrap_octet_string("app-info", der)?;
    let bad = |what: &str| ExtensionError::AppInfo(what.to_owned());
    let value = msgpack::decode(raw).map_err(|e| ExtensionError::AppInfo(e.to_string()))?;
    let fields = match value {
        msgpack::Value::Array(fields) if !fields.is_empty() => fields,
        _ => return Err(bad("expected a non-empty msgpack array")),
    };
    let bytes = |i: usize| fields.get(i).and_then(msgpack::Value::bytes);
    let hex_field = |i: usize| bytes(i).filter(|b| !b.is_empty()).map(hex::encode);
    let app_id = AppId::from_bytes(&bytes(0).ok_or_else(|| bad("app id is not bytes"))?)?;
    Ok(AppInfo {
        app_id,
        compose_hash: hex_field(1),
        instance_id: hex_field(2),
        device_id: hex_field(3),
        mr_system: hex_field(4),
        mr_aggregated: hex_field(5),
        os_image_hash: hex_field(6),
        key_provider_info: bytes(7).map(|b| String::from_utf8_lossy(&b).into_owned()),
    })
}

/// Raw byte fields for [`encode_app_info`], in dstack's order.
#[derive(Clone, Debug, Default)]
pub struct AppInfoFields<'a> {
    /// App id bytes.
    pub app_id: &'a [u8],
    /// Compose hash bytes.
    pub compose_hash: &'a [u8],
    /// Instance id bytes.
    pub instance_id: &'a [u8],
    /// Device id bytes.
    pub device_id: &'a [u8],
    /// Key provider JSON text.
    pub key_provider_info: &'a [u8],
}

/// The `extnValue` content of an app-info extension, as the guest agent writes it (the
/// measurements are zero).
pub fn encode_app_info(f: &AppInfoFields<'_>) -> Vec<u8> {
    let mut w = msgpack::Writer::default();
    w.array_header(APP_INFO_FIELDS);
    w.bin(f.app_id);
    w.bin(f.compose_hash);
    w.bin(f.instance_id);
    w.bin(f.device_id);
    // mr_system, mr_aggregated, os_image_hash: a development agent has no measurements.
    w.bin(&[0u8; 32]);
    w.bin(&[0u8; 32]);
    w.bin(&[0u8; 32]);
    w.bin(f.key_provider_info);
    w.array_header(0);
    wrap_octet_string(&w.buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octet_string_round_trip() {
        for len in [0usize, 1, 127, 128, 255, 256, 6788, 70000] {
            let payload = vec![7u8; len];
            let der = wrap_octet_string(&payload);
            assert_eq!(unwrap_octet_string("t", &der).unwrap(), &payload[..]);
        }
    }

    #[test]
    fn octet_string_rejects_junk() {
        for bad in [
            &[][..],
            &[0x04],
            &[0x05, 0x00],
            &[0x04, 0x02, 0x01],
            &[0x04, 0x01, 0x01, 0x02],
            &[0x04, 0x80],
            &[0x04, 0x85, 0, 0, 0, 0, 1],
        ] {
            assert!(unwrap_octet_string("t", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kinds_by_oid() {
        let mut oid = DSTACK_ARC.to_vec();
        oid.push(3);
        assert_eq!(kind(&oid), Kind::AppId);
        oid.push(1);
        assert_eq!(kind(&oid), Kind::Other);
        assert_eq!(kind(&[0x55, 0x1d, 0x11]), Kind::Other);
    }

    #[test]
    fn app_info_round_trip() {
        let der = encode_app_info(&AppInfoFields {
            app_id: &[0xab; 20],
            instance_id: &[0xcd; 20],
            key_provider_info: br#"{"name":"dev"}"#,
            ..Default::default()
        });
        let info = app_info(&der).unwrap();
        assert_eq!(info.app_id.to_string(), "ab".repeat(20));
        assert_eq!(info.instance_id.as_deref(), Some(&*"cd".repeat(20)));
        assert_eq!(info.compose_hash, None);
        assert_eq!(info.key_provider_info.as_deref(), Some(r#"{"name":"dev"}"#));
    }
}
