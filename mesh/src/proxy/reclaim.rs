//! Room at a full listener: when every connection slot is taken, connections that are only
//! waiting for their next request are asked to close, as nginx reuses its keep-alive
//! connections at `worker_connections`. Without this, whoever holds `max_connections` idle
//! connections keeps every new caller in the kernel backlog until their idle timeouts fire.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::Notify;

use super::Activity;

/// Idle connections closed each time a full listener asks (nginx closes up to 32).
pub const BATCH: usize = 32;

/// One listener's idle connections, closable when it is full.
#[derive(Debug, Default)]
pub struct Reclaim {
    wanted: Notify,
    /// How many more idle connections the last ask may close.
    tickets: AtomicUsize,
    closed: AtomicU64,
}

impl Reclaim {
    /// The listener is full: up to [`BATCH`] of its idle connections close.
    pub fn ask(&self) {
        self.tickets.store(BATCH, Ordering::Relaxed);
        self.wanted.notify_waiters();
    }

    /// Resolves when this connection, idle (nothing in flight on `activity`) when the listener
    /// asked, is one of those that close.
    pub async fn picked(&self, activity: &Activity) {
        loop {
            self.wanted.notified().await;
            if activity.in_flight() == 0 && self.take_ticket() {
                self.closed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }

    fn take_ticket(&self) -> bool {
        self.tickets
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| t.checked_sub(1))
            .is_ok()
    }

    /// Idle connections closed to make room so far.
    pub fn closed(&self) -> u64 {
        self.closed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;

    /// Spawn one waiting connection per activity; how many of them were picked.
    async fn ask_with(activities: &[Arc<Activity>]) -> (Arc<Reclaim>, usize) {
        let reclaim = Arc::new(Reclaim::default());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut waiting = Vec::new();
        for activity in activities {
            let (reclaim, activity, tx) = (reclaim.clone(), activity.clone(), tx.clone());
            waiting.push(tokio::spawn(async move {
                reclaim.picked(&activity).await;
                let _ = tx.send(());
            }));
        }
        drop(tx);
        // Every task waits on the notification before the ask.
        tokio::task::yield_now().await;
        reclaim.ask();
        // The picked ones report at once; the others wait for a later ask.
        let mut picked = 0;
        while tokio::time::timeout(Duration::from_secs(1), rx.recv())
            .await
            .ok()
            .flatten()
            .is_some()
        {
            picked += 1;
        }
        for task in waiting {
            task.abort();
        }
        (reclaim, picked)
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_listener_closes_idle_connections_only_and_at_most_a_batch() {
        let busy = Activity::new();
        let _in_flight = busy.request();
        let (reclaim, picked) = ask_with(std::slice::from_ref(&busy)).await;
        assert_eq!(picked, 0, "a connection with a request in flight stays");
        assert_eq!(reclaim.closed(), 0);

        let idle: Vec<_> = (0..BATCH + 8).map(|_| Activity::new()).collect();
        let (reclaim, picked) = ask_with(&idle).await;
        assert_eq!(picked, BATCH);
        assert_eq!(reclaim.closed(), BATCH as u64);
    }
}
