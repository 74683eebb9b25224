//! Data moving between regions under control, against `meridian server` processes (two
//! regions of three zones): a link cut for longer than its bounded outbox catches up by a scan,
//! a policy change backfills a new mirror and purges a removed one, a shadow rollout moves
//! nothing, leaders killed with SIGKILL while shipping neither duplicate nor lose a change, and
//! `meridian replication verify` proves every allowed copy equal by digest.

mod common;

use std::time::Duration;

use common::{cli, wait_until, Cluster};

/// A tiny outbox (so a short cut outgrows it) and a fast anti-entropy round.
const SETTINGS: &str = "[replication]\noutbox_entries_max = 16\nanti_entropy_interval_ms = 1000\n";

fn policy_file(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("format = 1\n{text}")).unwrap();
    path.display().to_string()
}

fn cli_ok(endpoint: &str, args: &[&str]) -> String {
    let (ok, out, err) = cli(endpoint, args);
    assert!(ok, "meridian {args:?} failed: {err}{out}");
    out
}

async fn put(http: &reqwest::Client, api: &str, dataset: &str, key: &str, body: &str) {
    common::put_ok(http, api, &format!("{dataset}/keys/{key}"), body).await;
}

/// Keys held by the node at `api` (its own applied state). A region the policy does not let
/// hold the dataset forwards the listing to a home: that counts as holding nothing.
async fn local_keys(http: &reqwest::Client, api: &str, dataset: &str) -> Vec<String> {
    let Ok(r) = http.get(format!("{api}/v1/datasets/{dataset}/keys?consistency=local&limit=1000")).send().await else {
        return Vec::new();
    };
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    if v["served_by"]["reason"] != "local" {
        return Vec::new();
    }
    v["items"].as_array().map(|i| i.iter().map(|i| i["key"].as_str().unwrap().to_owned()).collect()).unwrap_or_default()
}

/// `meridian replication verify` succeeds (every pair compared, every copy equal).
fn verified(api: &str, dataset: &str) -> bool {
    cli(api, &["replication", "verify", "--dataset", dataset]).0
}

/// Sum of a metric's samples over some nodes.
async fn metric_sum(http: &reqwest::Client, apis: &[&str], prefix: &str) -> f64 {
    let mut total = 0.0;
    for api in apis {
        let Ok(r) = http.get(format!("{api}/metrics")).send().await else { continue };
        for line in r.text().await.unwrap_or_default().lines().filter(|l| l.starts_with(prefix)) {
            total += line.rsplit(' ').next().unwrap().parse::<f64>().unwrap_or(0.0);
        }
    }
    total
}

fn region_status(status: &serde_json::Value, region: &str) -> serde_json::Value {
    status["regions"].as_array().unwrap().iter().find(|r| r["region"] == region).unwrap().clone()
}

