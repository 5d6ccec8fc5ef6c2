//! One classification of a failed exchange for every side: who caused it picks the status, the
//! short body the caller sees, the log level and the reason label; details go to the log only.

use http::StatusCode;

use super::UpstreamError;

/// Who caused a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    /// The caller (a bad request, a body it broke off): logged at debug, a 4xx.
    Caller,
    /// What we forward to (down, slow, busy, not who it should be): logged at warn, a 5xx.
    Upstream,
    /// This sidecar (no route yet, a setting): logged at warn, a 5xx.
    Internal,
}

/// What the other end of a forwarded exchange is, for the words of the short body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// The local app behind the inbound listener (or a public domain's backend).
    Backend,
    /// Another CVM's sidecar, reached by the outbound proxy.
    Peer,
}

/// A failure, classified: each kind has one blame, one status, one reason label and the short
/// body each hop's caller gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The caller broke off its own request body.
    CallerAborted,
    /// No response head in time.
    Timeout,
    /// Connecting (TCP or TLS) did not finish in time.
    ConnectTimeout,
    /// At its limit of requests in flight.
    Busy,
    /// Unreachable.
    Connect,
    /// Not the peer asked for (refused inside the handshake).
    Refused,
    /// The peer refused us.
    Rejected,
    /// Anything else that broke the exchange.
    Failed,
}

impl Failure {
    /// Who caused it.
    pub fn blame(self) -> Blame {
        match self {
            Self::CallerAborted => Blame::Caller,
            _ => Blame::Upstream,
        }
    }

    /// The status the caller gets.
    pub fn status(self) -> StatusCode {
        match self {
            Self::CallerAborted => StatusCode::BAD_REQUEST,
            Self::Timeout | Self::ConnectTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Busy => StatusCode::SERVICE_UNAVAILABLE,
            Self::Connect | Self::Refused | Self::Rejected | Self::Failed => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    /// A short, bounded reason for logs.
    pub fn reason(self) -> &'static str {
        match self {
            Self::CallerAborted => "caller_aborted",
            Self::Timeout => "timeout",
            Self::ConnectTimeout => "connect_timeout",
            Self::Busy => "busy",
            Self::Connect => "connect",
            Self::Refused => "refused",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
        }
    }

    /// The short body the caller gets (`{"error": ...}`), in `hop`'s words.
    pub fn short(self, hop: Hop) -> &'static str {
        match (self, hop) {
            (Self::CallerAborted, _) => "request body incomplete",
            (Self::Timeout | Self::ConnectTimeout, Hop::Backend) => "backend timed out",
            (Self::Busy, Hop::Backend) => "backend busy",
            (_, Hop::Backend) => "backend unavailable",
            (Self::Refused, Hop::Peer) => "peer identity mismatch",
            (Self::Rejected, Hop::Peer) => "peer refused this app",
            (Self::ConnectTimeout, Hop::Peer) => "peer did not answer in time",
            (Self::Timeout, Hop::Peer) => "peer response timed out",
            (Self::Connect, Hop::Peer) => "peer unreachable",
            (Self::Busy, Hop::Peer) => "too many requests in flight",
            (Self::Failed, Hop::Peer) => "peer failed",
        }
    }

    /// Log `message` with `detail` at the level the blame calls for, under the side's own
    /// target (`dstack_mesh::inbound` or `dstack_mesh::outbound`), so log filters by side keep
    /// working.
    pub fn log(self, hop: Hop, message: &str, detail: &dyn std::fmt::Display) {
        let (reason, status) = (self.reason(), self.status().as_u16());
        match (self.blame(), hop) {
            (Blame::Caller, Hop::Backend) => {
                tracing::debug!(target: "dstack_mesh::inbound", reason, status, %detail, "{message}")
            }
            (Blame::Caller, Hop::Peer) => {
                tracing::debug!(target: "dstack_mesh::outbound", reason, status, %detail, "{message}")
            }
            (_, Hop::Backend) => {
                tracing::warn!(target: "dstack_mesh::inbound", reason, status, %detail, "{message}")
            }
            (_, Hop::Peer) => {
                tracing::warn!(target: "dstack_mesh::outbound", reason, status, %detail, "{message}")
            }
        }
    }
}

