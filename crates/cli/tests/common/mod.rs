//! A multi-process harness: real `meridian server` processes on loopback, with kill -9 and
//! restart, for one region of three zones.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meridian_client::Client;

pub const BIN: &str = env!("CARGO_BIN_EXE_meridian");

/// A base port whose 9 API ports and 9 peer ports (+100) are all free when checked. Another
/// test process may still take one before the demo binds it; [`start_demo_with`] then retries.
pub fn free_base_port() -> u16 {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    for attempt in 0..50u32 {
        let slot = (std::process::id().wrapping_mul(7919) ^ seed).wrapping_add(attempt * 211) % 900;
        let base = 20_000 + slot as u16 * 10;
        let ok = (0..9).all(|i| {
            TcpListener::bind(("127.0.0.1", base + i)).is_ok()
                && TcpListener::bind(("127.0.0.1", base + 100 + i)).is_ok()
        });
        if ok {
            return base;
        }
    }
    panic!("no free port range for the demo");
}

/// Start `meridian demo` (keeping its data in `data_dir` if given) and wait for its banner.
/// Returns the process (the caller stops and reaps it), its base port and the banner lines.
pub fn start_demo(data_dir: Option<&Path>) -> (Child, u16, Vec<String>) {
    start_demo_with(data_dir, &[])
}

/// How many times a demo that exits before its banner (a port taken between the check and
/// the bind, by a concurrent test) is started again on other ports.
const DEMO_STARTS_MAX: usize = 5;

/// [`start_demo`] with extra arguments to `meridian demo`.
#[allow(clippy::zombie_processes)]
pub fn start_demo_with(data_dir: Option<&Path>, extra: &[&str]) -> (Child, u16, Vec<String>) {
    use std::io::{BufRead, BufReader};
    let mut failures = Vec::new();
    for _ in 0..DEMO_STARTS_MAX {
        let base = free_base_port();
        let stderr_file = tempfile::NamedTempFile::new().expect("a file for the demo's stderr");
        let mut cmd = Command::new(BIN);
        cmd.args(["demo", "--base-port", &base.to_string()]).args(extra);
        if let Some(d) = data_dir {
            cmd.arg("--data-dir").arg(d);
        }
        let stderr = Stdio::from(stderr_file.reopen().expect("reopen the stderr file"));
        let mut demo = cmd.stdout(Stdio::piped()).stderr(stderr).spawn().expect("start the demo");
        let stdout = demo.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut banner = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    let done = line.contains("Press Ctrl-C");
                    banner.push(line);
                    if done {
                        return (demo, base, banner);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    // It exited before its banner: start it again on other ports.
                    let status = demo.wait().expect("reap the demo");
                    let err = std::fs::read_to_string(stderr_file.path()).unwrap_or_default();
                    let tail: String = err.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                    failures
                        .push(format!("base {base}: {status}, printed {banner:?}, stderr (last lines first): {tail}"));
                    break;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let _ = demo.kill();
                    let _ = demo.wait();
                    panic!("the demo did not come up in 60 s; it printed: {banner:?}");
                }
            }
        }
    }
    panic!("the demo exited before its banner {DEMO_STARTS_MAX} times:\n{}", failures.join("\n"));
}

/// A free loopback port (bound and released; the OS does not hand it out again at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `n` distinct free loopback ports: all are held at once while chosen, so one configuration
/// never gets the same port twice (taking them one by one, the OS may hand one out again).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// `meridian server` processes on loopback: one or more regions of three zones each. Node
/// ids run from 1 in region order (the first region's nodes are 1, 2, 3).
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub api: Vec<String>,
    /// Each region's name and node ids.
    pub regions: Vec<(String, Vec<u64>)>,
    children: Vec<Option<Child>>,
}

/// One region of three nodes (a [`Cluster`] with one region, `r1`).
pub type Region = Cluster;

impl Cluster {
    /// Start a region of three nodes; `extra` is appended to the configuration file.
    pub fn start(extra: &str) -> Cluster {
        Cluster::start_regions(&["r1"], extra)
    }

