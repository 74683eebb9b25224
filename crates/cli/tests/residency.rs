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
    let mut refused = 0;
    for i in 0..45usize {
        let node = 1 + (i * 7) % 9;
        let gw = api(node);
        let home = REGIONS[i % 3];
        let (c_profile, c_order) = (canary(), canary());
        allowed.insert(c_profile.clone(), home);
        allowed.insert(c_order.clone(), "eu-west");
        // While eu-west and ap-south are cut apart, requests between them are unavailable.
        let cut = (15..30).contains(&i);
        let ok = |s: u16| s == 200 || s == 201 || (cut && s == 503);
        let put = |path: String, body: String| send(&http, reqwest::Method::PUT, format!("{gw}/v1/datasets/{path}"), Some(body));
        // Writes through any gateway are carried to a home: into an allowed region.
        let (s, b) = put(format!("profiles/keys/{home}%2Fuser-{i}"), format!("{{\"ssn\":\"{c_profile}\"}}")).await;
        assert!(ok(s), "profiles PUT via node {node}: {s} {b}");
        let (s, b) = put(format!("orders/keys/order-{i}"), format!("{{\"card\":\"{c_order}\"}}")).await;
        assert!(ok(s), "orders PUT via node {node}: {s} {b}");
        let (s, b) = put(format!("catalog/keys/item-{i}"), format!("{{\"i\":{i}}}")).await;
        assert!(ok(s), "{s} {b}");
        let (s, b) = put(format!("carts/keys/cart-{i}"), format!("[{i}]")).await;
        assert!(ok(s), "{s} {b}");
        // Reads through every gateway: served where the value may be, refused elsewhere.
        let (s, b) =
            send(&http, reqwest::Method::GET, format!("{gw}/v1/datasets/profiles/keys/{home}%2Fuser-{i}"), None).await;
        if region_of(node) == home {
            assert!(ok(s), "{s} {b}");
        } else {
            assert_eq!(s, 403, "{b}");
            assert!(b.contains("residency_refused"), "{b}");
            refused += 1;
        }
        let (s, b) = send(&http, reqwest::Method::GET, format!("{gw}/v1/datasets/orders/keys/order-{i}"), None).await;
        if region_of(node) == "eu-west" {
            assert!(ok(s), "{s} {b}");
        } else {
            assert_eq!(s, 403, "{b}");
        }
        let (s, b) = send(&http, reqwest::Method::GET, format!("{gw}/v1/datasets/catalog/keys/item-{i}"), None).await;
        assert!(ok(s) || s == 404 && cut, "{s} {b}");
        // A cut in the middle: the links catch up after the heal.
        if i == 15 {
            assert!(cli(&api(1), &["chaos", "partition", "eu-west", "ap-south"]).0);
        }
        if i == 30 {
            assert!(cli(&api(1), &["chaos", "heal"]).0);
        }
    }
    assert!(refused > 20, "foreign gateways refused reads ({refused})");
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
