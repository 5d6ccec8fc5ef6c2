//! nginx configurations equivalent to dstack-vpc's, for operators who keep nginx.
//!
//! Every value that lands in the file is checked first, so a server name or path can never
//! smuggle in a directive. Differences from dstack-vpc's templates, each on purpose:
//! - the auth subrequest uses an internal location (`/_dstack_auth`) that cannot shadow the
//!   app's own `/auth`;
//! - the caller's instance id is forwarded next to its app id, and both always overwrite what
//!   the client sent;
//! - ECDSA cipher suites for TLS 1.2 (dstack keys are P-256; the RSA-only list of dstack-vpc
//!   leaves TLS 1.2 clients without a common suite);
//! - keep-alive to the backend and to the auth service, and WebSocket upgrades pass through.

use std::{fmt::Write, net::SocketAddr, path::PathBuf};

/// Default port of nginx's mTLS listener.
pub const DEFAULT_SERVER_PORT: u16 = 443;
/// Default port of nginx's plain-HTTP client listener.
pub const DEFAULT_CLIENT_PORT: u16 = 80;
/// Where dstack-vpc's `mesh-serve.sh` writes the key and certificates.
pub const DEFAULT_CERT_FILE: &str = "/etc/ssl/certs/server.crt";
/// Default private key path.
pub const DEFAULT_KEY_FILE: &str = "/etc/ssl/private/server.key";
/// Default CA (KMS root) path.
pub const DEFAULT_CA_FILE: &str = "/etc/ssl/certs/ca.crt";

/// A value that cannot be written into an nginx config.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RenderError {
    /// The server name has characters nginx would read as syntax.
    #[error("server name {0:?}: only letters, digits, '.', '-', '_', '*' and '~' are allowed")]
    ServerName(String),
    /// The backend is not `host:port`.
    #[error("backend {0:?}: expected host:port (e.g. 127.0.0.1:8000)")]
    Backend(String),
    /// A file path has whitespace, quotes, braces or `;`.
    #[error("path {0:?}: whitespace, quotes, braces, '$' and ';' are not allowed")]
    Path(String),
    /// The auth secret is too short or has characters other than letters, digits, `-`, `_`
    /// (the value is not repeated here: it is a secret).
    #[error("auth secret: {MIN_SECRET_LEN}-256 letters, digits, '-' or '_' are required")]
    Secret,
}

/// Shortest auth secret accepted (characters).
pub const MIN_SECRET_LEN: usize = 32;

/// Whether `secret` can be the auth secret: long enough to guess never, and nothing nginx's
/// tokenizer would read as syntax.
pub fn valid_secret(secret: &str) -> bool {
    (MIN_SECRET_LEN..=256).contains(&secret.len())
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// The mTLS server proxy: nginx in front of the backend, asking dstack-mesh who may pass.
#[derive(Clone, Debug)]
pub struct ServerProxy {
    /// Port nginx listens on with TLS.
    pub port: u16,
    /// `server_name` (`_` for any).
    pub server_name: String,
    /// The application, `host:port`.
    pub backend: String,
    /// Certificate chain (PEM), leaf first.
    pub cert_file: PathBuf,
    /// Private key (PEM).
    pub key_file: PathBuf,
    /// Trust anchors for client certificates (the KMS root).
    pub ca_file: PathBuf,
    /// dstack-mesh's auth service.
    pub auth: SocketAddr,
    /// The secret nginx sends with each auth subrequest ([`crate::auth_request::NGINX_SECRET`]).
    /// Without it the service verifies chains itself and refuses a lone KMS leaf.
    pub auth_secret: Option<String>,
}

/// The client proxy: plain HTTP from the app to dstack-mesh's outbound proxy.
#[derive(Clone, Debug)]
pub struct ClientProxy {
    /// Port nginx listens on.
    pub port: u16,
    /// dstack-mesh's outbound proxy.
    pub outbound: SocketAddr,
}

fn server_name(name: &str) -> Result<&str, RenderError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'*' | b'~'));
    ok.then_some(name)
        .ok_or_else(|| RenderError::ServerName(name.to_owned()))
}

fn backend(addr: &str) -> Result<&str, RenderError> {
    let err = || RenderError::Backend(addr.to_owned());
    let (host, port) = addr.rsplit_once(':').ok_or_else(err)?;
    let host_ok = !host.is_empty()
        && host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':')
        });
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(addr),
        _ => Err(err()),
    }
}

