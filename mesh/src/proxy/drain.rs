//! Graceful shutdown for one sidecar: every listener stops accepting, every connection is asked
//! to finish what it has in flight (HTTP/1.1 closes after the current response, h2 sends
//! GOAWAY), and the process waits for them up to a deadline.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::sync::{watch, Notify};

/// Shared by the listeners and connections of one sidecar. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Drain(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    started: watch::Sender<bool>,
    live: AtomicUsize,
    gone: Notify,
}

impl Default for Drain {
    fn default() -> Self {
        Self(Arc::new(Inner {
            started: watch::channel(false).0,
            live: AtomicUsize::new(0),
            gone: Notify::new(),
        }))
    }
}

impl Drain {
    /// Begin: listeners stop accepting, connections wind down.
    pub fn start(&self) {
        self.0.started.send_replace(true);
    }

    /// Resolves once draining has begun (at once if it has).
    pub async fn started(&self) {
        let mut rx = self.0.started.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Count a connection until the guard drops.
    pub fn track(&self) -> Tracked {
        self.0.live.fetch_add(1, Ordering::SeqCst);
        Tracked(self.0.clone())
    }

    /// Connections still open.
    pub fn live(&self) -> usize {
        self.0.live.load(Ordering::SeqCst)
    }

    /// Wait until every tracked connection has ended or `deadline` passes; how many were left.
    pub async fn wait(&self, deadline: Duration) -> usize {
        let end = tokio::time::Instant::now() + deadline;
        loop {
            // Registered before the check, so a close in between is not missed.
            let gone = self.0.gone.notified();
            let live = self.live();
            if live == 0 || tokio::time::timeout_at(end, gone).await.is_err() {
                return self.live();
            }
        }
    }
}

/// One open connection, counted by its [`Drain`].
#[derive(Debug)]
pub struct Tracked(Arc<Inner>);

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.gone.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_tracked_connections_up_to_the_deadline() {
        let drain = Drain::default();
        assert_eq!(drain.wait(Duration::from_millis(10)).await, 0);
        let a = drain.track();
        let b = drain.track();
        drain.start();
        drain.started().await;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(a);
        });
        assert_eq!(drain.wait(Duration::from_millis(200)).await, 1);
        drop(b);
        assert_eq!(drain.wait(Duration::from_secs(5)).await, 0);
    }
}
