//! The node's background work: every task is spawned here, by name, and its handle kept, so
//! that shutdown can signal all of them and wait until none is left.
//!
//! Two kinds of task. A *worker* runs for the node's life (the proposer, a link's shipper,
//! the policy sync, anti-entropy) and watches the [`StopSignal`]. A *job* is short and bounded
//! by its own deadline (one batch in flight, one cursor proposal); jobs are counted by name so
//! the table of handles stays bounded, and finished ones are dropped as new ones start.
//!
//! Shutdown: raise the signal, wait up to the caller's bound for every task to return, then
//! abort whatever is left and wait for the aborts, so that when [`Supervisor::shutdown`]
//! returns no task of the node is running. It does not wait for the Raft core: the node
//! stops that itself, after its own tasks (which may still be proposing) are gone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::limits::SUPERVISED_TASKS_MAX;

/// Raised once, when the node starts to shut down. Cheap to clone and to check.
#[derive(Clone, Default)]
pub struct StopSignal {
    inner: Arc<StopInner>,
}

#[derive(Default)]
struct StopInner {
    raised: AtomicBool,
    notify: tokio::sync::Notify,
}

impl StopSignal {
    pub fn is_raised(&self) -> bool {
        self.inner.raised.load(Ordering::Acquire)
    }

    /// Resolves once the signal is raised (at once if it already is).
    pub async fn raised(&self) {
        loop {
            let notified = self.inner.notify.notified();
            if self.is_raised() {
                return;
            }
            notified.await;
        }
    }

    /// Sleep for `d`, or less if the signal is raised meanwhile. True if it was.
    pub async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            biased;
            _ = self.raised() => true,
            _ = tokio::time::sleep(d) => self.is_raised(),
        }
    }

    fn raise(&self) {
        self.inner.raised.store(true, Ordering::Release);
        self.inner.notify.notify_waiters();
    }
}

struct Task {
    name: &'static str,
    handle: JoinHandle<()>,
}

/// What is running, by name (for tests and status).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Running {
    pub workers: Vec<&'static str>,
    pub jobs: usize,
}

/// Owns the handle of every task the node spawns.
#[derive(Default)]
pub struct Supervisor {
    stop: StopSignal,
    workers: Mutex<Vec<Task>>,
    jobs: Mutex<Vec<Task>>,
}

impl Supervisor {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stop_signal(&self) -> StopSignal {
        self.stop.clone()
    }

    /// Start a worker that runs for the node's life. It must return soon after the stop
    /// signal is raised; one that does not is aborted at the shutdown bound.
    pub fn spawn_worker<F>(&self, name: &'static str, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut workers = self.workers.lock().expect("supervisor lock");
        if self.stop.is_raised() {
            return;
        }
        workers.push(Task { name, handle: tokio::spawn(fut) });
        assert!(workers.len() <= SUPERVISED_TASKS_MAX, "more than {SUPERVISED_TASKS_MAX} workers");
    }

    /// Start a short job (it carries its own deadline). Returns false, starting nothing, once
    /// the node is shutting down or when [`SUPERVISED_TASKS_MAX`] jobs are still running.
    pub fn spawn_job<F>(&self, name: &'static str, fut: F) -> bool
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut jobs = self.jobs.lock().expect("supervisor lock");
        if self.stop.is_raised() {
            return false;
        }
        jobs.retain(|t| !t.handle.is_finished());
        if jobs.len() >= SUPERVISED_TASKS_MAX {
            return false;
        }
        jobs.push(Task { name, handle: tokio::spawn(fut) });
        true
    }

    /// The workers still running and the number of jobs.
    pub fn running(&self) -> Running {
        let workers = self.workers.lock().expect("supervisor lock");
        let mut jobs = self.jobs.lock().expect("supervisor lock");
        jobs.retain(|t| !t.handle.is_finished());
        Running {
            workers: workers.iter().filter(|t| !t.handle.is_finished()).map(|t| t.name).collect(),
            jobs: jobs.len(),
        }
    }

    /// Raise the stop signal, wait up to `bound` for every task, then abort the rest and wait
    /// for them too. Returns the names of the tasks that had to be aborted.
    pub async fn shutdown(&self, bound: Duration) -> Vec<&'static str> {
        let tasks: Vec<Task> = {
            let mut workers = self.workers.lock().expect("supervisor lock");
            let mut jobs = self.jobs.lock().expect("supervisor lock");
            self.stop.raise();
            workers.drain(..).chain(jobs.drain(..)).collect()
        };
        let deadline = tokio::time::Instant::now() + bound;
        let mut aborted = Vec::new();
        for mut task in tasks {
            match tokio::time::timeout_at(deadline, &mut task.handle).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) if e.is_panic() => tracing::error!(task = task.name, "a node task panicked"),
                Ok(Err(_)) => {}
                Err(_) => {
                    task.handle.abort();
                    // Wait for the abort to land: an aborted task is gone only once polled.
                    let _ = task.handle.await;
                    aborted.push(task.name);
                }
            }
        }
        if !aborted.is_empty() {
            tracing::warn!(tasks = ?aborted, "node tasks did not stop within {bound:?} and were aborted");
        }
        aborted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_waits_for_workers_that_stop_and_aborts_those_that_do_not() {
        let s = Supervisor::new();
        let stop = s.stop_signal();
        s.spawn_worker("polite", async move { stop.raised().await });
        s.spawn_worker("stubborn", std::future::pending());
        assert!(s.spawn_job("job", async {}));
        assert_eq!(s.running().workers, vec!["polite", "stubborn"]);
        let aborted = s.shutdown(Duration::from_millis(50)).await;
        assert_eq!(aborted, vec!["stubborn"]);
        assert_eq!(s.running(), Running::default());
        // Nothing new starts once the node is stopping.
        assert!(!s.spawn_job("late", async {}));
        s.spawn_worker("late", std::future::pending());
        assert_eq!(s.running(), Running::default());
    }

    #[tokio::test]
    async fn a_stop_signal_cuts_a_sleep_short() {
        let s = Supervisor::new();
        let stop = s.stop_signal();
        let sleeper = tokio::spawn(async move { stop.sleep(Duration::from_secs(3600)).await });
        tokio::task::yield_now().await;
        s.shutdown(Duration::from_secs(1)).await;
        assert!(sleeper.await.expect("sleeper"), "the sleep did not report the signal");
    }
}