fn path(p: &std::path::Path) -> Result<String, RenderError> {
    let err = || RenderError::Path(p.to_string_lossy().into_owned());
    // Not UTF-8: nginx would read another path than the one named.
    let s = p.to_str().ok_or_else(err)?;
    // A backslash escapes the next character in nginx's tokenizer (the `;` after the path).
    let bad = s.is_empty()
        || s.chars().any(|c| {
            c.is_whitespace() || matches!(c, '"' | '\'' | '{' | '}' | ';' | '$' | '#' | '\\')
        });
    if bad {
        Err(err())
    } else {
        Ok(s.to_owned())
    }
}

const UPGRADE_MAP: &str = "\
map $http_upgrade $dstack_connection_upgrade {
    default upgrade;
    ''      '';
}
";

impl ServerProxy {
    /// The defaults of dstack-vpc's deployment, for `backend`.
    pub fn new(backend: impl Into<String>, auth: SocketAddr) -> Self {
        Self {
            port: DEFAULT_SERVER_PORT,
            server_name: "_".into(),
            backend: backend.into(),
            cert_file: DEFAULT_CERT_FILE.into(),
            key_file: DEFAULT_KEY_FILE.into(),
            ca_file: DEFAULT_CA_FILE.into(),
            auth,
            auth_secret: None,
        }
    }

    /// The `http {}`-level configuration (a conf.d file).
    // Long on purpose: one nginx configuration file, kept whole so it reads as the file.
    pub fn render(&self) -> Result<String, RenderError> {
        let name = server_name(&self.server_name)?;
        let backend = backend(&self.backend)?;
        let (cert, key, ca) = (
            path(&self.cert_file)?,
            path(&self.key_file)?,
            path(&self.ca_file)?,
        );
        let (port, auth) = (self.port, self.auth);
        let proof = match &self.auth_secret {
            Some(secret) if valid_secret(secret) => format!(
                "\n        # Proves to the auth service that this is our nginx (keep this file private).\n        proxy_set_header {} {secret};",
                crate::auth_request::NGINX_SECRET
            ),
            Some(_) => return Err(RenderError::Secret),
            None => String::new(),
        };
        let mut out = String::new();
        let _ = write!(
            out,
            "# Rendered by `dstack-mesh nginx-config server`: nginx terminates mTLS, and dstack-mesh's
# auth service decides per request who may pass and names the caller (x-dstack-app-id).
{UPGRADE_MAP}
upstream dstack_mesh_backend {{
    server {backend};
    keepalive 32;
}}

upstream dstack_mesh_auth {{
    server {auth};
    keepalive 8;
}}

server {{
    listen {port} ssl http2;
    server_name {name};

    ssl_certificate     {cert};
    ssl_certificate_key {key};
    ssl_client_certificate {ca};
    ssl_verify_client optional;
    ssl_verify_depth 3;

    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305;
    ssl_prefer_server_ciphers off;

    location = /health {{
        access_log off;
        default_type text/plain;
        return 200 \"healthy\\n\";
    }}

    location / {{
        auth_request /_dstack_auth;
        auth_request_set $dstack_app_id $upstream_http_x_dstack_app_id;
        auth_request_set $dstack_instance_id $upstream_http_x_dstack_instance_id;

        # Always overwritten: the caller cannot name itself.
        proxy_set_header X-Dstack-App-Id $dstack_app_id;
        proxy_set_header X-Dstack-Instance-Id $dstack_instance_id;

        proxy_set_header Host $host;
        proxy_set_header X-Real-IP $remote_addr;
        # What this hop saw, not what the caller claims (an empty value drops the header).
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Forwarded-Host \"\";
        proxy_set_header X-Forwarded-Port \"\";
        proxy_set_header Forwarded \"\";

        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $dstack_connection_upgrade;
        proxy_pass http://dstack_mesh_backend;
    }}

    location = /_dstack_auth {{
        internal;
        proxy_pass http://dstack_mesh_auth/auth;
        proxy_pass_request_body off;
        proxy_set_header Content-Length \"\";
        proxy_set_header x-client-cert $ssl_client_escaped_cert;
        proxy_set_header x-client-verify $ssl_client_verify;
        proxy_set_header X-Original-URI $request_uri;
        proxy_set_header X-Original-Method $request_method;{proof}
        proxy_http_version 1.1;
        proxy_set_header Connection \"\";
    }}
}}
"
        );
        Ok(out)
    }
}

impl ClientProxy {
    /// dstack-vpc's defaults: port 80 to the outbound proxy.
    pub fn new(outbound: SocketAddr) -> Self {
        Self {
            port: DEFAULT_CLIENT_PORT,
            outbound,
        }
    }

