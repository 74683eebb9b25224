//! Multi-primary datasets through the real binary: the demo's `carts` (a set with three
//! homes) takes concurrent adds in every region and every region ends with their union,
//! with the meeting recorded in the conflict log; a plain PUT on it is refused, and an
//! operation of another kind too.

mod common;

use std::time::Duration;

use common::{post_json, put_json, wait_until, Stop};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_set_adds_in_three_regions_merge_to_their_union_with_a_conflict_record() {
    let (demo, base, _) = common::start_demo(None);
    let _stop = Stop(demo);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let regions = [
        format!("http://127.0.0.1:{base}"),
        format!("http://127.0.0.1:{}", base + 4),
        format!("http://127.0.0.1:{}", base + 7),
    ];

    // The three adds of the issue that left one item: each through its own region, at once.
    let items = ["item-7000", "item-7003", "item-7006"];
    let adds: Vec<_> = regions
        .iter()
        .zip(items)
        .map(|(ep, item)| {
            let (http, ep) = (http.clone(), ep.clone());
            tokio::spawn(async move {
                post_json(&http, &ep, "carts/keys/c1/add", &format!("{{\"members\":[\"{item}\"]}}")).await
            })
        })
        .collect();
    for add in adds {
        let (status, answer) = add.await.unwrap();
        assert!(status == 200 || status == 201, "add: {status} {answer}");
        let region = answer["served_by"]["region"].as_str().unwrap_or_default().to_owned();
        assert!(!region.is_empty(), "{answer}");
    }

    // Every region converges on the union.
    let want = serde_json::json!(items);
    for ep in &regions {
        wait_until("the cart holds every item", Duration::from_secs(30), || {
            let (http, ep, want) = (http.clone(), ep.clone(), want.clone());
            async move {
                let Ok(r) = http.get(format!("{ep}/v1/datasets/carts/keys/c1?consistency=local")).send().await else {
                    return false;
                };
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                v["value"] == want
            }
        })
        .await;
    }

    // A remove in one region takes out what it saw, everywhere.
    let (s, b) = post_json(&http, &regions[1], "carts/keys/c1/remove", r#"{"members":["item-7003"]}"#).await;
    assert_eq!(s, 200, "{b}");
    for ep in &regions {
        wait_until("the removed item is gone", Duration::from_secs(30), || {
            let (http, ep) = (http.clone(), ep.clone());
            async move {
                let Ok(r) = http.get(format!("{ep}/v1/datasets/carts/keys/c1?consistency=local")).send().await else {
                    return false;
                };
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                v["value"] == serde_json::json!(["item-7000", "item-7006"])
            }
        })
        .await;
    }

    // Whether the adds met as concurrent versions depends on timing; when they did, the
    // region that merged them recorded it, with the merged outcome. A second pair of adds
    // made while the cart is known everywhere is concurrent only if they cross; so check
    // the records that exist are well formed and the listing answers in every region.
    let mut records = 0;
    for ep in &regions {
        let r = http.get(format!("{ep}/v1/conflicts?dataset=carts&key=c1")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let list: serde_json::Value = r.json().await.unwrap();
        for item in list["items"].as_array().unwrap() {
            records += 1;
            assert_eq!(item["rule"], "crdt", "{item}");
            assert_eq!(item["state"], "resolved", "{item}");
            assert!(item["versions"].as_array().unwrap().len() >= 2, "{item}");
            let id = item["id"].as_u64().unwrap();
            let one: serde_json::Value =
                http.get(format!("{ep}/v1/conflicts/{id}")).send().await.unwrap().json().await.unwrap();
            assert_eq!(one["id"], id);
        }
    }
    eprintln!("conflict records across the regions: {records}");

    // What the set does not take is refused with a stable code, and nothing is written.
    let (s, b) = put_json(&http, &regions[0], "carts/keys/c1", "[]").await;
    assert_eq!((s, b["code"].as_str()), (409, Some("wrong_operation")), "{b}");
    let (s, b) = post_json(&http, &regions[0], "carts/keys/c1/increment", "{}").await;
    assert_eq!((s, b["code"].as_str()), (409, Some("wrong_operation")), "{b}");
    let (s, b) = post_json(&http, &regions[0], "carts/keys/c1/add", r#"{"members":[]}"#).await;
    assert_eq!((s, b["code"].as_str()), (400, Some("invalid_operation")), "{b}");
    let (s, b) = post_json(&http, &regions[0], "carts/keys/c1/frobnicate", "{}").await;
    assert_eq!((s, b["code"].as_str()), (400, Some("invalid_operation")), "{b}");
    let (s, b) = post_json(&http, &regions[0], "catalog/keys/sku-1/add", r#"{"members":["x"]}"#).await;
    assert_eq!((s, b["code"].as_str()), (409, Some("wrong_operation")), "{b}");
    let v: serde_json::Value =
        http.get(format!("{}/v1/datasets/carts/keys/c1", regions[0])).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["value"], serde_json::json!(["item-7000", "item-7006"]), "nothing was written: {v}");
}

/// Every multi-primary rule at once, three homes each.
const DRILL_POLICY: &str = r#"format = 1

[[dataset]]
name = "carts"
locality = "global"
classification = "internal"
home = ["us-east", "eu-west", "ap-south"]
kind = "set"
conflict = "crdt"

[[dataset]]
name = "counters"
locality = "global"
classification = "internal"
home = ["us-east", "eu-west", "ap-south"]
kind = "counter"
conflict = "crdt"

[[dataset]]
name = "settings"
locality = "global"
classification = "internal"
home = ["us-east", "eu-west", "ap-south"]
kind = "map"
conflict = "crdt"

[[dataset]]
name = "notes"
locality = "global"
classification = "internal"
home = ["us-east", "eu-west", "ap-south"]
conflict = "lww"

[[dataset]]
name = "drafts"
locality = "global"
classification = "internal"
home = ["us-east", "eu-west", "ap-south"]
conflict = "siblings"
"#;

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

async fn send(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut req = http.request(method, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    match req.send().await {
        Ok(r) => {
            let s = r.status().as_u16();
            (s, r.json().await.unwrap_or_default())
        }
        Err(e) => (0, serde_json::json!({ "transport": e.to_string() })),
    }
}

/// Retry `f` until it answers 2xx (policy copies and leaders settle after a change).
async fn until_ok<F, Fut>(what: &str, mut f: F) -> serde_json::Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (u16, serde_json::Value)>,
{
    let start = std::time::Instant::now();
    loop {
        let (s, b) = f().await;
        if (200..300).contains(&s) {
            return b;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{what}: {s} {b}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What a local read in each region answers for `path`: (status, value, siblings).
async fn local_reads(http: &reqwest::Client, eps: &[String], path: &str) -> Vec<(u16, serde_json::Value)> {
    let mut out = Vec::new();
    for ep in eps {
        let (s, b) = send(http, reqwest::Method::GET, format!("{ep}/v1/datasets/{path}?consistency=local"), None).await;
        out.push((s, serde_json::json!([b["value"], b["siblings"]])));
    }
    out
}

/// Cut the three regions apart, write and operate on the same keys on every side, heal, and
/// check every region converges to the state the rules promise, with every acknowledged write
/// either in it or in a conflict record.
async fn partition_drill(extra: &[&str]) {
    let (demo, base, _) = common::start_demo_with(None, extra);
    let _stop = Stop(demo);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let eps: Vec<String> = [0, 4, 7].iter().map(|o| format!("http://127.0.0.1:{}", base + o)).collect();
    let post = reqwest::Method::POST;
    until_ok("apply the drill policy", || {
        send(&http, post.clone(), format!("{}/v1/policy", eps[0]), Some(serde_json::json!({ "text": DRILL_POLICY })))
    })
    .await;

    // Before the cut: a member every region has seen.
    until_ok("add common", || {
        send(
            &http,
            post.clone(),
            format!("{}/v1/datasets/carts/keys/c/add", eps[0]),
            Some(serde_json::json!({"members": ["common"]})),
        )
    })
    .await;
    wait_until("every region sees common", Duration::from_secs(30), || {
        let (http, eps) = (http.clone(), eps.clone());
        async move {
            local_reads(&http, &eps, "carts/keys/c")
                .await
                .iter()
                .all(|(s, v)| *s == 200 && v[0] == serde_json::json!(["common"]))
        }
    })
    .await;

    // Keys every region holds before the cut, for the deletes below.
    for path in ["notes/keys/gone", "notes/keys/raced", "carts/keys/cleared"] {
        let (method, url, body) = if path.starts_with("carts") {
            (post.clone(), format!("{}/v1/datasets/{path}/add", eps[0]), serde_json::json!({"members": ["old"]}))
        } else {
            (reqwest::Method::PUT, format!("{}/v1/datasets/{path}", eps[0]), serde_json::json!("before"))
        };
        until_ok(path, || send(&http, method.clone(), url.clone(), Some(body.clone()))).await;
        wait_until(&format!("every region holds {path}"), Duration::from_secs(30), || {
            let (http, eps) = (http.clone(), eps.clone());
            async move { local_reads(&http, &eps, path).await.iter().all(|(s, _)| *s == 200) }
        })
        .await;
    }

    // The cut.
    for (a, b) in [(0, 1), (0, 2), (1, 2)] {
        let pair = serde_json::json!({ "regions": [REGIONS[a], REGIONS[b]] });
        let (s, b) = send(&http, post.clone(), format!("{}/v1/admin/chaos/partition", eps[0]), Some(pair)).await;
        assert_eq!(s, 200, "{b}");
    }

    // Every side writes, each write through its own region (a home), each acknowledged.
    let mut lww_versions = Vec::new();
    let mut draft_values = Vec::new();
    for (i, ep) in eps.iter().enumerate() {
        let r = REGIONS[i];
        let op = |path: &str, body: serde_json::Value| {
            let (http, url) = (http.clone(), format!("{ep}/v1/datasets/{path}"));
            async move { send(&http, reqwest::Method::POST, url, Some(body)).await }
        };
        let ok =
            |(s, b): (u16, serde_json::Value), what: &str| assert!((200..300).contains(&s), "{what} in {r}: {s} {b}");
        ok(op("carts/keys/c/add", serde_json::json!({"members": [format!("m-{r}")]})).await, "add");
        match i {
            // us-east removes what it saw; eu-west adds it again concurrently: the add wins.
            0 => ok(op("carts/keys/c/remove", serde_json::json!({"members": ["common"]})).await, "remove"),
            1 => ok(op("carts/keys/c/add", serde_json::json!({"members": ["common"]})).await, "re-add"),
            _ => {}
        }
        ok(op("counters/keys/n/increment", serde_json::json!({"amount": (i + 1) * 10})).await, "increment");
        if i == 1 {
            ok(op("counters/keys/n/decrement", serde_json::json!({"amount": 3})).await, "decrement");
        }
        ok(op("settings/keys/s/set", serde_json::json!({"fields": {format!("f-{r}"): i, "color": r}})).await, "set");
        let (s, b) = send(
            &http,
            reqwest::Method::PUT,
            format!("{ep}/v1/datasets/notes/keys/k"),
            Some(serde_json::json!({"by": r})),
        )
        .await;
        assert!((200..300).contains(&s), "lww put in {r}: {s} {b}");
        lww_versions.push(b["version"]["etag"].as_str().unwrap().to_owned());
        let (s, b) = send(
            &http,
            reqwest::Method::PUT,
            format!("{ep}/v1/datasets/drafts/keys/d"),
            Some(serde_json::json!({"by": r})),
        )
        .await;
        assert!((200..300).contains(&s), "siblings put in {r}: {s} {b}");
        draft_values.push(serde_json::json!({"by": r}));
    }
    // Deletes: one nobody contests; one racing a write (lww decides, the loser is recorded);
    // a set cleared in one region while another adds to it (the add survives).
    let del = |ep: &String, path: &str| {
        let (http, url) = (http.clone(), format!("{ep}/v1/datasets/{path}"));
        async move { send(&http, reqwest::Method::DELETE, url, None).await }
    };
    let (s, b) = del(&eps[0], "notes/keys/gone").await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = del(&eps[1], "notes/keys/raced").await;
    assert_eq!(s, 200, "{b}");
    let raced_delete = b["version"]["etag"].as_str().unwrap().to_owned();
    let (s, b) = send(
        &http,
        reqwest::Method::PUT,
        format!("{}/v1/datasets/notes/keys/raced", eps[2]),
        Some(serde_json::json!("kept")),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let raced_write = b["version"]["etag"].as_str().unwrap().to_owned();
    let (s, b) = del(&eps[0], "carts/keys/cleared").await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = send(
        &http,
        post.clone(),
        format!("{}/v1/datasets/carts/keys/cleared/add", eps[1]),
        Some(serde_json::json!({"members": ["new"]})),
    )
    .await;
    assert_eq!(s, 200, "{b}");

    // The drill's skew is in effect: us-east stamps its writes about 5 s ahead of this
    // machine's clock. (The other regions' stamps follow the fastest clock they have merged
    // from: that is what a hybrid logical clock does with skew.)
    if !extra.is_empty() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let us_wall: u64 = lww_versions[0].split('.').next().unwrap().parse().unwrap();
        assert!(us_wall > now + 4_000, "us-east stamped {us_wall}, this machine reads {now}: no skew");
    }

    // Heal, and wait for every region to agree on every key.
    let (s, b) =
        send(&http, post.clone(), format!("{}/v1/admin/chaos/heal", eps[0]), Some(serde_json::json!({}))).await;
    assert_eq!(s, 200, "{b}");
    for path in ["carts/keys/c", "counters/keys/n", "settings/keys/s", "notes/keys/k", "drafts/keys/d"] {
        wait_until(&format!("{path} converges"), Duration::from_secs(60), || {
            let (http, eps) = (http.clone(), eps.clone());
            async move {
                let reads = local_reads(&http, &eps, path).await;
                reads.iter().all(|r| r.0 == 200 && *r == reads[0])
                    && (path != "drafts/keys/d" || reads[0].1[1].as_array().is_some_and(|s| s.len() == 3))
            }
        })
        .await;
    }
    let read = |path: &'static str| {
        let (http, ep) = (http.clone(), eps[2].clone());
        async move { send(&http, reqwest::Method::GET, format!("{ep}/v1/datasets/{path}?consistency=local"), None).await.1 }
    };
    // ap-south's clock runs 10 s behind us-east's: after merging us-east's writes its stamps
    // run ahead of its own clock, and the metric says so.
    if !extra.is_empty() {
        let text = http.get(format!("{}/metrics", eps[2])).send().await.unwrap().text().await.unwrap();
        let ahead: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("meridian_hlc_ahead_ms "))
            .and_then(|v| v.trim().parse().ok())
            .expect("meridian_hlc_ahead_ms is exported");
        assert!(ahead >= 5_000, "ap-south's stamps run only {ahead} ms ahead of its clock");
    }

    // No deleted key comes back: the uncontested delete holds everywhere.
    wait_until("the deleted key stays deleted everywhere", Duration::from_secs(60), || {
        let (http, eps) = (http.clone(), eps.clone());
        async move { local_reads(&http, &eps, "notes/keys/gone").await.iter().all(|(s, _)| *s == 404) }
    })
    .await;
    // The raced key: every region agrees, and whichever lost is in a conflict record.
    wait_until("the raced key converges", Duration::from_secs(60), || {
        let (http, eps) = (http.clone(), eps.clone());
        async move {
            let reads = local_reads(&http, &eps, "notes/keys/raced").await;
            reads.iter().all(|r| *r == reads[0])
        }
    })
    .await;
    let mut raced_recorded = std::collections::BTreeSet::new();
    for ep in &eps {
        let (_, list) =
            send(&http, reqwest::Method::GET, format!("{ep}/v1/conflicts?dataset=notes&key=raced"), None).await;
        for item in list["items"].as_array().unwrap() {
            for v in item["versions"].as_array().unwrap() {
                raced_recorded.insert(v["version"]["etag"].as_str().unwrap().to_owned());
            }
        }
    }
    assert!(
        raced_recorded.contains(&raced_delete) && raced_recorded.contains(&raced_write),
        "the delete and the write that raced are both on record: {raced_recorded:?}"
    );
    // The cleared set keeps what was added concurrently, and only that.
    wait_until("the cleared set converges", Duration::from_secs(60), || {
        let (http, eps) = (http.clone(), eps.clone());
        async move {
            local_reads(&http, &eps, "carts/keys/cleared")
                .await
                .iter()
                .all(|(s, v)| *s == 200 && v[0] == serde_json::json!(["new"]))
        }
    })
    .await;

    // Sets: the OR-set result; counters: the sum of what was acknowledged; maps: every field.
    assert_eq!(
        read("carts/keys/c").await["value"],
        serde_json::json!(["common", "m-ap-south", "m-eu-west", "m-us-east"]),
        "add-wins: the concurrent re-add of common survives the remove"
    );
    assert_eq!(read("counters/keys/n").await["value"], serde_json::json!(10 + 20 + 30 - 3));
    let s = read("settings/keys/s").await["value"].clone();
    assert_eq!(
        (s["f-us-east"].clone(), s["f-eu-west"].clone(), s["f-ap-south"].clone()),
        (0.into(), 1.into(), 2.into()),
        "{s}"
    );
    assert!(REGIONS.iter().any(|r| s["color"] == *r), "{s}");
    // Siblings: all three kept, in every region.
    let d = read("drafts/keys/d").await;
    let mut kept: Vec<serde_json::Value> =
        d["siblings"].as_array().unwrap().iter().map(|s| s["value"].clone()).collect();
    kept.sort_by_key(|v| v.to_string());
    let mut want = draft_values.clone();
    want.sort_by_key(|v| v.to_string());
    assert_eq!(kept, want, "{d}");

    // lww: every acknowledged version is the final one or in a conflict record somewhere.
    let final_etag = read("notes/keys/k").await["version"]["etag"].as_str().unwrap().to_owned();
    // In every region: every region that holds the key records every meeting of its versions.
    let mut lww_record = None;
    for ep in &eps {
        let mut recorded = std::collections::BTreeSet::new();
        let (_, list) = send(&http, reqwest::Method::GET, format!("{ep}/v1/conflicts?dataset=notes&key=k"), None).await;
        for item in list["items"].as_array().unwrap() {
            assert_eq!(item["rule"], "lww");
            lww_record.get_or_insert_with(|| (ep.clone(), item["id"].as_u64().unwrap()));
            for v in item["versions"].as_array().unwrap() {
                recorded.insert(v["version"]["etag"].as_str().unwrap().to_owned());
            }
        }
        for v in &lww_versions {
            assert!(
                *v == final_etag || recorded.contains(v),
                "acknowledged {v} vanished in {ep}: final {final_etag}, recorded {recorded:?}"
            );
        }
    }

    // Act on the conflict: keep a loser, through the region that recorded it; every region follows.
    let (ep, id) = lww_record.expect("the lww writes met somewhere");
    let loser = lww_versions.iter().find(|v| **v != final_etag).unwrap().clone();
    let (s, b) = send(
        &http,
        post.clone(),
        format!("{ep}/v1/conflicts/{id}/resolve"),
        Some(serde_json::json!({"choose": loser})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let loser_value = serde_json::json!({"by": REGIONS[lww_versions.iter().position(|v| *v == loser).unwrap()]});
    for e in &eps {
        wait_until("the chosen version reaches every region", Duration::from_secs(30), || {
            let (http, url, want) =
                (http.clone(), format!("{e}/v1/datasets/notes/keys/k?consistency=local"), loser_value.clone());
            async move { send(&http, reqwest::Method::GET, url, None).await.1["value"] == want }
        })
        .await;
    }
    let (_, shown) = send(&http, reqwest::Method::GET, format!("{ep}/v1/conflicts/{id}"), None).await;
    assert_eq!(shown["state"], "superseded", "{shown}");

    // Siblings end with a write that carries their context: one value everywhere.
    let (_, d) = send(&http, reqwest::Method::GET, format!("{}/v1/datasets/drafts/keys/d", eps[0]), None).await;
    let context = d["context"].as_str().unwrap().to_owned();
    let r = http
        .put(format!("{}/v1/datasets/drafts/keys/d", eps[0]))
        .header("content-type", "application/json")
        .header("meridian-context", context)
        .body(r#"{"by":"merged"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    for e in &eps {
        wait_until("the merged draft reaches every region", Duration::from_secs(30), || {
            let (http, url) = (http.clone(), format!("{e}/v1/datasets/drafts/keys/d?consistency=local"));
            async move {
                let b = send(&http, reqwest::Method::GET, url, None).await.1;
                b["value"] == serde_json::json!({"by": "merged"}) && b["siblings"].is_null()
            }
        })
        .await;
    }
    // The same through the CLI: list, show, an operation, and a resolution that names nothing.
    let (ok, out, err) = common::cli(&ep, &["conflicts", "list", "--dataset", "notes", "--key", "k"]);
    assert!(ok && out.contains("notes/k") && out.contains("superseded"), "{out}{err}");
    let shown = common::cli_json(&ep, &["conflicts", "show", &id.to_string()]);
    assert_eq!(shown["id"], id);
    let (ok, out, err) = common::cli(&eps[1], &["op", "counters", "n", "increment", "5"]);
    assert!(ok && out.contains("increment counters/n"), "{out}{err}");
    let (ok, out, _) = common::cli(&eps[1], &["get", "counters", "n"]);
    assert!(ok && out.trim() == "62", "{out}");
    let (ok, _, err) = common::cli(&ep, &["conflicts", "resolve", &id.to_string()]);
    assert!(!ok && err.contains("--choose"), "{err}");
    let (ok, _, err) = common::cli(&ep, &["conflicts", "show", "999999"]);
    assert!(!ok && err.contains("conflict_not_found"), "{err}");
    let (ok, _, err) = common::cli(&ep, &["op", "notes", "k", "add", "x"]);
    assert!(!ok && err.contains("wrong_operation"), "{err}");

    // A bad context is refused, and nothing is written.
    let r = http
        .put(format!("{}/v1/datasets/drafts/keys/d", eps[0]))
        .header("content-type", "application/json")
        .header("meridian-context", "not a context")
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let b: serde_json::Value = r.json().await.unwrap();
    assert_eq!(b["code"], "invalid_context");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_way_partition_converges_by_every_rule_and_loses_no_acknowledged_write() {
    partition_drill(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_with_wall_clocks_five_seconds_apart() {
    partition_drill(&["--clock-skew", "us-east=5000", "--clock-skew", "ap-south=-5000"]).await;
}

/// `meridian_tombstones_collected` as region `api`'s node reports it.
async fn collected(http: &reqwest::Client, api: &str) -> u64 {
    let Ok(r) = http.get(format!("{api}/metrics")).send().await else { return 0 };
    r.text()
        .await
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("meridian_tombstones_collected "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_are_collected_only_once_every_region_holds_them_and_a_key_can_live_again() {
    let settings = "[replication]\nanti_entropy_interval_ms = 300\ntombstone_grace_ms = 1000\n";
    let cluster = common::Cluster::start_regions(&REGIONS, settings);
    let eps: Vec<String> = (0..3).map(|r| cluster.api_of(r).to_owned()).collect();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let policy = "format = 1\n[[dataset]]\nname = \"notes\"\nlocality = \"global\"\nclassification = \"internal\"\nhome = [\"us-east\", \"eu-west\", \"ap-south\"]\nconflict = \"lww\"\n";
    until_ok("apply the policy", || {
        send(&http, reqwest::Method::POST, format!("{}/v1/policy", eps[0]), Some(serde_json::json!({ "text": policy })))
    })
    .await;
    let put = |ep: &String, key: &str, v: serde_json::Value| {
        let (http, url) = (http.clone(), format!("{ep}/v1/datasets/notes/keys/{key}"));
        async move { send(&http, reqwest::Method::PUT, url, Some(v)).await }
    };
    until_ok("write a", || put(&eps[0], "a", serde_json::json!(1))).await;
    wait_until("every region holds a", Duration::from_secs(30), || {
        let (http, eps) = (http.clone(), eps.clone());
        async move { local_reads(&http, &eps, "notes/keys/a").await.iter().all(|(s, _)| *s == 200) }
    })
    .await;

    // A tombstone while eu-west is cut off is not collected: eu-west has not merged it.
    common::cli(&eps[0], &["chaos", "partition", "us-east", "eu-west"]);
    let (s, b) = send(&http, reqwest::Method::DELETE, format!("{}/v1/datasets/notes/keys/a", eps[0]), None).await;
    assert_eq!(s, 200, "{b}");
    // Several passes past the grace period.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(collected(&http, &eps[0]).await, 0, "collected while a region that may hold it had not merged it");

    // Healed: every region holds the same tombstone, then every region collects it.
    common::cli(&eps[0], &["chaos", "heal"]);
    for ep in &eps {
        wait_until("every region collects the tombstone", Duration::from_secs(60), || {
            let (http, ep) = (http.clone(), ep.clone());
            async move { collected(&http, &ep).await >= 1 }
        })
        .await;
    }
    // Gone everywhere, and nothing brings it back: anti-entropy keeps running.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(local_reads(&http, &eps, "notes/keys/a").await.iter().all(|(s, _)| *s == 404));
    // The key can live again, written anywhere.
    let (s, b) = put(&eps[2], "a", serde_json::json!(2)).await;
    assert_eq!(s, 201, "a collected key is new again: {b}");
    wait_until("the new a reaches every region", Duration::from_secs(30), || {
        let (http, eps) = (http.clone(), eps.clone());
        async move {
            local_reads(&http, &eps, "notes/keys/a")
                .await
                .iter()
                .all(|(s, v)| *s == 200 && v[0] == serde_json::json!(2))
        }
    })
    .await;
}
