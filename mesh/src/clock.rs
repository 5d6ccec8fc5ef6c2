//! Time as the sidecar stores and shows it: Unix seconds, and RFC 3339 (UTC) for people.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 before it, saturating far after).
pub fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// [`unix`] of now.
pub fn unix_now() -> i64 {
    unix(SystemTime::now())
}

/// [`unix`] as an unsigned count (the form JSON status documents carry).
pub fn unix_u64(t: SystemTime) -> u64 {
    u64::try_from(unix(t)).unwrap_or(0)
}

/// Unix seconds as RFC 3339, UTC (the same text certificates are shown with).
pub fn rfc3339(unix: i64) -> String {
    ratls::cert::ChainView::format_time(unix)
}

/// A time for logs and tables, RFC 3339, UTC.
pub fn rfc3339_of(t: SystemTime) -> String {
    rfc3339(unix(t))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn unix_and_rfc3339() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(unix(t), 1_700_000_000);
        assert_eq!(unix_u64(UNIX_EPOCH - Duration::from_secs(5)), 0);
        assert_eq!(rfc3339_of(t), "2023-11-14T22:13:20Z");
    }
}
