//! Child-process handling for the clusters under test: spawning with output
//! redirected to a log file, and a guard that kills every child when dropped
//! (normal teardown, early return on error, or unwinding from a panic).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};

/// One spawned cluster member.
#[derive(Debug)]
pub struct Member {
    /// Human-readable name used in messages (`e1`, `node 2`, ...).
    pub name: String,
    /// Where the member's stdout and stderr go.
    pub log: PathBuf,
    child: Child,
}

/// Owns the processes of one cluster; dropping it kills and reaps them all.
#[derive(Debug, Default)]
pub struct ProcessGuard {
    members: Vec<Member>,
}

impl ProcessGuard {
    /// An empty guard.
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns `cmd` with stdin closed and stdout+stderr appended to `log`,
    /// and takes ownership of the child.
    pub fn spawn(&mut self, name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<()> {
        let out = File::create(log).with_context(|| format!("creating log file {}", log.display()))?;
        let err = out.try_clone().with_context(|| format!("duplicating log file handle {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd.spawn().with_context(|| format!("starting {name} ({program})"))?;
        self.members.push(Member { name: name.to_string(), log: log.to_path_buf(), child });
        Ok(())
    }

    /// The spawned members, in spawn order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Fails if any member has already exited, naming its log file.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        for m in &mut self.members {
            if let Some(status) = m.child.try_wait().with_context(|| format!("checking on {}", m.name))? {
                bail!("{} exited early ({status}); see its log at {}", m.name, m.log.display());
            }
        }
        Ok(())
    }

    /// Kills member `i` with SIGKILL and reaps it (a crash, not a shutdown).
    pub fn kill_one(&mut self, i: usize) -> anyhow::Result<()> {
        let m = self.members.get_mut(i).with_context(|| format!("no member {i}"))?;
        m.child.kill().with_context(|| format!("killing {}", m.name))?;
        m.child.wait().with_context(|| format!("reaping {}", m.name))?;
        Ok(())
    }

    /// Kills and reaps every member. Idempotent.
    pub fn kill_all(&mut self) {
        for m in &mut self.members {
            // Already-exited children make kill() fail; wait() still reaps them.
            let _ = m.child.kill();
            let _ = m.child.wait();
        }
        self.members.clear();
    }
}

impl ProcessGuard {
    /// Poll `probe` on every URL until all answer healthy, or fail after `timeout` naming each
    /// member's log and last problem. Also fails at once if a member process exits.
    pub async fn wait_healthy<F, Fut>(
        &mut self,
        what: &str,
        urls: &[String],
        timeout: std::time::Duration,
        probe: F,
    ) -> anyhow::Result<()>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let deadline = std::time::Instant::now() + timeout;
        let mut last = vec![String::from("not polled yet"); urls.len()];
        loop {
            self.ensure_running()?;
            let mut healthy = 0;
            for (i, base) in urls.iter().enumerate() {
                match probe(base.clone()).await {
                    Ok(()) => healthy += 1,
                    Err(e) => last[i] = format!("{e:#}"),
                }
            }
            if healthy == urls.len() {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                let detail = self
                    .members()
                    .iter()
                    .zip(&last)
                    .map(|(m, err)| format!("{} (log {}): {err}", m.name, m.log.display()))
                    .collect::<Vec<_>>()
                    .join("; ");
                bail!("{what} not healthy within {timeout:?}: {detail}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_kills_children_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let mut guard = ProcessGuard::new();
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        guard.spawn("sleeper", cmd, &dir.path().join("s.log")).unwrap();
        let pid = guard.members()[0].child.id();
        guard.ensure_running().unwrap();
        drop(guard);
        // A reaped pid no longer has a /proc entry (barring immediate reuse).
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn early_exit_names_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("f.log");
        let mut guard = ProcessGuard::new();
        guard.spawn("quitter", Command::new("true"), &log).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match guard.ensure_running() {
                Err(e) => {
                    let msg = format!("{e:#}");
                    assert!(msg.contains("quitter") && msg.contains("f.log"), "{msg}");
                    break;
                }
                Ok(()) if std::time::Instant::now() > deadline => panic!("never exited"),
                Ok(()) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
    }
}
