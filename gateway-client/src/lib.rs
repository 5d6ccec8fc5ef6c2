//! Where a dstack target lives and how to reach it.
//!
//! This crate will hold target parsing from the `x-dstack-target-*` headers, gateway naming
//! (`<id>-<port>s.<base_domain>`), gateway discovery from the CVM's sys-config, and the connector
//! that dials and completes the RA-TLS handshake with [`ratls`]'s policy (issue 4). It is part
//! of the workspace now so the layout, lints and dependency graph are fixed from the start.
