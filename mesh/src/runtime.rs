//! The async runtime the binary runs on. With one core (a one-vCPU CVM, `taskset`, a cgroup
//! quota) a single thread without work stealing: there a multi-thread runtime's one worker
//! only adds wake-ups across threads, and the pinned benchmark rows spent 20% more CPU per
//! request on it (BENCHMARKS.md, per-core section). With more cores, a thread per core, each
//! with a runtime of its own and its own `SO_REUSEPORT` socket on the inbound, outbound and
//! auth listeners: a connection lives on one thread from accept to close, its pooled upstream
//! connections with it, and the kernel spreads new connections. Everything else (certificates,
//! rotation, admin, tunnels) runs on the main thread. Unpinned, this served 7–8% more mesh
//! requests and a third more outbound → inbound than tokio's work-stealing runtime
//! (BENCHMARKS.md), which `multi-thread` still selects.

use std::{
    cell::Cell,
    future::Future,
    num::NonZero,
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering},
};

/// `DSTACK_MESH_RUNTIME`: `current-thread`, `multi-thread` or `per-core`; unset, chosen by the
/// cores.
pub const ENV: &str = "DSTACK_MESH_RUNTIME";

/// Which runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// One thread runs every task.
    CurrentThread,
    /// Work-stealing workers, one per core (or `TOKIO_WORKER_THREADS`).
    MultiThread,
    /// A thread per core (or `TOKIO_WORKER_THREADS`), each serving its own socket on the busy
    /// listeners; everything else on the main thread.
    PerCore(NonZero<usize>),
}

impl Flavor {
    /// The flavor for `asked` (`DSTACK_MESH_RUNTIME`), `workers` (`TOKIO_WORKER_THREADS`) and
    /// the cores this process may run on.
    pub fn choose(
        asked: Option<&str>,
        workers: Option<&str>,
        cores: NonZero<usize>,
    ) -> Result<Self, String> {
        let threads = workers
            .and_then(|w| w.trim().parse::<NonZero<usize>>().ok())
            .unwrap_or(cores);
        match asked.map(str::trim) {
            Some("current-thread") => return Ok(Self::CurrentThread),
            Some("multi-thread") => return Ok(Self::MultiThread),
            Some("per-core") => return Ok(Self::PerCore(threads)),
            Some(other) => {
                let known = "current-thread, multi-thread or per-core (unset: by the cores)";
                return Err(format!("{ENV}={other:?}: {known}"));
            }
            None => {}
        }
        Ok(match threads.get() {
            1 => Self::CurrentThread,
            _ => Self::PerCore(threads),
        })
    }

    /// Its name in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CurrentThread => "current-thread",
            Self::MultiThread => "multi-thread",
            Self::PerCore(_) => "per-core",
        }
    }
}

/// Worker threads of the per-core runtime (0: none, every task on the process's runtime).
static WORKERS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's worker number, from 1; 0 off the workers.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// How many per-core worker threads serve the busy listeners (0: the process's runtime does).
pub fn workers() -> usize {
    WORKERS.load(Ordering::Relaxed)
}

/// Shards for state a connection's thread keeps to itself (the upstream and peer pools): the
/// main thread's and one per worker, so a pooled connection is driven by the reactor of the
/// thread that uses it.
pub fn shards() -> usize {
    workers() + 1
}

/// This thread's shard, below [`shards`]: 0 on the main thread (and every thread that is not a
/// worker), `1..=workers()` on the workers.
pub fn shard() -> usize {
    WORKER.with(Cell::get)
}

/// One `T` per shard: state a worker keeps to itself, reached without contention or wake-ups
/// across threads. Built after the runtime, so it has a shard for each worker.
#[derive(Debug)]
pub struct Sharded<T>(Box<[T]>);

impl<T: Default> Default for Sharded<T> {
    fn default() -> Self {
        Self((0..shards()).map(|_| T::default()).collect())
    }
}

impl<T> Sharded<T> {
    /// This thread's.
    pub fn local(&self) -> &T {
        &self.0[shard() % self.0.len()]
    }

    /// Every shard's (for sweeps and counts).
    pub fn all(&self) -> impl Iterator<Item = &T> {
        self.0.iter()
    }

