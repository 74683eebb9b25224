//! The node's background work: every task is spawned here, by name, and its handle kept, so
//! that shutdown can stop all of them and wait until none is left.
//!
//! Three kinds of task:
//! - a *job* is short and bounded by its own deadline (one batch in flight, one cursor
//!   proposal). Its slot is reserved before the work it carries is decided
//!   ([`Supervisor::reserve_job`]), so a refusal never strands a decision half taken. Jobs are
//!   idempotent, so shutdown aborts them at once;
//! - a *worker* runs for the node's life (a link's shipper, the policy sync, anti-entropy).
//!   Shutdown cancels it at its next await: everything a worker does is safe to cut short (a
//!   resend, or a proposal whose outcome it does not need);
//! - a *late worker* (the proposer, the commit announcer) must outlive the workers, which may
//!   still be proposing; it gets its own signal, raised once the workers are gone, and winds
//!   down by itself.
//!
//! Each phase waits at most the caller's bound, then aborts what is left and waits for the
//! aborts, so that when [`Supervisor::shutdown`] returns no task of the node is running. The
//! Raft core is not a task of the supervisor: the node stops it last.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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

/// A reserved job slot: the job it is spent on is sure to start.
pub struct JobSlot {
    _permit: OwnedSemaphorePermit,
}

/// Owns the handle of every task the node spawns.
pub struct Supervisor {
    stop: StopSignal,
    late_stop: StopSignal,
    workers: Mutex<Vec<Task>>,
    late: Mutex<Vec<Task>>,
    jobs: Mutex<Vec<Task>>,
    job_slots: Arc<Semaphore>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor {
            stop: StopSignal::default(),
            late_stop: StopSignal::default(),
            workers: Mutex::new(Vec::new()),
            late: Mutex::new(Vec::new()),
            jobs: Mutex::new(Vec::new()),
            job_slots: Arc::new(Semaphore::new(SUPERVISED_TASKS_MAX)),
        }
    }
}

