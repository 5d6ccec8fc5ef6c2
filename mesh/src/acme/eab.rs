//! Registering an account with External Account Binding (RFC 8555 §7.3.4) under the key the
//! guest agent derives. instant-acme binds an external account only to a key it generates, and
//! a generated key would give every replica its own account (and break a CAA `accounturi`
//! pin), so this one request is signed here; everything after it goes through instant-acme.

use aws_lc_rs::{
    rand::SystemRandom,
    signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING},
};
use bytes::Bytes;
use instant_acme::{BodyWrapper, HttpClient};
use rustls_pki_types::PrivatePkcs8KeyDer;

use super::client::{classify, CaFault, IssueError, KeyError, LocalError, Unreachable, Validation};
use crate::{
    base64url::{decode as b64url_decode, encode as b64url},
    config::Eab,
};

/// The account key's public JWK (RFC 7518 §6.2).
pub(super) fn jwk(pkcs8: &PrivatePkcs8KeyDer<'_>) -> Result<serde_json::Value, IssueError> {
    use p256::{elliptic_curve::sec1::ToEncodedPoint, pkcs8::DecodePrivateKey};
    let secret = p256::SecretKey::from_pkcs8_der(pkcs8.secret_pkcs8_der())
        .map_err(|e| LocalError::Key(e.into()))?;
    let point = secret.public_key().to_encoded_point(false);
    let (Some(x), Some(y)) = (point.x(), point.y()) else {
        return Err(LocalError::Key(KeyError::NoPublicPoint).into());
    };
    Ok(serde_json::json!({ "crv": "P-256", "kty": "EC", "x": b64url(x), "y": b64url(y) }))
}

/// A flattened JWS (RFC 7515 §7.2.2) over `payload`, signed by `sign`.
fn jws(
    protected: &serde_json::Value,
    payload: &[u8],
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, IssueError>,
) -> Result<serde_json::Value, IssueError> {
    let protected = b64url(protected.to_string().as_bytes());
    let payload = b64url(payload);
    let signature = sign(format!("{protected}.{payload}").as_bytes())?;
    Ok(serde_json::json!({
        "protected": protected,
        "payload": payload,
        "signature": b64url(&signature),
    }))
}

async fn fetch(
    http: &dyn HttpClient,
    req: http::Request<BodyWrapper<Bytes>>,
) -> Result<(http::response::Parts, Bytes), IssueError> {
    let mut rsp = http.request(req).await.map_err(classify)?;
    let body = rsp
        .body
        .into_bytes()
        .await
        .map_err(|e| IssueError::Unreachable(Unreachable::Body(e)))?;
    Ok((rsp.parts, body))
}

pub(crate) fn problem(body: &[u8]) -> IssueError {
    match serde_json::from_slice::<instant_acme::Problem>(body) {
        // No challenge is validated here: `unauthorized` means the binding was refused.
        Ok(p) => match classify(instant_acme::Error::Api(p)) {
            IssueError::Validation(Validation::Problem(p)) => IssueError::Refused(p),
            other => other,
        },
        Err(_) => IssueError::Server(CaFault::NotAcme(
            String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        )),
    }
}

fn request(
    method: &str,
    url: &str,
    body: Vec<u8>,
) -> Result<http::Request<BodyWrapper<Bytes>>, IssueError> {
    http::Request::builder()
        .method(method)
        .uri(url)
        .header(http::header::CONTENT_TYPE, "application/jose+json")
        .body(BodyWrapper::from(body))
        .map_err(|e| LocalError::from(e).into())
}

/// Register (or find) the account of `pkcs8` with the CA at `directory`, bound to the external
/// account `eab`; returns the account URL.
// Long on purpose: RFC 8555 §7.3.4 in order (directory, key, binding, nonce, newAccount with
// one badNonce retry).
pub async fn register(
    http: &dyn HttpClient,
    directory: &str,
    pkcs8: &PrivatePkcs8KeyDer<'_>,
    eab: &Eab,
    contacts: &[&str],
) -> Result<String, IssueError> {
    let (parts, body) = fetch(http, request("GET", directory, Vec::new())?).await?;
    if !parts.status.is_success() {
        return Err(problem(&body));
    }
    let dir: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| IssueError::Server(CaFault::NotAcme(e.to_string())))?;
    let url = |key: &'static str| {
        dir[key]
            .as_str()
            .map(str::to_owned)
            .ok_or(IssueError::Server(CaFault::DirectoryMissing(key)))
    };
    let (new_nonce, new_account) = (url("newNonce")?, url("newAccount")?);
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.secret_pkcs8_der())
        .map_err(|e| LocalError::Key(e.into()))?;
    let jwk = jwk(pkcs8)?;
    let hmac_key = b64url_decode(&eab.hmac_key).map_err(LocalError::from)?;
    let hmac = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &hmac_key);
    // The external account signs our public key (§7.3.4).
    let binding = jws(
        &serde_json::json!({ "alg": "HS256", "kid": eab.kid, "url": new_account }),
        jwk.to_string().as_bytes(),
        |msg| Ok(aws_lc_rs::hmac::sign(&hmac, msg).as_ref().to_vec()),
    )?;
    let payload = serde_json::json!({
        "termsOfServiceAgreed": true,
        "contact": contacts,
        "externalAccountBinding": binding,
    });
    let (parts, _) = fetch(http, request("HEAD", &new_nonce, Vec::new())?).await?;
    let mut nonce = parts.headers.get("replay-nonce").cloned();
    // One retry on badNonce, with the nonce the refusal carries (RFC 8555 §6.5).
    for _ in 0..2 {
        let Some(current) = nonce.as_ref().and_then(|n| n.to_str().ok()) else {
            return Err(IssueError::Server(CaFault::NoNonce));
        };
        let signed = jws(
            &serde_json::json!({ "alg": "ES256", "jwk": jwk, "nonce": current, "url": new_account }),
            payload.to_string().as_bytes(),
            |msg| {
                key.sign(&rng, msg)
                    .map(|s| s.as_ref().to_vec())
                    .map_err(|_| LocalError::Signing.into())
            },
        )?;
        let (parts, body) = fetch(
            http,
            request("POST", &new_account, signed.to_string().into_bytes())?,
        )
        .await?;
        if parts.status.is_success() {
            return parts
                .headers
                .get(http::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .map(str::to_owned)
                .ok_or(IssueError::Server(CaFault::NoLocation));
        }
        let bad_nonce = serde_json::from_slice::<instant_acme::Problem>(&body)
            .ok()
            .and_then(|p| p.r#type)
            .is_some_and(|t| t.ends_with(":badNonce"));
        if !bad_nonce {
            return Err(problem(&body));
        }
        nonce = parts.headers.get("replay-nonce").cloned();
    }
    Err(IssueError::Server(CaFault::Nonces))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwk_has_the_public_point() {
        let pkcs8 = super::super::client::derive_account_key(b"seed").unwrap();
        let jwk = jwk(&pkcs8).unwrap();
        assert_eq!(jwk["kty"], "EC");
        assert_eq!(jwk["x"].as_str().unwrap().len(), 43);
        assert_eq!(jwk["y"].as_str().unwrap().len(), 43);
    }
}
