//! Residency under a mixed workload in the demo topology: every value of the restricted
//! dataset (`profiles`, each key homed in one region) and of the EU-only dataset (`orders`)
//! embeds a random 16-byte canary. Requests go through every gateway, a link is cut and healed
//! on the way. Then every message body that crossed a region boundary (the demo's wire
//! capture) and every file in every data directory is scanned: no canary may appear in bytes
//! sent to, or stored in, a region its policy keeps it out of. Positive controls show the scan
//! sees the canaries where they are allowed.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::{cli, wait_until, Region, Stop};

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
/// Every canary starts with this, so one pass over a byte string finds them all.
const MARK: &[u8] = b"rc-";

/// A fresh canary: the mark and 16 random bytes in hex.
fn canary() -> String {
    let bytes: [u8; 16] = rand::random();
    format!("rc-{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Every canary in `bytes` (the mark followed by 32 hex digits).
fn canaries_in(bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + MARK.len() + 32 <= bytes.len() {
        if &bytes[i..i + MARK.len()] == MARK {
            let hex = &bytes[i + MARK.len()..i + MARK.len() + 32];
            if hex.iter().all(u8::is_ascii_hexdigit) {
                out.push(String::from_utf8_lossy(&bytes[i..i + MARK.len() + 32]).into_owned());
                i += MARK.len() + 32;
                continue;
            }
        }
        i += 1;
    }
    out
}

/// The wire capture's records: (destination region, body).
fn capture_records(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for f in Region::files_under(dir) {
        let bytes = std::fs::read(&f).unwrap();
        let mut rest = &bytes[..];
        while let Some(start) = find(rest, b"\n#MWIRE ") {
            rest = &rest[start + 1..];
            let eol = find(rest, b"\n").expect("a header line");
            let header = String::from_utf8_lossy(&rest[..eol]).into_owned();
            let field = |name: &str| -> String {
                header.split(' ').find_map(|p| p.strip_prefix(&format!("{name}="))).unwrap().to_owned()
            };
            let len: usize = field("len").parse().unwrap();
            let body = rest[eol + 1..eol + 1 + len].to_vec();
            out.push((field("dst"), body));
            rest = &rest[eol + 1 + len..];
        }
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn send(http: &reqwest::Client, method: reqwest::Method, url: String, body: Option<String>) -> (u16, String) {
    let mut req = http.request(method, url).header("content-type", "application/json");
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_canary_reaches_a_region_its_policy_keeps_it_out_of() {
    let data = tempfile::tempdir().unwrap();
    let capture = tempfile::tempdir().unwrap();
    let capture_arg = capture.path().display().to_string();
    let (demo, base, _) = common::start_demo_with(Some(data.path()), &["--wire-capture", &capture_arg]);
    let _stop = Stop(demo);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    // Nodes 1-3 are us-east, 4-6 eu-west, 7-9 ap-south; node n listens on base + n - 1.
    let api = |node: usize| format!("http://127.0.0.1:{}", base as usize + node - 1);
    let region_of = |node: usize| REGIONS[(node - 1) / 3];
    // canary -> the one region allowed to hold it.
    let mut allowed: HashMap<String, &str> = HashMap::new();
    // One client per gateway, all at once; each writes and reads ROUNDS keys of every dataset.
    const ROUNDS: usize = 6;
    let mut clients = Vec::new();
    for node in 1..=9usize {
        let mut plan = Vec::new();
        for j in 0..ROUNDS {
            let i = node * ROUNDS + j;
            let (c_profile, c_order) = (canary(), canary());
            allowed.insert(c_profile.clone(), REGIONS[i % 3]);
            allowed.insert(c_order.clone(), "eu-west");
            plan.push((i, REGIONS[i % 3], c_profile, c_order));
        }
        let (http, gw, here) = (http.clone(), api(node), region_of(node));
        clients.push(tokio::spawn(async move {
            let (mut done, mut unavailable, mut refused) = (0, 0, 0);
            // 503: the request had to cross the link that is cut for a while; 504: it was in
            // flight when the cut came, and its answer was lost with the link.
            let mut ok = |s: u16, b: &str| match s {
                200 | 201 => done += 1,
                503 | 504 => unavailable += 1,
                _ => panic!("via node {node}: {s} {b}"),
            };
            for (i, home, c_profile, c_order) in plan {
                let url = |path: String| format!("{gw}/v1/datasets/{path}");
                let put = |path: String, body: String| send(&http, reqwest::Method::PUT, url(path), Some(body));
                // Writes through any gateway are carried to a home: into an allowed region.
                let (s, b) =
                    put(format!("profiles/keys/{home}%2Fuser-{i}"), format!("{{\"ssn\":\"{c_profile}\"}}")).await;
                ok(s, &b);
                let (s, b) = put(format!("orders/keys/order-{i}"), format!("{{\"card\":\"{c_order}\"}}")).await;
                ok(s, &b);
                let (s, b) = put(format!("catalog/keys/item-{i}"), format!("{{\"i\":{i}}}")).await;
                ok(s, &b);
                let (s, b) = send(
                    &http,
                    reqwest::Method::POST,
                    url(format!("carts/keys/cart-{i}/add")),
                    Some(format!("{{\"members\":[\"{i}\"]}}")),
                )
                .await;
                ok(s, &b);
                // Reads through every gateway: served where the value may be, refused elsewhere.
                for (path, holder) in
                    [(format!("profiles/keys/{home}%2Fuser-{i}"), home), (format!("orders/keys/order-{i}"), "eu-west")]
                {
                    let (s, b) = send(&http, reqwest::Method::GET, url(path), None).await;
                    if here == holder {
                        if s != 404 {
                            ok(s, &b);
                        }
                    } else {
                        assert_eq!(s, 403, "via node {node}: {b}");
                        assert!(b.contains("residency_refused"), "{b}");
                        refused += 1;
                    }
                }
            }
            (done, unavailable, refused)
        }));
    }
    // A cut while the clients run: the links catch up after the heal.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(cli(&api(1), &["chaos", "partition", "eu-west", "ap-south"]).0);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert!(cli(&api(1), &["chaos", "heal"]).0);
    let (mut done, mut unavailable, mut refused) = (0, 0, 0);
    for c in clients {
        let (d, u, r) = c.await.unwrap();
        (done, unavailable, refused) = (done + d, unavailable + u, refused + r);
    }
    assert!(done > 4 * unavailable, "most requests were served ({done} done, {unavailable} unavailable)");
    assert!(refused > 40, "foreign gateways refused reads ({refused})");
    wait_until("every allowed copy verifies equal", Duration::from_secs(60), || {
        let a = api(1);
        async move { cli(&a, &["replication", "verify"]).0 }
    })
    .await;

    // The wire: no canary in bytes sent to a region that may not hold it.
    let records = capture_records(capture.path());
    assert!(records.len() > 100, "the capture saw the cross-region traffic ({} records)", records.len());
    let mut seen_allowed = 0;
    for (dst, body) in &records {
        for c in canaries_in(body) {
            let Some(home) = allowed.get(&c) else { continue };
            assert_eq!(dst, home, "canary {c} (allowed only in {home}) crossed into {dst}");
            seen_allowed += 1;
        }
    }
    assert!(seen_allowed > 0, "positive control: writes relayed to their home carry canaries on the wire");

    // The disks: no canary in any file of a region that may not hold it.
    let mut stored = 0;
    for node in 1..=9usize {
        let region = region_of(node);
        for f in Region::files_under(&data.path().join(format!("node-{node}"))) {
            for c in canaries_in(&std::fs::read(&f).unwrap()) {
                let Some(home) = allowed.get(&c) else { continue };
                assert_eq!(region, *home, "canary {c} (allowed only in {home}) stored on node {node} in {region}");
                stored += 1;
            }
        }
    }
    assert!(stored > 0, "positive control: the home regions store the canaries");
}
