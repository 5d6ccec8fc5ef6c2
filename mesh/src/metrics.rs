//! Request and handshake metrics, recorded on the hot path with atomics and rendered as
//! Prometheus text by the admin port. Label sets are bounded: a direction, a peer (app id, or
//! the domain for public requests; at most [`MAX_PEERS`], then `other`), a rejection reason, a
//! key exchange group.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Registry,
};

/// Distinct peers tracked per direction; later ones are counted as `other`.
pub const MAX_PEERS: usize = 1000;
/// Upper bounds of the request duration histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Which way a request went through the sidecar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// A caller (mesh peer or public client) to our backend.
    Inbound,
    /// Our app to another app.
    Outbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// Where a TLS handshake completed: which listener branch, or our own outbound dial.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The inbound listener, a mesh caller.
    Mesh,
    /// The inbound listener, a public domain.
    Public,
    /// The inbound listener, an ACME TLS-ALPN-01 validation.
    AcmeChallenge,
    /// Our outbound connection to a peer sidecar.
    Outbound,
}

impl Side {
    const ALL: [Side; 4] = [
        Side::Mesh,
        Side::Public,
        Side::AcmeChallenge,
        Side::Outbound,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Mesh => "mesh",
            Self::Public => "public",
            Self::AcmeChallenge => "acme_challenge",
            Self::Outbound => "outbound",
        }
    }
}

/// Key exchange groups counted by name (IANA's); anything else is `other`.
const GROUPS: [(rustls::NamedGroup, &str); 4] = [
    (rustls::NamedGroup::X25519MLKEM768, "X25519MLKEM768"),
    (rustls::NamedGroup::X25519, "x25519"),
    (rustls::NamedGroup::secp256r1, "secp256r1"),
    (rustls::NamedGroup::secp384r1, "secp384r1"),
];

#[derive(Debug, Default)]
struct Counts {
    requests: AtomicU64,
    errors: AtomicU64,
}

#[derive(Debug)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        // Buckets are cumulative when rendered; here each observation lands in its first fit.
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