fn count_from(list: &serde_json::Value, source: &str) -> u64 {
    list.as_array().unwrap().iter().find(|p| p[0] == source).map_or(0, |p| p[1].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_past_its_bounded_outbox_catches_up_and_every_copy_verifies_equal() {
    let cluster = Cluster::start_regions(&["us-east", "eu-west"], SETTINGS);
    let (us, eu) = (cluster.api_of(0).to_owned(), cluster.api_of(1).to_owned());
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let p = policy_file(
        cluster.dir.path(),
        "p.toml",
        "[[dataset]]\nname = \"catalog\"\nlocality = \"global\"\nclassification = \"public\"\nhome = [\"us-east\"]\nmirrors = \"all-allowed\"\n",
    );
    cli_ok(&us, &["policy", "apply", &p]);
    put(&http, &us, "catalog", "before", "0").await;
    wait_until("the first write reaches eu-west", Duration::from_secs(30), || {
        let (http, eu) = (http.clone(), eu.clone());
        async move { local_keys(&http, &eu, "catalog").await.contains(&"before".to_owned()) }
    })
    .await;

    // Bounded reads in eu-west: served there while its copy is fresh enough.
    let bounded = |max: &str| {
        let (http, eu) = (http.clone(), eu.clone());
        let url = format!("{eu}/v1/datasets/catalog/keys/before?consistency=bounded&max_staleness={max}");
        async move {
            let r = http.get(url).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap_or_default())
        }
    };
    wait_until("a bounded read is served by eu-west's copy", Duration::from_secs(10), || {
        let b = bounded("2s");
        async move {
            let (status, body) = b.await;
            status == 200 && body["served_by"]["region"] == "eu-west" && body["served_by"]["reason"] == "local"
        }
    })
    .await;

    cli_ok(&us, &["chaos", "partition", "us-east", "eu-west"]);
    for i in 0..60 {
        put(&http, &us, "catalog", &format!("k{i:03}"), &format!("{i}")).await;
    }
    // Cut off, eu-west's copy grows stale: a tight bound is not served from it (the home is
    // unreachable, so the read fails), a loose one still is.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = bounded("500ms").await;
    assert_eq!(status, 503, "a stale copy must not answer a 500 ms bound: {body}");
    let (status, body) = bounded("1h").await;
    assert_eq!((status, body["served_by"]["region"].as_str()), (200, Some("eu-west")), "{body}");
    assert!(!verified(&us, "catalog"), "a cut pair cannot verify as converged");
    let status: serde_json::Value =
        http.get(format!("{us}/v1/replication")).send().await.unwrap().json().await.unwrap();
    assert!(region_status(&status, "us-east")["outbox_trimmed"].as_u64().unwrap() > 0, "{status}");

    cli_ok(&us, &["chaos", "heal"]);
    wait_until("eu-west's copy verifies equal to us-east's", Duration::from_secs(60), || {
        let us = us.clone();
        async move { verified(&us, "catalog") }
    })
    .await;
    let us_nodes: Vec<&str> = cluster.regions[0].1.iter().map(|id| cluster.api[(*id - 1) as usize].as_str()).collect();
    let catch_ups = metric_sum(&http, &us_nodes, "meridian_replication_catch_ups_total{").await;
    assert!(catch_ups >= 1.0, "the link caught up by a scan ({catch_ups})");
    let status: serde_json::Value =
        http.get(format!("{us}/v1/replication")).send().await.unwrap().json().await.unwrap();
    let eu_status = region_status(&status, "eu-west");
    assert!(count_from(&eu_status["repaired"], "us-east") >= 40, "the scan carried the gap: {eu_status}");
    // The table names every pair and says so.
    let out = cli_ok(&us, &["replication", "verify"]);
    assert!(out.contains("us-east <-> eu-west") && out.contains("converged"), "{out}");
    let out = cli_ok(&us, &["replication", "status"]);
    assert!(out.contains("us-east -> eu-west") && out.contains("outbox trimmed"), "{out}");
    // The shipper on us-east's leader reports itself; its batches went compressed.
    let shipper = region_status(&status, "us-east")["links"][0]["shipper"].clone();
    assert!(shipper["batches"].as_u64().unwrap() > 0, "{shipper}");
    let (raw, wire) = (shipper["sent_bytes_raw"].as_u64().unwrap(), shipper["sent_bytes_wire"].as_u64().unwrap());
    assert!(wire > 0 && wire < raw, "compressed on the wire: {raw} raw, {wire} wire");
    assert!(shipper["datasets"].as_array().unwrap().iter().any(|d| d["dataset"] == "catalog"), "{shipper}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_backfill_a_new_mirror_purge_a_removed_one_and_shadow_moves_nothing() {
    let cluster = Cluster::start_regions(&["us-east", "eu-west"], SETTINGS);
    let (us, eu) = (cluster.api_of(0).to_owned(), cluster.api_of(1).to_owned());
    let eu_nodes: Vec<String> = cluster.regions[1].1.iter().map(|id| cluster.api[(*id - 1) as usize].clone()).collect();
    let us_nodes: Vec<&str> = cluster.regions[0].1.iter().map(|id| cluster.api[(*id - 1) as usize].as_str()).collect();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let dataset =
        "[[dataset]]\nname = \"notes\"\nlocality = \"regional\"\nclassification = \"internal\"\nhome = [\"us-east\"]\n";
    let alone = policy_file(cluster.dir.path(), "alone.toml", dataset);
    let mirrored = policy_file(
        cluster.dir.path(),
        "mirrored.toml",
        &format!("{dataset}allowed = [\"us-east\", \"eu-west\"]\nmirrors = [\"eu-west\"]\n"),
    );
    cli_ok(&us, &["policy", "apply", &alone]);
    let canary = format!("note-{:016x}", rand::random::<u64>());
    for i in 0..10 {
        put(&http, &us, "notes", &format!("n{i}"), &format!("\"{canary}-{i}\"")).await;
    }

    // Shadow: the links count what they would ship, and ship nothing.
    cli_ok(&us, &["policy", "apply", "--shadow", &mirrored]);
    for i in 10..15 {
        put(&http, &us, "notes", &format!("n{i}"), &format!("\"{canary}-{i}\"")).await;
    }
    wait_until("the links count shadow decisions", Duration::from_secs(30), || {
        let (http, us_nodes) = (http.clone(), us_nodes.clone());
        async move { metric_sum(&http, &us_nodes, "meridian_replication_shadow_changes_total{").await >= 5.0 }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status: serde_json::Value =
        http.get(format!("{us}/v1/replication")).send().await.unwrap().json().await.unwrap();
    let eu_status = region_status(&status, "eu-west");
    assert_eq!(count_from(&eu_status["received"], "us-east"), 0, "shadow mode moved data: {eu_status}");
    assert_eq!(count_from(&eu_status["repaired"], "us-east"), 0, "shadow mode moved data: {eu_status}");
    for id in &cluster.regions[1].1 {
        assert!(!common::files_contain(&cluster.data_dir(*id), canary.as_bytes()), "shadow bytes on node {id}");
    }

    // Enforce: eu-west is backfilled with what was written before it became a mirror.
    cli_ok(&us, &["policy", "apply", &mirrored]);
    wait_until("eu-west is backfilled", Duration::from_secs(60), || {
        let (http, eu) = (http.clone(), eu.clone());
        async move { local_keys(&http, &eu, "notes").await.len() == 15 }
    })
    .await;
    wait_until("the copies verify equal", Duration::from_secs(30), || {
        let us = us.clone();
        async move { verified(&us, "notes") }
    })
    .await;
    assert!(metric_sum(&http, &us_nodes, "meridian_replication_backfilled_changes_total{").await >= 10.0);

    // Back to us-east alone: eu-west purges its copies, audits and counts the purge.
    cli_ok(&us, &["policy", "apply", &alone]);
    wait_until("eu-west purges its copies", Duration::from_secs(60), || {
        let (http, us) = (http.clone(), us.clone());
        async move {
            let Ok(r) = http.get(format!("{us}/v1/replication")).send().await else { return false };
            let status: serde_json::Value = r.json().await.unwrap_or_default();
            status["regions"].as_array().is_some_and(|_| region_status(&status, "eu-west")["purged"] == 15)
        }
    })
    .await;
    assert_eq!(local_keys(&http, &us, "notes").await.len(), 15, "the home keeps every key");
    let eu_refs: Vec<&str> = eu_nodes.iter().map(String::as_str).collect();
    assert!(metric_sum(&http, &eu_refs, "meridian_replication_purged_copies_total{").await >= 15.0);
    assert!(verified(&us, "notes"), "nothing left that both may hold, and nothing differs");
}

/// Create `key` once: retried through any us-east node until it exists, never rewritten (a
/// retry after an unknown outcome finds it present and stops), so each key has one version.
async fn create_once(http: &reqwest::Client, apis: &[String], key: &str) {
    let start = std::time::Instant::now();
    for attempt in 0usize.. {
        let api = &apis[attempt % apis.len()];
        let resp = http
            .put(format!("{api}/v1/datasets/catalog/keys/{key}"))
            .header("content-type", "application/json")
            .header("if-none-match", "*")
            .body(format!("\"{key}\""))
            .send()
            .await;
        match resp.map(|r| r.status().as_u16()) {
            Ok(200 | 201 | 412) => return,
            _ => {
                assert!(start.elapsed() < Duration::from_secs(60), "{key} could not be written");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_killed_while_shipping_neither_duplicate_nor_lose_a_change() {
    const KEYS: usize = 300;
    let mut cluster = Cluster::start_regions(&["us-east", "eu-west"], "");
    let us = cluster.api_of(0).to_owned();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let p = policy_file(
        cluster.dir.path(),
        "p.toml",
        "[[dataset]]\nname = \"catalog\"\nlocality = \"global\"\nclassification = \"public\"\nhome = [\"us-east\"]\nmirrors = \"all-allowed\"\n",
    );
    cli_ok(&us, &["policy", "apply", &p]);
    let us_apis: Vec<String> = cluster.regions[0].1.iter().map(|id| cluster.api[(*id - 1) as usize].clone()).collect();
    let t0 = std::time::Instant::now();
    let writer = {
        let (http, apis) = (http.clone(), us_apis.clone());
        tokio::spawn(async move {
            for i in 0..KEYS {
                create_once(&http, &apis, &format!("k{i:04}")).await;
            }
        })
    };
    // SIGKILL the source's leader, then the destination's, twice, while the writer runs and
    // the link ships; each comes back on the same data directory.
    for round in 0..2 {
        for r in [0, 1] {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let leader = cluster.leader_of(r, Duration::from_secs(30)).await;
            cluster.kill(leader);
            tokio::time::sleep(Duration::from_millis(500)).await;
            cluster.spawn(leader);
            eprintln!("round {round}: killed and restarted node {leader} (region {r})");
        }
    }
    writer.await.unwrap();
    eprintln!("writer done at {:?}", t0.elapsed());
    let mut dumped = false;
    while !verified(&us, "catalog") {
        if t0.elapsed() > Duration::from_secs(15) && !dumped {
            dumped = true;
            eprintln!("{}", cli(&us, &["replication", "status"]).1);
            cluster.dump_logs();
        }
        assert!(t0.elapsed() < Duration::from_secs(90));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("verified at {:?}", t0.elapsed());
    let status: serde_json::Value =
        http.get(format!("{us}/v1/replication")).send().await.unwrap().json().await.unwrap();
    let eu_status = region_status(&status, "eu-west");
    // No duplicates: each of the source's sequences was merged exactly once, however many
    // times a batch was resent across the kills. No gaps: every key arrived (verify above).
    assert_eq!(count_from(&eu_status["received"], "us-east"), KEYS as u64, "{eu_status}");
    // The source persists its cursor after the acknowledgement, without holding up the link:
    // its lag reaches 0 shortly after the destination has everything.
    loop {
        let status: serde_json::Value =
            http.get(format!("{us}/v1/replication")).send().await.unwrap().json().await.unwrap();
        let us_status = region_status(&status, "us-east");
        let link =
            us_status["links"].as_array().unwrap().iter().find(|l| l["destination"] == "eu-west").unwrap().clone();
        if link["lag_changes"] == 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(90), "the source's cursor never caught up: {us_status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let verdict = common::cli_json(&us, &["replication", "verify", "--dataset", "catalog"]);
    assert_eq!(verdict["pairs"][0]["datasets"][0]["count_b"], KEYS as u64, "{verdict}");
}

/// One sample of a gauge or counter on some nodes (the largest), over the lines that start
/// with `prefix` and contain `label`.
async fn metric_max(http: &reqwest::Client, apis: &[&str], prefix: &str, label: &str) -> f64 {
    let mut best: f64 = 0.0;
    for api in apis {
        let Ok(r) = http.get(format!("{api}/metrics")).send().await else { continue };
        for line in r.text().await.unwrap_or_default().lines().filter(|l| l.starts_with(prefix) && l.contains(label)) {
            best = best.max(line.rsplit(' ').next().unwrap().parse::<f64>().unwrap_or(0.0));
        }
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_and_rate_limits_hold_changes_back_without_holding_up_the_rest() {
    // The default outbox: a catch-up scan would ship regardless of schedules.
    let cluster = Cluster::start_regions(&["us-east", "eu-west"], "[replication]\nanti_entropy_interval_ms = 1000\n");
    let (us, eu) = (cluster.api_of(0).to_owned(), cluster.api_of(1).to_owned());
    let us_nodes: Vec<&str> = cluster.regions[0].1.iter().map(|id| cluster.api[(*id - 1) as usize].as_str()).collect();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    // A daily window that is closed now: twelve hours away.
    let hour = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 3600) % 24;
    let window = format!("{:02}:00-{:02}:00", (hour + 12) % 24, (hour + 13) % 24);
    let mirrored =
        "locality = \"global\"\nclassification = \"public\"\nhome = [\"us-east\"]\nmirrors = \"all-allowed\"\n";
    let datasets = |nightly_sync: &str| {
        format!(
            "[[dataset]]\nname = \"catalog\"\n{mirrored}\n\
             [[dataset]]\nname = \"bulk\"\n{mirrored}sync = {{ mode = \"continuous\", rate = \"2KB/s\" }}\n\n\
             [[dataset]]\nname = \"nightly\"\n{mirrored}sync = {nightly_sync}\n"
        )
    };
    let scheduled = policy_file(
        cluster.dir.path(),
        "scheduled.toml",
        &datasets(&format!("{{ mode = \"window\", window = \"{window}\" }}")),
    );
    let continuous = policy_file(cluster.dir.path(), "continuous.toml", &datasets("{ mode = \"continuous\" }"));
    cli_ok(&us, &["policy", "apply", &scheduled]);

    // The nightly change comes first: the link's range stops before it, and everything
    // written after it still goes (ahead of the range).
    put(&http, &us, "nightly", "report", "\"totals\"").await;
    let blob = format!("\"{}\"", "x".repeat(1_000));
    for i in 0..10 {
        put(&http, &us, "bulk", &format!("b{i}"), &blob).await;
    }
    for i in 0..5 {
        put(&http, &us, "catalog", &format!("c{i}"), "1").await;
    }
    let mut rate_deferrals: f64 = 0.0;
    let start = std::time::Instant::now();
    loop {
        rate_deferrals = rate_deferrals
            .max(metric_max(&http, &us_nodes, "meridian_replication_deferred_changes{", "reason=\"rate\"").await);
        let (c, b) = (local_keys(&http, &eu, "catalog").await.len(), local_keys(&http, &eu, "bulk").await.len());
        if c == 5 && b == 10 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "catalog {c}/5 and bulk {b}/10 reached eu-west");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rate_deferrals >= 1.0, "10 kB at 2 kB/s: the rate limit held some back");
    // The nightly change waits for its window, holding the range (and anti-entropy leaves it
    // to the link).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(local_keys(&http, &eu, "nightly").await.is_empty(), "a closed window shipped");
    let schedule_deferrals =
        metric_max(&http, &us_nodes, "meridian_replication_deferred_changes{", "reason=\"schedule\"").await;
    assert!(schedule_deferrals >= 1.0);
    let status: serde_json::Value =
        http.get(format!("{us}/v1/replication")).send().await.unwrap().json().await.unwrap();
    let link = region_status(&status, "us-east")["links"][0].clone();
    assert!(link["lag_changes"].as_u64().unwrap() >= 16, "the range is held behind the nightly change: {link}");
    let lag = metric_max(&http, &us_nodes, "meridian_replication_lag_seconds{", "dataset=\"nightly\"").await;
    assert!(lag > 0.0, "the waiting change's age is reported");

    // Continuous again: it ships, the range catches up, and the copies verify equal.
    cli_ok(&us, &["policy", "apply", &continuous]);
    wait_until("the nightly change arrives and every copy verifies", Duration::from_secs(60), || {
        let (http, eu, us) = (http.clone(), eu.clone(), us.clone());
        async move { !local_keys(&http, &eu, "nightly").await.is_empty() && verified(&us, "nightly") }
    })
    .await;
    wait_until("the link's lag is back to zero", Duration::from_secs(30), || {
        let (http, us) = (http.clone(), us.clone());
        async move {
            let Ok(r) = http.get(format!("{us}/v1/replication")).send().await else { return false };
            let status: serde_json::Value = r.json().await.unwrap_or_default();
            status["regions"]
                .as_array()
                .is_some_and(|_| region_status(&status, "us-east")["links"][0]["lag_changes"] == 0)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_congested_link_defers_loose_budgets_and_keeps_tight_ones_flowing() {
    let cluster = Cluster::start_regions(&["us-east", "eu-west"], "[replication]\nanti_entropy_interval_ms = 60000\n");
    let (us, eu) = (cluster.api_of(0).to_owned(), cluster.api_of(1).to_owned());
    let us_nodes: Vec<&str> = cluster.regions[0].1.iter().map(|id| cluster.api[(*id - 1) as usize].as_str()).collect();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let mirrored =
        "locality = \"global\"\nclassification = \"public\"\nhome = [\"us-east\"]\nmirrors = \"all-allowed\"\n";
    let p = policy_file(
        cluster.dir.path(),
        "p.toml",
        &format!(
            "[[dataset]]\nname = \"orders\"\n{mirrored}sync = {{ mode = \"continuous\", max_lag = \"5s\" }}\n\n\
             [[dataset]]\nname = \"logs\"\n{mirrored}sync = {{ mode = \"continuous\", max_lag = \"2m\" }}\n"
        ),
    );
    cli_ok(&us, &["policy", "apply", &p]);
    // A baseline round trip on the fast path, then the path degrades.
    for i in 0..5 {
        put(&http, &us, "orders", &format!("warm-{i}"), "1").await;
    }
    wait_until("the warm-up reaches eu-west", Duration::from_secs(30), || {
        let (http, eu) = (http.clone(), eu.clone());
        async move { local_keys(&http, &eu, "orders").await.len() == 5 }
    })
    .await;
    cli_ok(&us, &["chaos", "delay", "us-east", "eu-west", "--ms", "300"]);
    wait_until("the link notices its round trip degraded", Duration::from_secs(60), || {
        let (http, us_nodes) = (http.clone(), us_nodes.clone());
        async move { metric_max(&http, &us_nodes, "meridian_replication_congested{", "eu-west").await >= 1.0 }
    })
    .await;
    // Under congestion: the 5 s budget flows, the 2 min budget waits (up to half of it).
    put(&http, &us, "logs", "l1", "1").await;
    put(&http, &us, "orders", "o1", "1").await;
    wait_until("the tight-budget change arrives", Duration::from_secs(30), || {
        let (http, eu) = (http.clone(), eu.clone());
        async move { local_keys(&http, &eu, "orders").await.contains(&"o1".to_owned()) }
    })
    .await;
    assert!(!local_keys(&http, &eu, "logs").await.contains(&"l1".to_owned()), "the loose budget waited");
    let deferred =
        metric_max(&http, &us_nodes, "meridian_replication_deferred_changes{", "reason=\"congestion\"").await;
    assert!(deferred >= 1.0, "deferred for congestion ({deferred})");
    // The path recovers: the deferred change follows.
    cli_ok(&us, &["chaos", "heal"]);
    wait_until("the deferred change arrives after the path recovers", Duration::from_secs(60), || {
        let (http, eu) = (http.clone(), eu.clone());
        async move { local_keys(&http, &eu, "logs").await.contains(&"l1".to_owned()) }
    })
    .await;
}
