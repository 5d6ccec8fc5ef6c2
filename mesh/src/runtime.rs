//! The async runtime the binary runs on. With one core (a one-vCPU CVM, `taskset`, a cgroup
//! quota) a single thread without work stealing: there a multi-thread runtime's one worker
//! only adds wake-ups across threads, and the pinned benchmark rows spent 20% more CPU per
//! request on it (BENCHMARKS.md, per-core section). With more cores, tokio's work-stealing
//! runtime, one worker per core.

use std::num::NonZero;

/// `DSTACK_MESH_RUNTIME`: `current-thread` or `multi-thread`; unset, chosen by the cores.
pub const ENV: &str = "DSTACK_MESH_RUNTIME";

/// Which runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// One thread runs every task.
    CurrentThread,
    /// Work-stealing workers, one per core (or `TOKIO_WORKER_THREADS`).
    MultiThread,
}

impl Flavor {
    /// The flavor for `asked` (`DSTACK_MESH_RUNTIME`), `workers` (`TOKIO_WORKER_THREADS`) and
    /// the cores this process may run on.
    pub fn choose(
        asked: Option<&str>,
        workers: Option<&str>,
        cores: NonZero<usize>,
    ) -> Result<Self, String> {
        match asked.map(str::trim) {
            Some("current-thread") => return Ok(Self::CurrentThread),
            Some("multi-thread") => return Ok(Self::MultiThread),
            Some(other) => {
                return Err(format!(
                    "{ENV}={other:?}: current-thread or multi-thread (unset: by the cores)"
                ))
            }
            None => {}
        }
        let one = match workers.map(|w| w.trim().parse::<usize>()) {
            Some(Ok(n)) => n == 1,
            _ => cores.get() == 1,
        };
        Ok(if one {
            Self::CurrentThread
        } else {
            Self::MultiThread
        })
    }

    /// Its name in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CurrentThread => "current-thread",
            Self::MultiThread => "multi-thread",
        }
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
    };
    let runtime = builder
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    tracing::debug!(
        runtime = flavor.as_str(),
        cores = cores.get(),
        "async runtime"
    );
    Ok((runtime, flavor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_core_runs_one_thread_unless_told_otherwise() {
        let cores = |n| NonZero::new(n).unwrap();
        let pick = |asked, workers, n| Flavor::choose(asked, workers, cores(n));
        assert_eq!(pick(None, None, 1), Ok(Flavor::CurrentThread));
        assert_eq!(pick(None, None, 2), Ok(Flavor::MultiThread));
        assert_eq!(pick(None, Some("1"), 8), Ok(Flavor::CurrentThread));
        assert_eq!(pick(None, Some("4"), 1), Ok(Flavor::MultiThread));
        assert_eq!(pick(Some("multi-thread"), None, 1), Ok(Flavor::MultiThread));
        assert_eq!(
            pick(Some("current-thread"), None, 8),
            Ok(Flavor::CurrentThread)
        );
        let e = pick(Some("fast"), None, 2).unwrap_err();
        assert!(e.contains("DSTACK_MESH_RUNTIME=\"fast\""), "{e}");
    }
}
