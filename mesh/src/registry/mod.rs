//! Discovery: dstack-vpc's VPC API (`POST /api/nodes/update`, `GET /api/discover/<type>`,
//! `GET /api/nodes`) served on the mesh listener, without its VPN. The caller is the identity
//! its certificate proved in the handshake, never a header: a node registers as its own app and
//! instance, so no node can register (or move) another. Entries end `ttl` after their last
//! heartbeat and survive a restart: in etcd, sealed with the app's key, when `[store]` is etcd
//! (every registry instance of the app then starts from the same state), else in a local file.
//!
//! A request's path: mesh caller verified → [`Registry::handle`] (its app on the registry's
//! allowlist, else `403`) → update or read → answer. [`client`] keeps this sidecar registered.

pub mod client;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use ratls::{AllowList, AppId, VerifiedPeer};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::{
    acme::store::{CertStore, DirStore},
    clock::unix_now,
    config::{
        tunnels::{valid_text, MAX_REGISTRY_TEXT},
        RegistryConfig,
    },
    proxy::{self, Body},
};

/// Most nodes the registry holds; registrations past it are refused (`507`).
pub const MAX_NODES: usize = 10_000;
/// Most entries one caller (app and instance) holds, across node types: one node cannot fill
/// the registry for the others (`429` past it).
pub const MAX_PER_CALLER: usize = 16;
/// Largest registration body.
const MAX_BODY: usize = 16 << 10;
/// Most labels or ports one node registers.
const MAX_ITEMS: usize = 32;
/// How often the state file is written at most (and expired entries swept).
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// A port a node offers (an `[[inbound.tcp]]` service), reached through a tunnel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePort {
    /// The service's name.
    pub name: String,
    /// The port a tunnel targets (`target_port`, or `CONNECT <app>.dstack:<port>`).
    pub port: u16,
}

/// One registered node, as `discover` answers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// dstack-vpc's node key: the name the node gave, else its instance id.
    pub uuid: String,
    /// Its name (dstack-vpc's `hostname`).
    pub hostname: String,
    /// What it is.
    pub node_type: String,
    /// Its app, as its certificate proved.
    pub app_id: String,
    /// Its instance, as its certificate proved (none when the certificate names none).
    pub instance_id: Option<String>,
    /// dstack-vpc's VPN address: there is no VPN, so always null.
    pub tailscale_ip: Option<String>,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// Its TCP services, each with the `CONNECT` authority that reaches exactly this node.
    pub ports: Vec<ReachablePort>,
    /// First registration (unix seconds).
    pub registered_at: i64,
    /// Last heartbeat (unix seconds).
    pub updated_at: i64,
    /// When it is dropped without another heartbeat (unix seconds).
    pub expires_at: i64,
}

/// A node's port and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReachablePort {
    /// The service's name.
    pub name: String,
    /// Its port.
    pub port: u16,
    /// `CONNECT` authority on the outbound proxy (`<instance>.<app>.dstack:<port>`).
    pub connect: String,
}

/// What a node sends to `/api/nodes/update`: a JSON body, or dstack-vpc's query parameters
/// (`uuid`, `node_type`, `hostname`; `tailscale_ip` is accepted and ignored). Identity fields
/// in it are ignored: the certificate says who the node is.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Update {
    /// What it is (required).
    pub node_type: Option<String>,
    /// Its key among its app's nodes (default: its instance id).
    pub uuid: Option<String>,
    /// Its name (default: the uuid).
    pub hostname: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Its TCP services.
    #[serde(default)]
    pub ports: Vec<NodePort>,
}

/// Where a node lives in the table: its type, then who it proved it is.
type Key = (String, String, String);

/// The state file's shape.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    version: u32,
    nodes: Vec<Node>,
}

/// The registry role.
pub struct Registry {
    allow: AllowList,
    ttl: Duration,
    state_file: PathBuf,
    nodes: Mutex<BTreeMap<Key, Node>>,
    /// A change not yet written.
    dirty: Notify,
    /// The app's etcd store, when `[store]` is etcd: the state lives there, not in the file.
    #[cfg(feature = "etcd")]
    fleet: Option<Arc<crate::acme::replicas::Replicas>>,
}

/// The state's name in the fleet's store.
#[cfg(feature = "etcd")]
const FLEET_STATE: &str = "registry/nodes";

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("state_file", &self.state_file)
            .finish_non_exhaustive()
    }
}

/// Why a registration was refused: the status and the JSON error.
type Refusal = (StatusCode, String);