impl UpstreamError {
    /// 502 when the upstream is down or broken, 504 when it is slow, 503 when it is at its
    /// limit, 400 when the caller broke off its own request.
    pub fn failure(&self) -> Failure {
        match self {
            Self::CallerAborted => Failure::CallerAborted,
            Self::Timeout { .. } => Failure::Timeout,
            Self::ConnectTimeout { .. } => Failure::ConnectTimeout,
            Self::Busy { .. } => Failure::Busy,
            Self::Connect { .. } => Failure::Connect,
            Self::Refused { .. } => Failure::Refused,
            Self::Rejected { .. } => Failure::Rejected,
            Self::Failed { .. } => Failure::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_one_status_and_words_for_both_hops() {
        let upstream = || "u".to_owned();
        let table = [
            (
                UpstreamError::CallerAborted,
                400,
                "request body incomplete",
                "request body incomplete",
            ),
            (
                UpstreamError::Timeout {
                    upstream: upstream(),
                    timeout: std::time::Duration::ZERO,
                },
                504,
                "backend timed out",
                "peer response timed out",
            ),
            (
                UpstreamError::ConnectTimeout {
                    upstream: upstream(),
                    reason: String::new(),
                },
                504,
                "backend timed out",
                "peer did not answer in time",
            ),
            (
                UpstreamError::Busy {
                    upstream: upstream(),
                },
                503,
                "backend busy",
                "too many requests in flight",
            ),
            (
                UpstreamError::Connect {
                    upstream: upstream(),
                    reason: String::new(),
                },
                502,
                "backend unavailable",
                "peer unreachable",
            ),
            (
                UpstreamError::Refused {
                    upstream: upstream(),
                    rejection: ratls::Rejection::UnknownIssuer,
                    reason: String::new(),
                },
                502,
                "backend unavailable",
                "peer identity mismatch",
            ),
            (
                UpstreamError::Rejected {
                    upstream: upstream(),
                    reason: String::new(),
                },
                502,
                "backend unavailable",
                "peer refused this app",
            ),
            (
                UpstreamError::Failed {
                    upstream: upstream(),
                    reason: String::new(),
                },
                502,
                "backend unavailable",
                "peer failed",
            ),
        ];
        for (e, status, backend, peer) in table {
            let f = e.failure();
            assert_eq!(f.status().as_u16(), status, "{e}");
            assert_eq!(f.short(Hop::Backend), backend, "{e}");
            assert_eq!(f.short(Hop::Peer), peer, "{e}");
            assert_eq!(
                f.blame() == Blame::Caller,
                f.status().is_client_error(),
                "{e}"
            );
        }
    }

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn failures_log_under_their_side_at_the_blames_level() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let upstream = UpstreamError::Busy {
                upstream: "u".into(),
            };
            upstream
                .failure()
                .log(Hop::Peer, "outbound request failed", &"d");
            upstream
                .failure()
                .log(Hop::Backend, "inbound request failed", &"d");
            UpstreamError::CallerAborted
                .failure()
                .log(Hop::Peer, "outbound request failed", &"d");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let seen: Vec<(&str, &str, &str)> = lines
            .iter()
            .map(|l| {
                (
                    l["target"].as_str().unwrap(),
                    l["level"].as_str().unwrap(),
                    l["fields"]["reason"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("dstack_mesh::outbound", "WARN", "busy"),
                ("dstack_mesh::inbound", "WARN", "busy"),
                ("dstack_mesh::outbound", "DEBUG", "caller_aborted"),
            ]
        );
    }
}