    /// The `http {}`-level configuration (a conf.d file).
    pub fn render(&self) -> Result<String, RenderError> {
        let (port, outbound) = (self.port, self.outbound);
        let mut out = String::new();
        let _ = write!(
            out,
            "# Rendered by `dstack-mesh nginx-config client`: apps send plain HTTP with
# x-dstack-target-app / x-dstack-target-port; dstack-mesh's outbound proxy does the mTLS.
{UPGRADE_MAP}
server {{
    listen {port};
    server_name _;

    location / {{
        proxy_set_header Host $host;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Original-URI $request_uri;
        proxy_set_header X-Original-Method $request_method;

        # Stream both ways: the outbound proxy does not buffer either.
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $dstack_connection_upgrade;
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_pass http://{outbound};
    }}
}}
"
        );
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> SocketAddr {
        "127.0.0.1:8092".parse().unwrap()
    }

    #[test]
    fn server_config_has_the_auth_request_wiring() {
        let conf = ServerProxy::new("127.0.0.1:8000", auth()).render().unwrap();
        for needle in [
            "listen 443 ssl http2;",
            "ssl_verify_client optional;",
            "ssl_client_certificate /etc/ssl/certs/ca.crt;",
            "auth_request /_dstack_auth;",
            "proxy_set_header X-Dstack-App-Id $dstack_app_id;",
            "proxy_set_header x-client-cert $ssl_client_escaped_cert;",
            "proxy_set_header x-client-verify $ssl_client_verify;",
            "server 127.0.0.1:8000;",
            "server 127.0.0.1:8092;",
            "return 200 \"healthy\\n\";",
        ] {
            assert!(conf.contains(needle), "missing {needle:?} in\n{conf}");
        }
    }

    #[test]
    fn the_auth_secret_goes_only_to_the_auth_subrequest() {
        let conf = ServerProxy::new("127.0.0.1:8000", auth()).render().unwrap();
        assert!(!conf.contains(crate::auth_request::NGINX_SECRET), "{conf}");
        let mut p = ServerProxy::new("127.0.0.1:8000", auth());
        let secret = "s3cr3t-".repeat(6);
        p.auth_secret = Some(secret.clone());
        let conf = p.render().unwrap();
        let line = format!("proxy_set_header x-dstack-mesh-nginx-secret {secret};");
        assert_eq!(conf.matches(&line).count(), 1, "{conf}");
        let auth_location = conf.split("location = /_dstack_auth").nth(1).unwrap();
        assert!(auth_location.contains(&line), "{conf}");
        for bad in ["short", &format!("{secret} ;"), &format!("{secret}$x")] {
            p.auth_secret = Some(bad.to_owned());
            assert_eq!(p.render(), Err(RenderError::Secret), "{bad}");
            assert!(!RenderError::Secret.to_string().contains(bad));
        }
    }

    #[test]
    fn client_config_points_at_the_outbound_proxy() {
        let conf = ClientProxy::new("127.0.0.1:8091".parse().unwrap())
            .render()
            .unwrap();
        assert!(conf.contains("listen 80;"));
        assert!(conf.contains("proxy_pass http://127.0.0.1:8091;"));
    }

    #[test]
    fn values_cannot_inject_directives() {
        let mut p = ServerProxy::new("127.0.0.1:8000", auth());
        p.server_name = "x; include /etc/passwd".into();
        assert!(matches!(p.render(), Err(RenderError::ServerName(_))));
        let p = ServerProxy::new("127.0.0.1:8000; }", auth());
        assert!(matches!(p.render(), Err(RenderError::Backend(_))));
        for bad in ["backend", "host:0", "host:99999", ":80"] {
            assert!(
                matches!(
                    ServerProxy::new(bad, auth()).render(),
                    Err(RenderError::Backend(_))
                ),
                "{bad}"
            );
        }
        let mut p = ServerProxy::new("app:8000", auth());
        p.key_file = "/tmp/a key;".into();
        assert!(matches!(p.render(), Err(RenderError::Path(_))));
        p.key_file = "/tmp/key\\".into();
        assert!(matches!(p.render(), Err(RenderError::Path(_))));
        use std::os::unix::ffi::OsStrExt;
        p.key_file = std::ffi::OsStr::from_bytes(b"/tmp/\xff.key").into();
        assert!(matches!(p.render(), Err(RenderError::Path(_))));
        let mut p = ServerProxy::new("[::1]:8000", auth());
        p.server_name = "*.example.com".into();
        assert!(p.render().is_ok());
    }
}