    /// Start three nodes per region (the first region is the policy authority); `extra` is
    /// appended to the configuration file. Waits for every region's leader.
    pub fn start_regions(names: &[&str], extra: &str) -> Cluster {
        let dir = tempfile::Builder::new().prefix("meridian-it-").tempdir().unwrap();
        // Every node of the cluster signs session tokens with the same key.
        let mut text = format!("[session]\nkey = \"{}\"\n\n", "6d".repeat(32));
        for name in names {
            text.push_str(&format!("[[regions]]\nname = \"{name}\"\n\n"));
        }
        let mut api = Vec::new();
        let mut regions = Vec::new();
        let ports = free_ports(6 * names.len());
        for (r, name) in names.iter().enumerate() {
            let mut ids = Vec::new();
            for (z, zone) in ["a", "b", "c"].iter().enumerate() {
                let i = 3 * r + z;
                let (a, p) = (ports[2 * i], ports[2 * i + 1]);
                text.push_str(&format!(
                    "[[nodes]]\nid = {}\nregion = \"{name}\"\nzone = \"{zone}\"\napi_addr = \"127.0.0.1:{a}\"\npeer_addr = \"127.0.0.1:{p}\"\n\n",
                    i + 1
                ));
                api.push(format!("http://127.0.0.1:{a}"));
                ids.push(i as u64 + 1);
            }
            regions.push((name.to_string(), ids));
        }
        text.push_str(extra);
        let config = dir.path().join("cluster.toml");
        std::fs::write(&config, text).unwrap();
        let n = api.len();
        let mut cluster = Cluster { dir, config, api, regions, children: (0..n).map(|_| None).collect() };
        for id in 1..=n as u64 {
            cluster.spawn(id);
        }
        for r in 0..names.len() {
            cluster.wait_leader_of(r, Duration::from_secs(30));
        }
        cluster
    }

