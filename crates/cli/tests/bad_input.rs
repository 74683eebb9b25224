//! Bad input for every endpoint: each gets a clear 4xx with a stable code, and nothing is
//! written.

mod common;

use common::Region;
use serde_json::Value;

struct Answer {
    status: u16,
    body: Value,
    headers: reqwest::header::HeaderMap,
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    let resp = req.send().await.expect("send");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("answer is not JSON: {text}"));
    Answer { status, body, headers }
}

fn expect(a: &Answer, status: u16, code: &str) {
    assert_eq!(a.status, status, "{}", a.body);
    assert_eq!(a.body["code"], code, "{}", a.body);
    assert!(a.body["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", a.body);
    assert_eq!(a.headers["content-type"], "application/json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_refuses_bad_input_cleanly() {
    let region = Region::start("[limits]\nvalue_bytes_max = 1024\n");
    let base = region.api[0].clone();
    let http = reqwest::Client::new();
    let key_url = |ds: &str, key: &str| format!("{base}/v1/datasets/{ds}/keys/{key}");
    let json_put =
        |url: String, body: &str| http.put(url).header("content-type", "application/json").body(body.to_owned());

    // A good write to compare against.
    let good = send(json_put(key_url("d", "good"), "{\"n\":1}")).await;
    assert_eq!(good.status, 201, "{}", good.body);
    let etag = good.body["version"]["etag"].as_str().unwrap().to_owned();

    // Names.
    expect(&send(json_put(key_url("Bad!", "k"), "1")).await, 400, "invalid_dataset_name");
    expect(&send(json_put(key_url(&"d".repeat(65), "k"), "1")).await, 400, "invalid_dataset_name");
    expect(&send(json_put(key_url("d", &"k".repeat(1025)), "1")).await, 400, "key_too_long");
    expect(&send(json_put(key_url("d", "a%0Ab"), "1")).await, 400, "invalid_key");
    expect(&send(http.get(key_url("d", "a%0Ab"))).await, 400, "invalid_key");
    expect(&send(http.get(key_url("d", "%FF%FE"))).await, 400, "invalid_key");
    expect(&send(http.delete(key_url("9d", "k"))).await, 400, "invalid_dataset_name");

    // Bodies.
    expect(&send(json_put(key_url("d", "big"), &format!("\"{}\"", "x".repeat(2000)))).await, 413, "value_too_large");
    expect(&send(json_put(key_url("d", "bad"), "{\"a\":")).await, 400, "malformed_json");
    expect(&send(json_put(key_url("d", "bad"), "")).await, 400, "malformed_json");
    expect(&send(json_put(key_url("d", "bad"), "hello")).await, 400, "malformed_json");
    expect(
        &send(http.put(key_url("d", "bad")).header("content-type", "text/plain").body("1")).await,
        415,
        "unsupported_media_type",
    );
    expect(&send(http.put(key_url("d", "bad")).body("1")).await, 415, "unsupported_media_type");

    // Methods and routes.
    expect(&send(http.post(key_url("d", "k"))).await, 405, "method_not_allowed");
    expect(&send(http.post(format!("{base}/v1/cluster"))).await, 405, "method_not_allowed");
    expect(&send(http.delete(format!("{base}/v1/datasets/d/keys"))).await, 405, "method_not_allowed");
    expect(&send(http.get(format!("{base}/v1/nothing-here"))).await, 404, "route_not_found");
    // An unencoded slash makes the path an operation's, which takes only POST.
    expect(&send(http.get(format!("{base}/v1/datasets/d/keys/a/b"))).await, 405, "method_not_allowed");
    expect(&send(http.get(format!("{base}/v1/datasets/d/keys/a/b/c"))).await, 404, "route_not_found");

    // Preconditions.
    expect(&send(json_put(key_url("d", "good"), "2").header("if-match", "garbage")).await, 400, "invalid_version");
    expect(
        &send(json_put(key_url("d", "good"), "2").header("if-none-match", "abc")).await,
        400,
        "invalid_precondition",
    );
    expect(
        &send(json_put(key_url("d", "good"), "2").header("if-none-match", "*").header("if-match", &etag)).await,
        400,
        "invalid_precondition",
    );
    let a = send(json_put(key_url("d", "good"), "2").header("if-none-match", "*")).await;
    expect(&a, 412, "precondition_failed");
    assert_eq!(a.body["current_version"], etag.as_str());
    let stale = "1.0@r1:999";
    expect(&send(json_put(key_url("d", "good"), "2").header("if-match", stale)).await, 412, "precondition_failed");
    expect(&send(http.delete(key_url("d", "good")).header("if-match", stale)).await, 412, "precondition_failed");

    // Reads.
    expect(&send(http.get(key_url("d", "missing"))).await, 404, "key_not_found");
    expect(&send(http.delete(key_url("d", "missing"))).await, 404, "key_not_found");
    expect(&send(http.get(key_url("d", "good") + "?consistency=bogus")).await, 400, "invalid_consistency");
    // Session tokens this cluster did not sign, on reads and on writes: refused, nothing done.
    let forged = "ms1.r1=1.0000000000000000000000000000000000000000000000000000000000000000";
    for token in [forged, "ms1.r1=1", "r1=1", &"ms1.".repeat(1100)] {
        let get = http.get(key_url("d", "good") + "?consistency=session").header("meridian-session", token);
        expect(&send(get).await, 400, "invalid_session");
        expect(
            &send(json_put(key_url("d", "good"), "3").header("meridian-session", token)).await,
            400,
            "invalid_session",
        );
    }
    let good = send(http.get(key_url("d", "good") + "?consistency=session")).await;
    assert_eq!(good.status, 200, "a session read without a token: {}", good.body);
    assert_ne!(good.body["value"], serde_json::json!(3), "a write with a forged token was applied: {}", good.body);
    expect(
        &send(http.get(key_url("d", "good") + "?consistency=bounded&max_staleness=soon")).await,
        400,
        "invalid_query",
    );
    expect(&send(http.get(key_url("d", "good") + "?consistency=strong&max_staleness=2s")).await, 400, "invalid_query");
    expect(&send(http.get(key_url("d", "good") + "?colour=red")).await, 400, "invalid_query");
    let list = format!("{base}/v1/datasets/d/keys");
    for bad in ["limit=0", "limit=5000", "limit=ten", "sort=desc"] {
        expect(&send(http.get(format!("{list}?{bad}"))).await, 400, "invalid_query");
    }
    expect(&send(http.get(format!("{list}?cursor=zz"))).await, 400, "invalid_cursor");
    // A prefix no key could begin with (a control character).
    expect(&send(http.get(format!("{list}?prefix=a%07b"))).await, 400, "invalid_key");
    expect(&send(http.get(format!("{base}/v1/datasets/D/keys"))).await, 400, "invalid_dataset_name");

    // Nothing half-written: the dataset holds exactly the one good key, unchanged.
    let listing = send(http.get(format!("{list}?limit=1000"))).await;
    assert_eq!(listing.status, 200);
    let keys: Vec<&str> =
        listing.body["items"].as_array().unwrap().iter().map(|i| i["key"].as_str().unwrap()).collect();
    assert_eq!(keys, vec!["good"]);
    let got = send(http.get(key_url("d", "good"))).await;
    assert_eq!(got.body["value"], serde_json::json!({"n": 1}));
    assert_eq!(got.body["version"]["etag"], etag.as_str());
    assert_eq!(got.headers["etag"], format!("\"{etag}\"").as_str());

    // The read-only endpoints answer sensibly.
    let spec = send(http.get(format!("{base}/v1/openapi.json"))).await;
    assert!(spec.body["paths"]["/v1/datasets/{dataset}/keys/{key}"]["put"].is_object());
    let health = send(http.get(format!("{base}/v1/health"))).await;
    assert_eq!(health.body["status"], "ok");
    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("meridian_http_requests_total"), "{metrics}");
    assert!(metrics.contains("status=\"415\""));
    assert!(metrics.contains("meridian_raft_log_fsyncs_total"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_writes_are_compare_and_set() {
    let region = Region::start("");
    let c = region.client(2);
    use meridian_client::Precondition;
    let v1 = c.put_raw("cas", "k", "1", &Precondition::IfAbsent).await.unwrap();
    assert!(v1.created);
    let v2 = c.put_raw("cas", "k", "2", &Precondition::IfMatch(v1.version.etag.clone())).await.unwrap();
    assert!(!v2.created);
    let err = c.put_raw("cas", "k", "3", &Precondition::IfMatch(v1.version.etag.clone())).await.unwrap_err();
    assert_eq!(err.code(), Some(meridian_api::ErrorCode::PreconditionFailed));
    assert_eq!(c.get("cas", "k", None).await.unwrap().value, serde_json::json!(2));
    let d = c.delete("cas", "k", Some(&v2.version.etag)).await.unwrap();
    assert!(d.version.seq > v2.version.seq);
    // Create-only succeeds again once the key is deleted.
    assert!(c.put_raw("cas", "k", "4", &Precondition::IfAbsent).await.unwrap().created);
    // Listing pages with a cursor.
    for i in 0..25 {
        c.put_raw("page", &format!("p{i:02}"), "0", &Precondition::None).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = c.list("page", Some("p"), Some(10), cursor.as_deref(), None).await.unwrap();
        seen.extend(page.items.into_iter().map(|i| i.key));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, (0..25).map(|i| format!("p{i:02}")).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_and_chaos_endpoints_refuse_bad_input_cleanly() {
    let region = Region::start("");
    let base = region.api[0].clone();
    let http = reqwest::Client::new();
    let post = |path: &str, body: &str| {
        http.post(format!("{base}{path}")).header("content-type", "application/json").body(body.to_owned())
    };
    let good = "[[dataset]]\nname = \"d\"\nlocality = \"global\"\nclassification = \"public\"\nhome = [\"r1\"]\n";
    let doc = |extra: &str| format!("{{\"text\": {}{extra}}}", serde_json::to_string(good).unwrap());

    // Before any policy: nothing to explain or roll back.
    expect(&send(http.get(format!("{base}/v1/policy/explain?dataset=d&key=k"))).await, 404, "no_policy");
    expect(&send(post("/v1/policy/rollback", "{\"version\":\"0123456789ab\"}")).await, 404, "policy_version_not_found");

    // Bodies and fields.
    expect(&send(post("/v1/policy", "{\"text\":")).await, 400, "malformed_json");
    expect(&send(post("/v1/policy", "{\"txt\": \"x\"}")).await, 400, "malformed_json");
    expect(
        &send(http.post(format!("{base}/v1/policy")).header("content-type", "text/plain").body(good)).await,
        415,
        "unsupported_media_type",
    );
    expect(&send(post("/v1/policy", &doc(", \"mode\": \"sometimes\""))).await, 400, "invalid_query");
    expect(&send(post("/v1/policy", &doc(", \"percent\": 0"))).await, 400, "invalid_query");
    expect(&send(post("/v1/policy", &doc(", \"percent\": 300"))).await, 400, "malformed_json");
    expect(&send(post("/v1/policy", &doc(", \"format\": \"xml\""))).await, 400, "invalid_query");
    expect(&send(post("/v1/policy/plan", "{\"text\": \"[[dataset]]\\nname = 1\"}")).await, 400, "policy_invalid");
    let invalid = send(post("/v1/policy", "{\"text\": \"[[dataset]]\\nname = \\\"d\\\"\\nlocality = \\\"global\\\"\\nclassification = \\\"public\\\"\\nhome = [\\\"mars\\\"]\\n\"}")).await;
    expect(&invalid, 400, "policy_invalid");
    assert_eq!(invalid.body["problems"][0]["rule"], "unknown_region", "{}", invalid.body);
    assert_eq!(invalid.body["problems"][0]["line"], 5, "{}", invalid.body);
    expect(&send(http.get(format!("{base}/v1/policy/versions/xyz"))).await, 404, "policy_version_not_found");
    expect(&send(http.get(format!("{base}/v1/policy/explain?dataset=d"))).await, 400, "invalid_query");
    expect(&send(http.get(format!("{base}/v1/policy/explain?dataset=D&key=k"))).await, 400, "invalid_dataset_name");
    expect(&send(post("/v1/admin/chaos/partition", "{}")).await, 400, "invalid_query");
    expect(&send(post("/v1/admin/chaos/delay", "{\"regions\":[\"r1\",\"r1\"]}")).await, 400, "invalid_query");
    expect(&send(http.get(format!("{base}/v1/replication/verify?dataset=Bad!"))).await, 400, "invalid_dataset_name");
    expect(&send(http.get(format!("{base}/v1/replication/verify?datasets=d"))).await, 400, "invalid_query");
    // Failover: bodies, names, bounds, and a promotion with nothing to fail over.
    expect(&send(post("/v1/failover/promote", "{\"dataset\":")).await, 400, "malformed_json");
    expect(&send(post("/v1/failover/promote", "{\"dataset\":\"d\"}")).await, 400, "malformed_json");
    expect(&send(post("/v1/failover/promote", "{\"dataset\":\"d\",\"region\":\"mars\"}")).await, 400, "invalid_query");
    expect(
        &send(post("/v1/failover/end", "{\"dataset\":\"Bad!\",\"region\":\"r1\"}")).await,
        400,
        "invalid_dataset_name",
    );
    expect(
        &send(post("/v1/failover/promote", "{\"dataset\":\"d\",\"region\":\"r1\"}")).await,
        409,
        "promotion_refused",
    );
    expect(&send(http.get(format!("{base}/v1/failover?events=5000"))).await, 400, "invalid_query");
    expect(&send(http.get(format!("{base}/v1/failover?event=1"))).await, 400, "invalid_query");
    let failover = send(http.get(format!("{base}/v1/failover"))).await;
    assert_eq!(failover.status, 200, "{}", failover.body);
    assert_eq!(
        failover.body["regions"][0]["promotions"],
        serde_json::json!([]),
        "nothing was promoted: {}",
        failover.body
    );

    // None of it changed anything: still no policy, and writes still land.
    let status = send(http.get(format!("{base}/v1/policy"))).await;
    assert_eq!(status.status, 200);
    assert!(status.body.get("active").is_none(), "{}", status.body);
    let applied = send(post("/v1/policy", &doc(""))).await;
    assert_eq!(applied.status, 200, "{}", applied.body);
    assert_eq!(applied.body["entry"]["epoch"], 1);
}
