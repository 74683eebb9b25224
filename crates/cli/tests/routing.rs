//! Routing through the real binary: a read that names no level reads at its dataset's; a
//! write taken in a region that is not a home goes to the nearest home that region's probes
//! find up, and to another home once that one is cut off.

mod common;

use common::{cli, cli_json, wait_for, PolicyDemo};

/// Two homes, listed farther first as seen from eu-west (ap-south 75 ms one way, us-east 40).
const POLICY: &str = r#"format = 1

[[dataset]]
name = "notes"
locality = "global"
classification = "internal"
home = ["ap-south", "us-east"]
conflict = "lww"

[[dataset]]
name = "feed"
locality = "global"
classification = "public"
home = ["us-east"]
mirrors = "all-allowed"
consistency = "local"
"#;

/// The reachability of `region` as the node at `endpoint` sees it.
fn seen(endpoint: &str, region: &str) -> String {
    let s = cli_json(endpoint, &["cluster", "status"]);
    let r = s["regions"].as_array().unwrap().iter().find(|r| r["name"] == region).unwrap().clone();
    r["health"]["reachability"].as_str().unwrap_or("").to_owned()
}

#[test]
fn reads_take_their_datasets_level_and_writes_go_to_the_nearest_home_up() {
    let demo = PolicyDemo::start(POLICY);
    let (us, eu, ap) = (demo.us.clone(), demo.eu.clone(), demo.ap.clone());

    // A read that names no level reads at the dataset's: feed's is local, so a mirror serves
    // it; notes names none, so strong, from a home's leader.
    let (ok, _, err) = cli(&us, &["put", "feed", "f1", "\"hello\""]);
    assert!(ok, "{err}");
    wait_for(
        || {
            let (ok, _, err) = cli(&ap, &["get", "feed", "f1"]);
            ok && err.contains("served by ap-south/") && err.contains(", local)")
        },
        "feed/f1 served by ap-south's copy at the dataset's default level",
    );
    let (ok, _, err) = cli(&ap, &["get", "feed", "f1", "--consistency", "strong"]);
    assert!(ok && err.contains("served by us-east/"), "a level named wins over the default: {err}");
    let (ok, out, err) = cli(&us, &["get", "feed", "f1", "--consistency", "sometimes"]);
    assert!(!ok && err.contains("invalid_consistency"), "{out}{err}");

    wait_for(|| seen(&eu, "us-east") == "up" && seen(&eu, "ap-south") == "up", "eu-west to find both homes up");
    // Both up: the nearer home takes it, not the first listed.
    wait_for(
        || {
            let (ok, out, _) = cli(&eu, &["put", "notes", "n1", "1"]);
            ok && out.contains("served by us-east/")
        },
        "a write through eu-west served in us-east (policy applied there, nearest home)",
    );

    // Cut eu-west from us-east: once eu-west's probes mark us-east down, its writes go to
    // ap-south instead of failing.
    let (ok, out, err) = cli(&eu, &["chaos", "partition", "eu-west", "us-east"]);
    assert!(ok, "{out}{err}");
    wait_for(|| seen(&eu, "us-east") == "down", "eu-west to find us-east down");
    let (ok, out, err) = cli(&eu, &["put", "notes", "n2", "2"]);
    assert!(ok && out.contains("served by ap-south/") && out.contains("forwarded-to-home"), "{out}{err}");
    // ap-south, not cut from us-east, still sends its own writes nowhere else: it is a home.
    let (ok, out, err) = cli(&ap, &["put", "notes", "n3", "3"]);
    assert!(ok && out.contains("served by ap-south/"), "{out}{err}");

    // Healed: back to the nearer home once the probes say it is up again.
    let (ok, _, err) = cli(&eu, &["chaos", "heal"]);
    assert!(ok, "{err}");
    wait_for(|| seen(&eu, "us-east") == "up", "eu-west to find us-east up again");
    let (ok, out, err) = cli(&eu, &["put", "notes", "n4", "4"]);
    assert!(ok && out.contains("served by us-east/"), "{out}{err}");
    let (ok, _, err) = cli(&eu, &["get", "notes", "n4"]);
    assert!(ok && err.contains("served by us-east/") && err.contains("forwarded-to-home"), "strong by default: {err}");
    // Every write reached both homes.
    for key in ["n1", "n2", "n3", "n4"] {
        for home in [&us, &ap] {
            wait_for(
                || cli(home, &["get", "notes", key, "--consistency", "local"]).0,
                &format!("{key} in the home at {home}"),
            );
        }
    }
}