    /// The API address of the first node of region `r` (by index).
    pub fn api_of(&self, r: usize) -> &str {
        &self.api[(self.regions[r].1[0] - 1) as usize]
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("n{id}"))
    }

    fn log_path(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("n{id}.log"))
    }

    pub fn spawn(&mut self, id: u64) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(id)).unwrap();
        let child = Command::new(BIN)
            .arg("server")
            .arg("--config")
            .arg(&self.config)
            .arg("--node")
            .arg(id.to_string())
            .arg("--data-dir")
            .arg(self.data_dir(id))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn meridian server");
        self.children[(id - 1) as usize] = Some(child);
    }

    /// kill -9: no shutdown path runs, unsynced state is lost as on a power cut of the process.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.children[(id - 1) as usize].take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn client(&self, id: u64) -> Client {
        Client::new(&self.api[(id - 1) as usize], Duration::from_secs(15))
    }

    /// Run a future to completion from synchronous code, even inside a test's runtime.
    fn blocking<T: Send>(f: impl std::future::Future<Output = T> + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f))
                .join()
                .unwrap()
        })
    }

    /// The first region's leader as reported by a live node, waiting up to `deadline`.
    pub fn wait_leader(&self, deadline: Duration) -> u64 {
        self.wait_leader_of(0, deadline)
    }

    /// Region `r`'s leader as reported by a live node of it, waiting up to `deadline`.
    pub fn wait_leader_of(&self, r: usize, deadline: Duration) -> u64 {
        let start = Instant::now();
        loop {
            for &id in &self.regions[r].1 {
                if self.children[(id - 1) as usize].is_none() {
                    continue;
                }
                if let Ok(h) = Self::blocking(self.client(id).health()) {
                    if let Some(l) = h.leader {
                        if self.children[(l - 1) as usize].is_some() {
                            return l;
                        }
                    }
                }
            }
            if start.elapsed() > deadline {
                self.dump_logs();
                panic!("no leader within {deadline:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub async fn leader(&self, deadline: Duration) -> u64 {
        self.leader_of(0, deadline).await
    }

    /// Region `r`'s leader, from a live node of it.
    pub async fn leader_of(&self, r: usize, deadline: Duration) -> u64 {
        let start = Instant::now();
        loop {
            for &id in &self.regions[r].1 {
                if self.children[(id - 1) as usize].is_none() {
                    continue;
                }
                if let Ok(h) = self.client(id).health().await {
                    if let Some(l) = h.leader.filter(|l| self.children[(*l - 1) as usize].is_some()) {
                        return l;
                    }
                }
            }
            assert!(start.elapsed() < deadline, "no leader within {deadline:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until node `id` has applied at least `index`.
    pub async fn wait_applied(&self, id: u64, index: u64, deadline: Duration) {
        let start = Instant::now();
        loop {
            if let Ok(h) = self.client(id).health().await {
                if h.applied_index.unwrap_or(0) >= index {
                    return;
                }
            }
            if start.elapsed() > deadline {
                self.dump_logs();
                panic!("node {id} did not apply index {index} within {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn dump_logs(&self) {
        for id in 1..=self.api.len() as u64 {
            let text = std::fs::read_to_string(self.log_path(id)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            eprintln!("---- node {id} log (last lines) ----");
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }

    pub fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    out.extend(Self::files_under(&p));
                } else {
                    out.push(p);
                }
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Nanoseconds since `start`, the shared clock of a recorded history.
pub fn nanos(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

/// Run the CLI against `endpoint`: (success, stdout, stderr).
pub fn cli(endpoint: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).args(["--endpoint", endpoint]).output().expect("run the CLI");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run the CLI with `--json` and parse what it prints; the command must succeed.
pub fn cli_json(endpoint: &str, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (ok, out, err) = cli(endpoint, &all);
    assert!(ok, "meridian {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("meridian {args:?} printed no JSON ({e}): {out}"))
}

/// A child process killed and reaped when the test ends, however it ends.
pub struct Stop(pub Child);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether any file under `dir` contains `needle`.
pub fn files_contain(dir: &Path, needle: &[u8]) -> bool {
    Region::files_under(dir)
        .iter()
        .any(|f| std::fs::read(f).map(|bytes| bytes.windows(needle.len()).any(|w| w == needle)).unwrap_or(false))
}

/// PUT a JSON body at `{endpoint}/v1/datasets/{path}`: the status and the JSON answer.
#[allow(dead_code)]
pub async fn put_json(http: &reqwest::Client, endpoint: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    send_json(http, reqwest::Method::PUT, endpoint, path, body).await
}

/// POST a JSON body (an operation) at `{endpoint}/v1/datasets/{path}`.
#[allow(dead_code)]
pub async fn post_json(http: &reqwest::Client, endpoint: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    send_json(http, reqwest::Method::POST, endpoint, path, body).await
}

async fn send_json(
    http: &reqwest::Client,
    method: reqwest::Method,
    endpoint: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let resp = http
        .request(method, format!("{endpoint}/v1/datasets/{path}"))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

/// [`put_json`] that must succeed; the JSON answer.
#[allow(dead_code)]
pub async fn put_ok(http: &reqwest::Client, endpoint: &str, path: &str, body: &str) -> serde_json::Value {
    let (status, answer) = put_json(http, endpoint, path, body).await;
    assert!((200..300).contains(&status), "PUT {path}: {status} {answer}");
    answer
}

/// Poll `f` until it holds, failing the test after `deadline`.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < deadline, "{what} did not happen within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait for `cond`, polling every 250 ms, up to a minute (a bound, not a timing: probes,
/// promotions and links each take a few seconds).
pub fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A demo with `policy` applied in every region: one node's API in each of us-east, eu-west
/// and ap-south, and a directory for the test's files. The demo stops when this is dropped.
pub struct PolicyDemo {
    pub us: String,
    pub eu: String,
    pub ap: String,
    pub dir: tempfile::TempDir,
    _stop: Stop,
}

impl PolicyDemo {
    pub fn start(policy: &str) -> PolicyDemo {
        let (demo, base, _) = start_demo(None);
        let stop = Stop(demo);
        let api = |n: u16| format!("http://127.0.0.1:{}", base + n);
        let (us, eu, ap) = (api(0), api(4), api(7));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(&file, policy).unwrap();
        let applied = cli_json(&us, &["policy", "apply", file.to_str().unwrap()]);
        assert_eq!(applied["pending"], serde_json::json!([]), "every region holds the policy: {applied}");
        PolicyDemo { us, eu, ap, dir, _stop: stop }
    }
}
