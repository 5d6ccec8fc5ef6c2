//! Compatibility with deployments that keep nginx in front of the mesh.
//!
//! dstack-vpc terminates mTLS in nginx (`ssl_verify_client optional`) and asks an auth service,
//! per request, whether the caller may pass (`auth_request`). nginx hands the service the
//! client's leaf certificate, URL-escaped (`$ssl_client_escaped_cert`), and its own verdict
//! (`$ssl_client_verify`). [`auth_request`] reads those headers; [`render`] writes the nginx
//! server and client proxy configurations that put nginx in front of dstack-mesh.
//!
//! nginx exposes only the leaf, never the chain the client sent, so a service behind nginx
//! cannot rebuild a KMS chain (`leaf <- App CA <- root`) from the headers alone: see the
//! `mesh` auth service for how it verifies what it can and names what nginx vouched for.

pub mod auth_request;
pub mod render;