    /// How many shards.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never: there is at least one shard.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What one worker serves: called on the worker's thread, inside its runtime (where listeners
/// are registered with its reactor).
pub type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// The per-core workers. Dropped, they stop (and their connections with them): drop them
/// once the drain is over.
#[derive(Debug)]
pub struct Workers {
    _stop: tokio::sync::watch::Sender<()>,
}

impl Workers {
    /// Start one thread per entry of `jobs`, each with a current-thread runtime running its
    /// jobs. Each receiver resolves once one of that thread's jobs has returned (its listener
    /// closed: the drain, or a failure) or the thread failed; its connections go on until the
    /// workers are dropped. A thread that cannot start stops those started before it.
    pub fn start(
        jobs: Vec<Vec<Job>>,
    ) -> std::io::Result<(Self, Vec<tokio::sync::oneshot::Receiver<()>>)> {
        let (stop, stopped) = tokio::sync::watch::channel(());
        let mut done = Vec::with_capacity(jobs.len());
        for (n, jobs) in jobs.into_iter().enumerate() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let stopped = stopped.clone();
            std::thread::Builder::new()
                .name(format!("dstack-mesh-{}", n + 1))
                .spawn(move || {
                    WORKER.set(n + 1);
                    // Built here: a runtime may not be dropped inside another (the caller's).
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime.block_on(work(jobs, tx, stopped)),
                        Err(e) => tracing::error!(error = %e, "a worker thread has no runtime"),
                    }
                })?;
            done.push(rx);
        }
        Ok((Self { _stop: stop }, done))
    }
}

/// One worker's life: its listeners until one ends (told through `listening`), then its
/// connections until `stopped`. Dropping the workers ends it at any point.
async fn work(
    jobs: Vec<Job>,
    listening: tokio::sync::oneshot::Sender<()>,
    mut stopped: tokio::sync::watch::Receiver<()>,
) {
    let mut serving = tokio::task::JoinSet::new();
    for job in jobs {
        serving.spawn(job());
    }
    tokio::select! {
        // A panic is caught here too: the main thread hears of it and drains the rest.
        _ = serving.join_next() => {}
        _ = stopped.changed() => return,
    }
    let _ = listening.send(());
    // Connections in flight finish (the drain) until the workers go.
    let _ = stopped.changed().await;
}

/// `copies` listeners on `addr`, each with `SO_REUSEPORT` when there is more than one (the
/// kernel spreads new connections among them), unregistered: each is handed to the runtime
/// that serves it. Port 0 picks one port for all.
pub fn reuseport_listeners(
    addr: std::net::SocketAddr,
    copies: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut addr = addr;
    if copies > 1 {
        // A socket without SO_REUSEPORT fails to bind where anything listens already, so a
        // port in use still fails the start instead of joining another process's group (and,
        // for port 0, picks the port).
        let probe = new_socket(addr)?;
        probe.set_reuseaddr(true)?;
        probe.bind(addr)?;
        addr = probe.local_addr()?;
    }
    let mut listeners = Vec::with_capacity(copies);
    for _ in 0..copies.max(1) {
        let socket = new_socket(addr)?;
        socket.set_reuseaddr(true)?;
        if copies > 1 {
            socket.set_reuseport(true)?;
        }
        socket.bind(addr)?;
        let listener = socket.listen(1024)?.into_std()?;
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

fn new_socket(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
}

/// The process's runtime, as [`Flavor::choose`] picks it from the environment.
pub fn build() -> Result<(tokio::runtime::Runtime, Flavor), String> {
    let cores = std::thread::available_parallelism().unwrap_or(NonZero::<usize>::MIN);
    let asked = std::env::var(ENV).ok();
    let workers = std::env::var("TOKIO_WORKER_THREADS").ok();
    let flavor = Flavor::choose(asked.as_deref(), workers.as_deref(), cores)?;
    let mut builder = match flavor {
        Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        Flavor::MultiThread => tokio::runtime::Builder::new_multi_thread(),
        Flavor::PerCore(threads) => {
            WORKERS.store(threads.get(), Ordering::Relaxed);
            tokio::runtime::Builder::new_current_thread()
        }
    };
    let runtime = builder
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    tracing::debug!(
        runtime = flavor.as_str(),
        cores = cores.get(),
        workers = self::workers(),
        "async runtime"
    );
    Ok((runtime, flavor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_core_runs_one_thread_more_cores_a_thread_each() {
        let cores = |n| NonZero::new(n).unwrap();
        let pick = |asked, workers, n| Flavor::choose(asked, workers, cores(n));
        assert_eq!(pick(None, None, 1), Ok(Flavor::CurrentThread));
        assert_eq!(pick(None, None, 2), Ok(Flavor::PerCore(cores(2))));
        assert_eq!(pick(None, Some("1"), 8), Ok(Flavor::CurrentThread));
        assert_eq!(pick(None, Some("4"), 1), Ok(Flavor::PerCore(cores(4))));
        assert_eq!(pick(Some("multi-thread"), None, 1), Ok(Flavor::MultiThread));
        assert_eq!(
            pick(Some("current-thread"), None, 8),
            Ok(Flavor::CurrentThread)
        );
        assert_eq!(
            pick(Some("per-core"), None, 2),
            Ok(Flavor::PerCore(cores(2)))
        );
        assert_eq!(
            pick(Some("per-core"), Some("3"), 2),
            Ok(Flavor::PerCore(cores(3)))
        );
        let e = pick(Some("fast"), None, 2).unwrap_err();
        assert!(e.contains("DSTACK_MESH_RUNTIME=\"fast\""), "{e}");
    }
}