/// `prices` is held in us-east and ap-south only, so eu-west reads it from another region;
/// `quotes` is mirrored everywhere and read bounded to 3 s by default.
const COPIES: &str = r#"format = 1

[[dataset]]
name = "prices"
locality = "global"
classification = "internal"
home = ["us-east"]
mirrors = ["ap-south"]
consistency = "eventual"

[[dataset]]
name = "quotes"
locality = "global"
classification = "internal"
home = ["us-east"]
mirrors = "all-allowed"
consistency = "bounded"
max_staleness = "3s"

[[dataset]]
name = "notes"
locality = "global"
classification = "internal"
home = ["ap-south", "us-east"]
conflict = "lww"
"#;

#[test]
fn reads_go_to_the_nearest_copy_that_serves_them_and_say_what_they_passed_over() {
    let demo = PolicyDemo::start(COPIES);
    let (us, eu, ap) = (demo.us.clone(), demo.eu.clone(), demo.ap.clone());
    for (dataset, key) in [("prices", "p1"), ("quotes", "q1")] {
        let (ok, out, err) = cli(&us, &["put", dataset, key, "1"]);
        assert!(ok, "{out}{err}");
        wait_for(
            || cli(&ap, &["get", dataset, key, "--consistency", "local"]).0,
            &format!("{dataset}/{key} in ap-south's copy"),
        );
    }
    wait_for(|| seen(&eu, "us-east") == "up" && seen(&eu, "ap-south") == "up", "eu-west to find both regions up");

    // eu-west holds no copy of prices: its eventual read goes to the nearest region that
    // does (us-east, 40 ms away, before ap-south, 75).
    let (ok, _, err) = cli(&eu, &["get", "prices", "p1"]);
    assert!(ok && err.contains("served by us-east/") && err.contains("nearest-copy"), "{err}");
    assert!(!err.contains("passed over"), "nothing was passed over: {err}");

    // Cut from us-east: at once, before any probe has said so, reads and writes move on to
    // the next region and say which one they passed over.
    let (ok, out, err) = cli(&eu, &["chaos", "partition", "eu-west", "us-east"]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = cli(&eu, &["get", "prices", "p1"]);
    assert!(ok && err.contains("served by ap-south/") && err.contains("nearest-copy"), "{err}");
    assert!(err.contains("passed over us-east ("), "{err}");
    let (ok, out, err) = cli(&eu, &["put", "notes", "n1", "1"]);
    assert!(ok && out.contains("served by ap-south/") && out.contains("passed over us-east ("), "{out}{err}");

    // eu-west's own copy of quotes grows staler than its 3 s bound: the bounded read goes to
    // ap-south, whose copy is fresh, not to the stale one here.
    wait_for(
        || {
            let (ok, _, err) = cli(&eu, &["get", "quotes", "q1"]);
            ok && err.contains("served by ap-south/") && err.contains("fresh-copy")
        },
        "a bounded read in eu-west served by ap-south's fresh copy",
    );
    let (ok, _, err) = cli(&eu, &["get", "quotes", "q1", "--consistency", "local"]);
    assert!(ok && err.contains("served by eu-west/") && err.contains(", local"), "local still reads here: {err}");

    // Cut from both: no region holding prices can serve eu-west; the answer is a 503 that
    // names each region tried and says when to retry.
    let (ok, out, err) = cli(&eu, &["chaos", "partition", "eu-west", "ap-south"]);
    assert!(ok, "{out}{err}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (status, retry, body) = rt.block_on(async {
        let r = reqwest::get(format!("{eu}/v1/datasets/prices/keys/p1")).await.unwrap();
        let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
        (r.status().as_u16(), retry, r.json::<serde_json::Value>().await.unwrap())
    });
    assert_eq!((status, retry.as_deref()), (503, Some("1")), "{body}");
    assert_eq!(body["code"], "region_unavailable", "{body}");
    let tried: Vec<&str> =
        body["regions_tried"].as_array().unwrap().iter().map(|r| r["region"].as_str().unwrap()).collect();
    assert_eq!(tried.len(), 2, "{body}");
    assert!(tried.contains(&"us-east") && tried.contains(&"ap-south"), "{body}");
    let (ok, out, err) = cli(&eu, &["get", "prices", "p1"]);
    assert!(!ok && err.contains("region_unavailable") && err.contains("ap-south"), "{out}{err}");
    // A write has the same answer when no home takes it; nothing was applied.
    let (ok, out, err) = cli(&eu, &["put", "notes", "n2", "2"]);
    assert!(!ok && err.contains("region_unavailable"), "{out}{err}");

    let (ok, _, err) = cli(&eu, &["chaos", "heal"]);
    assert!(ok, "{err}");
    wait_for(|| cli(&eu, &["get", "prices", "p1"]).0, "eu-west reads prices again after the heal");
    let (ok, out, err) = cli(&ap, &["get", "notes", "n2", "--consistency", "local"]);
    assert!(!ok && err.contains("key_not_found"), "the refused write was never applied: {out}{err}");
}