impl Supervisor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Raised when shutdown starts: workers are cancelled, and stop looking for work.
    pub fn stop_signal(&self) -> StopSignal {
        self.stop.clone()
    }

    /// Start a worker that runs for the node's life; shutdown cancels it at its next await.
    pub fn spawn_worker<F>(&self, name: &'static str, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop.clone();
        let cancellable = async move {
            tokio::select! {
                biased;
                _ = stop.raised() => {}
                _ = fut => {}
            }
        };
        Self::push(&self.workers, &self.stop, name, cancellable);
    }

    /// Start a worker that must outlive the others: `run` gets the signal raised once every
    /// worker has stopped, and must return soon after it (or be aborted at the bound).
    pub fn spawn_late_worker<F>(&self, name: &'static str, run: impl FnOnce(StopSignal) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        Self::push(&self.late, &self.stop, name, run(self.late_stop.clone()));
    }

    fn push<F>(table: &Mutex<Vec<Task>>, stop: &StopSignal, name: &'static str, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut tasks = table.lock().expect("supervisor lock");
        if stop.is_raised() {
            return;
        }
        tasks.push(Task { name, handle: tokio::spawn(fut) });
        assert!(tasks.len() <= SUPERVISED_TASKS_MAX, "more than {SUPERVISED_TASKS_MAX} tasks of one kind");
    }

    /// Reserve room for one job: `None` once the node is shutting down, or while
    /// [`SUPERVISED_TASKS_MAX`] jobs are running.
    pub fn reserve_job(&self) -> Option<JobSlot> {
        if self.stop.is_raised() {
            return None;
        }
        self.job_slots.clone().try_acquire_owned().ok().map(|p| JobSlot { _permit: p })
    }

    /// Start a job in a reserved slot (freed when the job ends). A job started as shutdown
    /// begins is aborted with the others.
    pub fn spawn_reserved<F>(&self, slot: JobSlot, name: &'static str, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut jobs = self.jobs.lock().expect("supervisor lock");
        jobs.retain(|t| !t.handle.is_finished());
        let handle = tokio::spawn(async move {
            let _slot = slot;
            fut.await
        });
        if self.stop.is_raised() {
            handle.abort();
        }
        jobs.push(Task { name, handle });
    }

    /// Reserve a slot and start a job in it; false (nothing started) if there is no room.
    pub fn spawn_job<F>(&self, name: &'static str, fut: F) -> bool
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        match self.reserve_job() {
            Some(slot) => {
                self.spawn_reserved(slot, name, fut);
                true
            }
            None => false,
        }
    }

    /// The workers (late ones too) still running, and the number of jobs.
    pub fn running(&self) -> Running {
        let alive = |table: &Mutex<Vec<Task>>| -> Vec<&'static str> {
            table.lock().expect("supervisor lock").iter().filter(|t| !t.handle.is_finished()).map(|t| t.name).collect()
        };
        let mut workers = alive(&self.workers);
        workers.extend(alive(&self.late));
        let mut jobs = self.jobs.lock().expect("supervisor lock");
        jobs.retain(|t| !t.handle.is_finished());
        Running { workers, jobs: jobs.len() }
    }

    /// Raise the stop signal as the node is dropped without a shutdown: the tasks end on their
    /// own, unwaited.
    pub(crate) fn abandon(&self) {
        self.stop.raise();
        self.late_stop.raise();
    }

    /// Stop everything: abort the jobs; cancel the workers and wait for them; then signal
    /// the late workers and wait for them. Each wait is at most `bound`, after which what is
    /// left is aborted (and waited for). Returns the names of the tasks that had to be aborted
    /// past a bound.
    pub async fn shutdown(&self, bound: Duration) -> Vec<&'static str> {
        let (workers, jobs) = {
            let mut workers = self.workers.lock().expect("supervisor lock");
            let mut jobs = self.jobs.lock().expect("supervisor lock");
            self.stop.raise();
            (std::mem::take(&mut *workers), std::mem::take(&mut *jobs))
        };
        for job in &jobs {
            job.handle.abort();
        }
        // Aborted on purpose (a batch or a cursor is simply sent again): not reported.
        Self::wait(jobs, bound).await;
        let mut aborted = Self::wait(workers, bound).await;
        let late = {
            let mut late = self.late.lock().expect("supervisor lock");
            self.late_stop.raise();
            std::mem::take(&mut *late)
        };
        aborted.extend(Self::wait(late, bound).await);
        if !aborted.is_empty() {
            tracing::warn!(tasks = ?aborted, "node tasks did not stop within {bound:?} and were aborted");
        }
        aborted
    }

    async fn wait(tasks: Vec<Task>, bound: Duration) -> Vec<&'static str> {
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
        aborted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn workers_are_cancelled_late_workers_outlive_them_and_stubborn_ones_are_aborted() {
        let s = Supervisor::new();
        let order = Arc::new(Mutex::new(Vec::new()));
        let guard = Logged(order.clone(), "worker");
        s.spawn_worker("worker", async move {
            let _guard = guard;
            std::future::pending::<()>().await
        });
        let o = order.clone();
        s.spawn_late_worker("late", move |stop| async move {
            stop.raised().await;
            o.lock().expect("order").push("late");
        });
        s.spawn_late_worker("stubborn", |_| std::future::pending());
        assert!(s.spawn_job("job", std::future::pending()));
        assert_eq!(s.running().workers, vec!["worker", "late", "stubborn"]);
        assert_eq!(s.running().jobs, 1);
        let aborted = s.shutdown(Duration::from_millis(50)).await;
        assert_eq!(aborted, vec!["stubborn"], "the job is aborted on purpose, not counted");
        assert_eq!(*order.lock().expect("order"), vec!["worker", "late"], "late workers stop after the others");
        assert_eq!(s.running(), Running::default());
        // Nothing new starts once the node is stopping.
        assert!(s.reserve_job().is_none());
        assert!(!s.spawn_job("late job", async {}));
        s.spawn_worker("late worker", std::future::pending());
        assert_eq!(s.running(), Running::default());
    }

    /// Records its name when dropped (a cancelled worker is dropped).
    struct Logged(Arc<Mutex<Vec<&'static str>>>, &'static str);

    impl Drop for Logged {
        fn drop(&mut self) {
            self.0.lock().expect("order").push(self.1);
        }
    }

    #[tokio::test]
    async fn job_slots_are_bounded_and_freed_when_jobs_end() {
        let s = Supervisor::new();
        let slots: Vec<JobSlot> = (0..SUPERVISED_TASKS_MAX).map(|_| s.reserve_job().expect("room")).collect();
        assert!(s.reserve_job().is_none(), "every slot is taken");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut slots = slots.into_iter();
        s.spawn_reserved(slots.next().expect("a slot"), "job", async move {
            let _ = tx.send(());
        });
        rx.await.expect("the job ran");
        drop(slots);
        let start = std::time::Instant::now();
        while s.reserve_job().is_none() {
            assert!(start.elapsed() < Duration::from_secs(5), "a finished job never gave its slot back");
            tokio::task::yield_now().await;
        }
    }
}