impl Registry {
    /// The registry of `config` for the app `own` (its default allowlist), with the entries
    /// its state file still holds (expired ones dropped; an unreadable file is logged, set
    /// aside and started over, never fatal).
    pub fn load(config: &RegistryConfig, own: &AppId) -> Self {
        let nodes = read_state(&config.state_file)
            .into_iter()
            .filter(|n| n.expires_at > unix_now())
            .map(|n| (key_of(&n), n))
            .collect::<BTreeMap<_, _>>();
        if !nodes.is_empty() {
            tracing::info!(nodes = nodes.len(), file = %config.state_file.display(), "registry: entries restored");
        }
        Self {
            allow: config.allow.resolve(own),
            ttl: config.ttl,
            state_file: config.state_file.clone(),
            nodes: Mutex::new(nodes),
            dirty: Notify::new(),
            #[cfg(feature = "etcd")]
            fleet: None,
        }
    }

    /// Keep the state in the app's etcd store (sealed) instead of the file; it is read back
    /// when [`Registry::keep`] starts.
    #[cfg(feature = "etcd")]
    pub fn with_fleet(mut self, fleet: Arc<crate::acme::replicas::Replicas>) -> Self {
        self.nodes = Mutex::new(BTreeMap::new());
        self.fleet = Some(fleet);
        self
    }

    /// Whether `path` is the registry's (anything else goes to the backend).
    pub fn serves(path: &str) -> bool {
        path == "/api/nodes/update" || path == "/api/nodes" || path.starts_with("/api/discover/")
    }

    /// Answer one request of the verified `peer`.
    pub async fn handle(&self, peer: &VerifiedPeer, req: Request<Incoming>) -> Response<Body> {
        if !self.allow.allows(&peer.app_id) {
            tracing::warn!(caller = %peer.app_id, path = req.uri().path(), "registry: caller not allowed");
            return proxy::error_response(StatusCode::FORBIDDEN, "Forbidden");
        }
        let path = req.uri().path().to_owned();
        match (req.method(), path.as_str()) {
            (&Method::POST, "/api/nodes/update") => match self.read_update(req).await {
                Ok(update) => self.update(peer, update),
                Err((status, error)) => proxy::error_response(status, &error),
            },
            (&Method::GET, "/api/nodes") => {
                let nodes = self.nodes(None);
                let count = nodes.len();
                json(
                    StatusCode::OK,
                    &serde_json::json!({ "nodes": nodes, "count": count }),
                )
            }
            (&Method::GET, p) if p.starts_with("/api/discover/") => {
                let node_type = &p["/api/discover/".len()..];
                let nodes = self.nodes(Some(node_type));
                if nodes.is_empty() {
                    // dstack-vpc's answer for an empty type.
                    return proxy::error_response(
                        StatusCode::NOT_FOUND,
                        &format!("No {node_type} nodes found"),
                    );
                }
                let count = nodes.len();
                json(
                    StatusCode::OK,
                    &serde_json::json!({ "nodes": nodes, "count": count, "node_type": node_type }),
                )
            }
            _ => proxy::error_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        }
    }

