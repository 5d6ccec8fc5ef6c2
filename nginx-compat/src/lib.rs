//! Compatibility with deployments that keep nginx in front of the mesh.
//!
//! This crate will hold the nginx `auth_request` protocol (`x-client-cert` as nginx's
//! `$ssl_client_escaped_cert`, `x-client-verify`) and the rendering of nginx server and client
//! proxy configurations equivalent to dstack-vpc's (issue 3).