/// The sidecar's request and handshake counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Per direction: peer label → counts. Looked up by `&str`, so a known peer costs no
    /// allocation.
    peers: [RwLock<HashMap<String, Arc<Counts>>>; 2],
    durations: [Histogram; 2],
    handshake_failures: Mutex<BTreeMap<(Direction, &'static str), u64>>,
    /// Completed handshakes by side and key exchange group (the last column is `other`):
    /// how many peers negotiated the post-quantum hybrid.
    handshakes: [[AtomicU64; GROUPS.len() + 1]; Side::ALL.len()],
    /// TCP tunnels by side, configured name and outcome (names come from the configuration,
    /// so the label set is bounded).
    tunnels: Mutex<BTreeMap<(Direction, String, &'static str), u64>>,
    /// Connections accepted by the inbound and outbound listeners, per thread (`runtime::shard`:
    /// 0 the main thread, 1 to N the per-core workers): how evenly the kernel spreads them.
    accepted: [[AtomicU64; MAX_WORKERS]; 2],
}

/// Worker threads counted apart; later ones share the last row.
const MAX_WORKERS: usize = 32;

/// One peer's counters, resolved once (per connection inbound) and recorded into per request.
#[derive(Clone, Debug)]
pub struct PeerMetrics {
    metrics: Arc<Metrics>,
    direction: Direction,
    counts: Arc<Counts>,
}

impl PeerMetrics {
    /// One request answered (or failed) after `elapsed`.
    pub fn request(&self, failed: bool, elapsed: Duration) {
        self.counts.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.counts.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.metrics.durations[self.direction as usize].observe(elapsed);
    }
}

impl Metrics {
    /// The counters of `peer` in `direction` (created on first sight, `other` past the cap).
    pub fn peer(self: &Arc<Self>, direction: Direction, peer: &str) -> PeerMetrics {
        let map = &self.peers[direction as usize];
        let known = map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .cloned();
        let counts = known.unwrap_or_else(|| {
            let mut peers = map.write().unwrap_or_else(|p| p.into_inner());
            let key = match peers.len() < MAX_PEERS || peers.contains_key(peer) {
                true => peer,
                false => "other",
            };
            peers.entry(key.to_owned()).or_default().clone()
        });
        PeerMetrics {
            metrics: self.clone(),
            direction,
            counts,
        }
    }

    /// One request of `peer` (see [`Metrics::peer`]).
    pub fn request(
        self: &Arc<Self>,
        direction: Direction,
        peer: &str,
        failed: bool,
        elapsed: Duration,
    ) {
        self.peer(direction, peer).request(failed, elapsed);
    }

    /// Distinct peers seen in `direction`.
    pub fn peer_count(&self, direction: Direction) -> usize {
        self.peers[direction as usize]
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// A handshake refused for `reason` (a [`ratls::Rejection::reason`] or a transport word).
    pub fn handshake_failure(&self, direction: Direction, reason: &'static str) {
        let mut failures = self
            .handshake_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *failures.entry((direction, reason)).or_default() += 1;
    }

    /// A handshake completed on `side` with key exchange `group` (`None`: none was used).
    pub fn handshake(&self, side: Side, group: Option<rustls::NamedGroup>) {
        let column = GROUPS
            .iter()
            .position(|(g, _)| Some(*g) == group)
            .unwrap_or(GROUPS.len());
        self.handshakes[side as usize][column].fetch_add(1, Ordering::Relaxed);
    }

    /// A tunnel connection of the service or tunnel `name` ended its setup with `outcome`
    /// (`ok`, `resumed`, or why it failed). Inbound: a `[[inbound.tcp]]` service; outbound: a
    /// `[[tunnels]]` port or `CONNECT`.
    pub fn tunnel(&self, direction: Direction, name: &str, outcome: &'static str) {
        let mut tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        *tunnels
            .entry((direction, name.to_owned(), outcome))
            .or_default() += 1;
    }

    /// A connection accepted on `listener`'s socket of this thread.
    pub fn accepted(&self, listener: Direction) {
        let worker = crate::runtime::shard().min(MAX_WORKERS - 1);
        self.accepted[listener as usize][worker].fetch_add(1, Ordering::Relaxed);
    }

    /// How many tunnel setups of `name` ended with `outcome`.
    pub fn tunnel_count(&self, direction: Direction, name: &str, outcome: &'static str) -> u64 {
        let tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        tunnels
            .get(&(direction, name.to_owned(), outcome))
            .copied()
            .unwrap_or(0)
    }
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let mut rows: Vec<(Direction, String, u64, u64)> = Vec::new();
        for direction in [Direction::Inbound, Direction::Outbound] {
            let peers = self.peers[direction as usize]
                .read()
                .unwrap_or_else(|p| p.into_inner());
            for (peer, c) in peers.iter() {
                rows.push((
                    direction,
                    peer.clone(),
                    c.requests.load(Ordering::Relaxed),
                    c.errors.load(Ordering::Relaxed),
                ));
            }
        }
        rows.sort();
        for (name, help, errors) in [
            (
                "dstack_mesh_requests",
                "Requests answered, by direction and peer app id (the domain for public requests).",
                false,
            ),
            (
                "dstack_mesh_request_errors",
                "Requests answered with a 5xx or an error of the proxy's own.",
                true,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (direction, peer, requests, failed) in &rows {
                let value = if errors { failed } else { requests };
                let labels = [("direction", direction.as_str()), ("peer", peer.as_str())];
                family
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(value, None)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "dstack_mesh_request_duration_seconds",
            "Time to the response head, by direction.",
            None,
            MetricType::Histogram,
        )?;
        for direction in [Direction::Inbound, Direction::Outbound] {
            let h = &self.durations[direction as usize];
            let buckets: Vec<(f64, u64)> = BUCKETS
                .iter()
                .zip(&h.buckets)
                .map(|(bound, n)| (*bound, n.load(Ordering::Relaxed)))
                .collect();
            let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
            family
                .encode_family(&[("direction", direction.as_str())])?
                .encode_histogram::<NoLabelSet>(
                    sum,
                    h.count.load(Ordering::Relaxed),
                    &buckets,
                    None,
                )?;
        }
        let mut family = encoder.encode_descriptor(
            "dstack_mesh_handshake_failures",
            "Refused TLS handshakes, by direction and reason.",
            None,
            MetricType::Counter,
        )?;
        let failures = self
            .handshake_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for ((direction, reason), n) in failures.iter() {
            family
                .encode_family(&[("direction", direction.as_str()), ("reason", reason)])?
                .encode_counter::<NoLabelSet, _, u64>(n, None)?;
        }
        drop(failures);
        let mut family = encoder.encode_descriptor(
            "dstack_mesh_tls_handshakes",
            "Completed TLS handshakes, by side (mesh, public, acme_challenge, outbound) and key exchange group.",
            None,
            MetricType::Counter,
        )?;
        for side in Side::ALL {
            let names = GROUPS.iter().map(|(_, name)| *name).chain(["other"]);
            for (name, n) in names.zip(&self.handshakes[side as usize]) {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    family
                        .encode_family(&[("side", side.as_str()), ("group", name)])?
                        .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "dstack_mesh_tunnel_connections",
            "TCP tunnel setups, by direction (inbound: a TCP service; outbound: a tunnel port or CONNECT), name and outcome (resumed: a resumed TLS session, counted besides ok).",
            None,
            MetricType::Counter,
        )?;
        let tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        for ((direction, name, outcome), n) in tunnels.iter() {
            let labels = [
                ("direction", direction.as_str()),
                ("name", name.as_str()),
                ("outcome", outcome),
            ];
            family
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(n, None)?;
        }
        drop(tunnels);
        let mut family = encoder.encode_descriptor(
            "dstack_mesh_accepted_connections",
            "Connections accepted, by listener (inbound, outbound) and thread (1 to N: the per-core workers; 0: the main thread).",
            None,
            MetricType::Counter,
        )?;
        for direction in [Direction::Inbound, Direction::Outbound] {
            for (worker, n) in self.accepted[direction as usize].iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let worker = worker.to_string();
                    family
                        .encode_family(&[("listener", direction.as_str()), ("worker", &worker)])?
                        .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                }
            }
        }
        Ok(())
    }
}

/// The Prometheus text exposition of `collectors`, in order.
pub fn exposition(collectors: Vec<Box<dyn Collector>>) -> String {
    let mut registry = Registry::default();
    for collector in collectors {
        registry.register_collector(collector);
    }
    let mut out = String::new();
    // Writing into a String cannot fail; a collector's error would only cut the text short.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

/// `bytes` as lowercase hex in `buf`, for a label without a heap allocation (app ids are at
/// most 64 bytes).
pub fn hex_label<'b>(bytes: &[u8], buf: &'b mut [u8; 128]) -> &'b str {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = bytes.len().min(64);
    for (i, b) in bytes[..n].iter().enumerate() {
        buf[2 * i] = HEX[usize::from(b >> 4)];
        buf[2 * i + 1] = HEX[usize::from(b & 15)];
    }
    std::str::from_utf8(&buf[..2 * n]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_reasons() {
        let m = Arc::new(Metrics::default());
        m.request(Direction::Inbound, "ca11", false, Duration::from_millis(3));
        m.request(Direction::Inbound, "ca11", true, Duration::from_millis(300));
        m.request(Direction::Outbound, "b0b", false, Duration::from_secs(20));
        m.handshake_failure(Direction::Inbound, "app_id_not_allowed");
        m.handshake(Side::Public, Some(rustls::NamedGroup::X25519MLKEM768));
        m.handshake(Side::Public, Some(rustls::NamedGroup::X25519));
        m.handshake(Side::Public, Some(rustls::NamedGroup::X25519));
        m.handshake(Side::Outbound, Some(rustls::NamedGroup::FFDHE2048));
        let out = exposition(vec![Box::new(m.clone())]);
        for line in [
            "dstack_mesh_requests_total{direction=\"inbound\",peer=\"ca11\"} 2",
            "dstack_mesh_request_errors_total{direction=\"inbound\",peer=\"ca11\"} 1",
            "dstack_mesh_request_duration_seconds_bucket{direction=\"inbound\",le=\"0.005\"} 1",
            "dstack_mesh_request_duration_seconds_bucket{direction=\"inbound\",le=\"0.5\"} 2",
            "dstack_mesh_request_duration_seconds_bucket{direction=\"outbound\",le=\"10\"} 0",
            "dstack_mesh_request_duration_seconds_bucket{direction=\"outbound\",le=\"+Inf\"} 1",
            "dstack_mesh_request_duration_seconds_count{direction=\"inbound\"} 2",
            "dstack_mesh_handshake_failures_total{direction=\"inbound\",reason=\"app_id_not_allowed\"} 1",
            "dstack_mesh_tls_handshakes_total{side=\"public\",group=\"X25519MLKEM768\"} 1",
            "dstack_mesh_tls_handshakes_total{side=\"public\",group=\"x25519\"} 2",
            "dstack_mesh_tls_handshakes_total{side=\"outbound\",group=\"other\"} 1",
        ] {
            assert!(out.contains(line), "{line}\n{out}");
        }
        // Groups never seen are not rendered.
        assert!(!out.contains("side=\"mesh\""), "{out}");
    }

    #[test]
    fn peers_beyond_the_cap_count_as_other() {
        let m = Arc::new(Metrics::default());
        for i in 0..MAX_PEERS + 5 {
            m.request(
                Direction::Outbound,
                &format!("{i:040x}"),
                false,
                Duration::ZERO,
            );
        }
        let out = exposition(vec![Box::new(m.clone())]);
        assert!(out.contains("peer=\"other\"} 5"), "{out}");
        assert_eq!(
            out.matches("dstack_mesh_requests_total{").count(),
            MAX_PEERS + 1
        );
    }
}