    /// The update a request carries: its JSON body, with dstack-vpc's query parameters over it.
    async fn read_update(&self, req: Request<Incoming>) -> Result<Update, Refusal> {
        let query = req.uri().query().unwrap_or_default().to_owned();
        let body = Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| (StatusCode::BAD_REQUEST, format!("body: {e}")))?
            .to_bytes();
        parse_update(&query, &body)
    }

    /// Record `update` as `peer`'s registration: its app and instance are the certificate's.
    fn update(&self, peer: &VerifiedPeer, update: Update) -> Response<Body> {
        let node = match self.node(peer, update) {
            Ok(node) => node,
            Err((status, error)) => return proxy::error_response(status, &error),
        };
        let key = key_of(&node);
        let status = {
            let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
            let full = nodes.len() >= MAX_NODES;
            let caller = |n: &Node| n.app_id == node.app_id && n.instance_id == node.instance_id;
            // A name is one node's: another caller cannot take over a uuid or hostname.
            let taken = nodes.values().find(|n| {
                n.node_type == node.node_type
                    && !caller(n)
                    && (n.uuid == node.uuid || n.hostname == node.hostname)
            });
            if let Some(other) = taken {
                return proxy::error_response(
                    StatusCode::CONFLICT,
                    &format!(
                        "{} is registered by another node (app {})",
                        node.uuid, other.app_id
                    ),
                );
            }
            let mine = nodes.values().filter(|n| caller(n)).count();
            match nodes.get_mut(&key) {
                Some(existing) => {
                    let registered_at = existing.registered_at;
                    *existing = Node {
                        registered_at,
                        ..node
                    };
                    "updated"
                }
                None if full => {
                    return proxy::error_response(
                        StatusCode::INSUFFICIENT_STORAGE,
                        "the registry is full",
                    )
                }
                None if mine >= MAX_PER_CALLER => {
                    return proxy::error_response(
                        StatusCode::TOO_MANY_REQUESTS,
                        &format!("at most {MAX_PER_CALLER} entries per node"),
                    )
                }
                None => {
                    tracing::info!(node_type = %key.0, app = %key.1, node = %key.2, "registry: node registered");
                    nodes.insert(key, node);
                    "created"
                }
            }
        };
        self.dirty.notify_one();
        json(StatusCode::OK, &serde_json::json!({ "status": status }))
    }

    /// The node `update` describes, checked.
    fn node(&self, peer: &VerifiedPeer, update: Update) -> Result<Node, Refusal> {
        let bad = |m: String| (StatusCode::BAD_REQUEST, m);
        let text = |what: &str, v: &str| match valid_text(v) {
            true => Ok(()),
            false => Err(bad(format!(
                "{what}: 1-{MAX_REGISTRY_TEXT} letters, digits, '-', '_' or '.'"
            ))),
        };
        let node_type = update
            .node_type
            .ok_or_else(|| bad("node_type parameter is required".into()))?;
        text("node_type", &node_type)?;
        let uuid = match (update.uuid, &peer.instance_id) {
            (Some(uuid), _) => uuid,
            (None, Some(instance)) => instance.clone(),
            (None, None) => {
                return Err(bad(
                    "uuid parameter is required (the caller's certificate names no instance)"
                        .into(),
                ))
            }
        };
        text("uuid", &uuid)?;
        let hostname = update.hostname.unwrap_or_else(|| uuid.clone());
        text("hostname", &hostname)?;
        if update.labels.len() > MAX_ITEMS || update.ports.len() > MAX_ITEMS {
            return Err(bad(format!(
                "at most {MAX_ITEMS} labels and {MAX_ITEMS} ports"
            )));
        }
        for (k, v) in &update.labels {
            text("label", k)?;
            if v.len() > MAX_REGISTRY_TEXT || v.chars().any(char::is_control) {
                return Err(bad(format!(
                    "label {k}: a short value without control characters"
                )));
            }
        }
        let app_id = peer.app_id.to_string();
        let mut ports = Vec::new();
        for p in update.ports {
            text("port name", &p.name)?;
            if p.port == 0 {
                return Err(bad(format!("port {}: 1-65535", p.name)));
            }
            let connect = match &peer.instance_id {
                Some(instance) => format!("{instance}.{app_id}.dstack:{}", p.port),
                None => format!("{app_id}.dstack:{}", p.port),
            };
            ports.push(ReachablePort {
                name: p.name,
                port: p.port,
                connect,
            });
        }
        let now = unix_now();
        Ok(Node {
            uuid,
            hostname,
            node_type,
            app_id,
            instance_id: peer.instance_id.clone(),
            tailscale_ip: None,
            labels: update.labels,
            ports,
            registered_at: now,
            updated_at: now,
            expires_at: now.saturating_add(i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX)),
        })
    }

    /// The live nodes, of `node_type` when given.
    pub fn nodes(&self, node_type: Option<&str>) -> Vec<Node> {
        let now = unix_now();
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes
            .values()
            .filter(|n| node_type.is_none_or(|t| n.node_type == t) && n.expires_at > now)
            .cloned()
            .collect()
    }

    /// Sweep expired entries and write the state after changes, at most once per
    /// [`FLUSH_EVERY`]. Runs until dropped.
    pub async fn keep(self: Arc<Self>) {
        #[cfg(feature = "etcd")]
        self.restore_from_fleet().await;
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut dirty = false;
        loop {
            tokio::select! {
                _ = self.dirty.notified() => dirty = true,
                _ = tick.tick() => {
                    dirty |= self.sweep();
                    if std::mem::take(&mut dirty) && !self.save().await {
                        dirty = true;
                    }
                }
            }
        }
    }

    /// Drop expired entries; whether any went.
    fn sweep(&self) -> bool {
        let now = unix_now();
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let before = nodes.len();
        nodes.retain(|(node_type, app, node), n| {
            let live = n.expires_at > now;
            if !live {
                tracing::info!(%node_type, %app, %node, "registry: node expired (no heartbeat)");
            }
            live
        });
        nodes.len() != before
    }

    /// Write the state (the file: 0600, atomically). `false`: not written, try again at the
    /// next tick (logged); a state that cannot be serialised is logged and not retried.
    async fn save(&self) -> bool {
        let state = State {
            version: 1,
            nodes: self.nodes(None),
        };
        let bytes = match serde_json::to_vec(&state) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(error = %e, "registry: state not serialised");
                return true;
            }
        };
        #[cfg(feature = "etcd")]
        if let Some(fleet) = &self.fleet {
            use crate::acme::seal::Kind;
            return match fleet.put_value(Kind::Registry, FLEET_STATE, &bytes).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(store = %fleet.location(), error = %e, "registry: state not stored (entries live on in memory)");
                    false
                }
            };
        }
        let Some((dir, name)) = split(&self.state_file) else {
            return true;
        };
        match DirStore::new(dir).write(&name, &bytes, true) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "registry: state file not written (entries live on in memory)");
                false
            }
        }
    }

    /// Read the state back from the fleet's store, retrying until it answers; registrations
    /// that arrived meanwhile are newer and stay.
    #[cfg(feature = "etcd")]
    async fn restore_from_fleet(&self) {
        use crate::acme::seal::Kind;
        let Some(fleet) = &self.fleet else {
            return;
        };
        let mut delay = Duration::from_millis(250);
        let stored = loop {
            match fleet.get_value(Kind::Registry, FLEET_STATE).await {
                Ok(stored) => break stored,
                Err(e) => {
                    tracing::warn!(store = %fleet.location(), error = %e, retry_in = ?delay, "registry: stored entries not read yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        };
        let restored = match stored.map(|b| serde_json::from_slice::<State>(&b)) {
            None => return,
            Some(Ok(state)) => state.nodes,
            Some(Err(e)) => {
                return tracing::error!(error = %e, "registry: stored entries unreadable; starting empty")
            }
        };
        let now = unix_now();
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let before = nodes.len();
        for node in restored.into_iter().filter(|n| n.expires_at > now) {
            nodes.entry(key_of(&node)).or_insert(node);
        }
        tracing::info!(nodes = nodes.len() - before, store = %fleet.location(), "registry: entries restored");
    }
}

/// `a=1&b=x%20y` as decoded pairs (`+` is a space); undecodable pairs are skipped.
fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    // `+` first: an encoded plus (`%2B`) stays a plus.
    let decode = |s: &str| ratls::quote::percent_decode(&s.replace('+', " "));
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(move |pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((decode(k)?, decode(v)?))
        })
}

fn key_of(node: &Node) -> Key {
    let who = node
        .instance_id
        .clone()
        .unwrap_or_else(|| node.uuid.clone());
    (node.node_type.clone(), node.app_id.clone(), who)
}

fn split(path: &Path) -> Option<(PathBuf, String)> {
    let dir = path.parent()?.to_owned();
    let name = path.file_name()?.to_string_lossy().into_owned();
    Some((dir, name))
}

/// An update from its JSON body, with dstack-vpc's query parameters over it.
pub(crate) fn parse_update(query: &str, body: &[u8]) -> Result<Update, Refusal> {
    let mut update = match body.iter().all(u8::is_ascii_whitespace) {
        true => Update::default(),
        false => serde_json::from_slice::<Update>(body)
            .map_err(|e| (StatusCode::BAD_REQUEST, format!("body: {e}")))?,
    };
    for (k, v) in query_pairs(query) {
        let v = Some(v).filter(|v| !v.is_empty());
        match k.as_str() {
            "node_type" => update.node_type = v.or(update.node_type),
            "uuid" => update.uuid = v.or(update.uuid),
            "hostname" => update.hostname = v.or(update.hostname),
            _ => {}
        }
    }
    Ok(update)
}

/// The nodes of the state file at `path`; none when it is missing or unreadable (set aside).
fn read_state(path: &Path) -> Vec<Node> {
    let Some((dir, name)) = split(path) else {
        return Vec::new();
    };
    let store = DirStore::new(dir);
    match store.read(&name) {
        Ok(None) => Vec::new(),
        Ok(Some(bytes)) => match serde_json::from_slice::<State>(&bytes) {
            Ok(state) => state.nodes,
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "registry: state file unreadable; set aside, starting empty");
                let _ = store.quarantine(&name);
                Vec::new()
            }
        },
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "registry: state file unreadable; starting empty");
            Vec::new()
        }
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    proxy::json_response(status, value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_decoded() {
        let pairs: Vec<_> =
            query_pairs("uuid=n%2D1&node_type=mongodb&hostname=a+b&bad=%zz&x").collect();
        assert_eq!(
            pairs,
            [
                ("uuid".into(), "n-1".into()),
                ("node_type".into(), "mongodb".into()),
                ("hostname".into(), "a b".into()),
                ("x".into(), String::new()),
            ]
        );
    }
}