/// `posts` reads at `session` by default; `feedback` at `local`.
const SESSIONS: &str = r#"format = 1

[[dataset]]
name = "posts"
locality = "global"
classification = "internal"
home = ["us-east"]
mirrors = "all-allowed"
consistency = "session"
"#;

#[test]
fn a_session_reads_its_own_writes_in_another_region_and_forged_tokens_are_refused() {
    let demo = PolicyDemo::start(SESSIONS);
    let (us, eu, ap) = (demo.us.clone(), demo.eu.clone(), demo.ap.clone());
    let session = demo.dir.path().join("session");
    let s = session.to_str().unwrap();

    // eu-west is cut from the home: its own copy cannot have what the session writes next.
    let (ok, out, err) = cli(&eu, &["chaos", "partition", "eu-west", "us-east"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = cli(&us, &["put", "posts", "p1", "\"first\"", "--session-file", s]);
    assert!(ok, "{out}{err}");
    let token = std::fs::read_to_string(&session).unwrap();
    assert!(token.starts_with("ms1.us-east="), "the file holds the write's token: {token}");

    // Without the session, eu-west answers from its own copy, which has not got the write.
    let (ok, out, err) = cli(&eu, &["get", "posts", "p1", "--consistency", "local"]);
    assert!(!ok && err.contains("key_not_found"), "{out}{err}");
    // With it, the read never answers without the write: it waits for, or goes to, a copy
    // that has it (ap-south's, once its link delivers), or says none can serve it yet.
    let read = |value: &str| {
        let (ok, out, err) = cli(&eu, &["get", "posts", "p1", "--session-file", s]);
        if ok {
            assert_eq!(out.trim(), value, "a session read answered without the session's write: {err}");
            assert!(err.contains("served by ap-south/") && err.contains("session-copy"), "{err}");
            assert!(err.contains("passed over us-east ("), "{err}");
        } else {
            assert!(err.contains("region_unavailable") && err.contains("behind"), "{out}{err}");
        }
        ok
    };
    wait_for(|| read("\"first\""), "a session read in eu-west served by ap-south's copy");

    // Monotonic: a newer write, then reads that never go back to the older value.
    let (ok, out, err) = cli(&us, &["put", "posts", "p1", "\"second\"", "--session-file", s]);
    assert!(ok, "{out}{err}");
    wait_for(|| read("\"second\""), "the session's second write read in eu-west");

    // An edited token and a malformed one are refused, and nothing is read with them.
    let token = std::fs::read_to_string(&session).unwrap().trim().to_owned();
    let (slots, tag) = token.rsplit_once('.').unwrap();
    let seq: u64 = slots.rsplit_once('=').unwrap().1.parse().unwrap();
    let lowered = format!("{}={}.{tag}", slots.rsplit_once('=').unwrap().0, seq - 1);
    for bad in [lowered.as_str(), "ms1.us-east=1.00", "not-a-token"] {
        let (ok, out, err) = cli(&ap, &["get", "posts", "p1", "--session", bad]);
        assert!(!ok && err.contains("invalid_session"), "{bad}: {out}{err}");
    }
    // Passed explicitly, a good token works and its successor is printed.
    let (ok, out, err) = cli(&ap, &["get", "posts", "p1", "--session", &token]);
    assert!(ok && out.trim() == "\"second\"" && err.contains("session ms1."), "{out}{err}");
}
