//! Client commands: they mirror the API, print a short human form by default and the API's
//! JSON with `--json`, and fail with the error's stable code in the message.

use std::time::Duration;

use anyhow::anyhow;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use meridian_client::{Client, ClientError, Precondition};
use serde::Serialize;

use crate::ClientOpts;

pub(crate) fn client(opts: &ClientOpts) -> Client {
    let session = opts.session.clone().or_else(|| {
        let text = std::fs::read_to_string(opts.session_file.as_ref()?).ok()?;
        Some(text.trim().to_owned()).filter(|t| !t.is_empty())
    });
    Client::new(&opts.endpoint, Duration::from_secs(opts.timeout_secs))
        .with_home(opts.home.clone())
        .with_session(session)
}

/// After a data command: write the session's token back to `--session-file`, or print it
/// on stderr when one was passed with `--session`.
pub(crate) fn carry_session(opts: &ClientOpts, c: &Client) -> anyhow::Result<()> {
    let Some(token) = c.session() else { return Ok(()) };
    if let Some(path) = &opts.session_file {
        std::fs::write(path, format!("{token}\n"))
            .map_err(|e| anyhow::anyhow!("write the session to {}: {e}", path.display()))?;
    } else if opts.session.is_some() {
        eprintln!("session {token}");
    }
    Ok(())
}

/// Turn a client error into the CLI's message: code first, so scripts can grep it.
pub(crate) fn fail(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Api { status, body } => {
            let mut msg = format!("{} (HTTP {status}): {}", body.code.as_str(), body.message);
            if let Some(v) = body.current_version {
                msg.push_str(&format!("\ncurrent version: {v}"));
            }
            if let Some(h) = body.hint {
                msg.push_str(&format!("\nhint: {h}"));
            }
            anyhow!(msg)
        }
        other => anyhow!("{other}"),
    }
}

pub(crate) fn print_json<T: Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("API types serialize"));
}

pub async fn put(
    opts: &ClientOpts,
    dataset: &str,
    key: &str,
    value: String,
    if_match: Option<String>,
    create_only: bool,
) -> anyhow::Result<()> {
    let pre = match (if_match, create_only) {
        (Some(v), _) => Precondition::IfMatch(v),
        (None, true) => Precondition::IfAbsent,
        (None, false) => Precondition::None,
    };
    let c = client(opts);
    let r = c.put_raw(dataset, key, value, &pre).await.map_err(fail)?;
    carry_session(opts, &c)?;
    if opts.json {
        print_json(&r);
    } else {
        println!(
            "{} {dataset}/{key} version {} ({})",
            if r.created { "created" } else { "updated" },
            r.version.etag,
            served_text(&r.served_by)
        );
    }
    Ok(())
}

/// `served by REGION/ZONE/node-N, REASON`, and the regions passed over on the way, if any.
pub(crate) fn served_text(s: &meridian_api::ServedBy) -> String {
    let mut text = format!("served by {}/{}/node-{}, {}", s.region, s.zone, s.node, s.reason);
    if !s.skipped.is_empty() {
        let each: Vec<String> = s.skipped.iter().map(|k| format!("{} ({})", k.region, k.cause)).collect();
        text.push_str(&format!("; passed over {}", each.join(", ")));
    }
    text
}

pub async fn get(opts: &ClientOpts, dataset: &str, key: &str, consistency: Option<&str>) -> anyhow::Result<()> {
    let c = client(opts);
    let r = c.get(dataset, key, consistency).await.map_err(fail)?;
    carry_session(opts, &c)?;
    if opts.json {
        print_json(&r);
    } else {
        println!("{}", r.value);
        eprintln!("version {} ({})", r.version.etag, served_text(&r.served_by));
    }
    Ok(())
}

pub async fn delete(opts: &ClientOpts, dataset: &str, key: &str, if_match: Option<String>) -> anyhow::Result<()> {
    let c = client(opts);
    let r = c.delete(dataset, key, if_match.as_deref()).await.map_err(fail)?;
    carry_session(opts, &c)?;
    if opts.json {
        print_json(&r);
    } else {
        println!("deleted {dataset}/{key} (tombstone version {})", r.version.etag);
    }
    Ok(())
}

pub async fn list(
    opts: &ClientOpts,
    dataset: &str,
    prefix: Option<String>,
    limit: usize,
    cursor: Option<String>,
    consistency: Option<&str>,
) -> anyhow::Result<()> {
    let c = client(opts);
    let r = c.list(dataset, prefix.as_deref(), Some(limit), cursor.as_deref(), consistency).await.map_err(fail)?;
    carry_session(opts, &c)?;
    if opts.json {
        print_json(&r);
        return Ok(());
    }
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED).set_header(vec!["key", "version"]);
    for item in &r.items {
        t.add_row(vec![item.key.clone(), item.version.etag.clone()]);
    }
    println!("{t}");
    match &r.next_cursor {
        Some(c) => println!("{} keys; more with --cursor {c}", r.items.len()),
        None => println!("{} keys", r.items.len()),
    }
    Ok(())
}

pub async fn cluster_status(opts: &ClientOpts) -> anyhow::Result<()> {
    let r = client(opts).cluster().await.map_err(fail)?;
    if opts.json {
        print_json(&r);
        return Ok(());
    }
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED)
        .set_header(vec!["region", "zone", "node", "api", "role", "term", "applied", "health", "rtt ms"]);
    for region in &r.regions {
        let (health, rtt) = match &region.health {
            None => ("here".to_owned(), "-".to_owned()),
            Some(h) => (h.reachability.clone(), h.rtt_ms.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1}"))),
        };
        for n in &region.nodes {
            let role = match (region.reachable, region.leader) {
                (false, _) => "unreachable".to_owned(),
                (true, Some(l)) if l == n.id => "leader".to_owned(),
                (true, Some(_)) => "voter".to_owned(),
                (true, None) => "no leader".to_owned(),
            };
            t.add_row(vec![
                region.name.clone(),
                n.zone.clone(),
                n.id.to_string(),
                n.api_addr.clone(),
                role,
                region.term.to_string(),
                region.applied_index.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
                health.clone(),
                rtt.clone(),
            ]);
        }
    }
    println!("{t}");
    println!(
        "answered by node {} ({}/{}); term and applied index are as reported by one node of each region; \
         health and round trip are that node's probes of each other region",
        r.node.id, r.node.region, r.node.zone
    );
    for region in &r.regions {
        if let Some(h) = region.health.as_ref().filter(|h| h.reachability != "up") {
            let why = h.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
            println!(
                "region {} is {} to this node ({} probes in a row failed){why}",
                region.name, h.reachability, h.consecutive_failures
            );
        }
    }
    for region in r.regions.iter().filter(|r| !r.reachable) {
        println!("region {} unreachable: {}", region.name, region.error.as_deref().unwrap_or("?"));
    }
    Ok(())
}

/// One `meridian chaos` operation.
pub enum ChaosOp {
    Status,
    Partition(String, String),
    Heal(Option<(String, String)>),
    Delay(meridian_api::LinkFaultBody),
}

pub async fn chaos(opts: &ClientOpts, op: ChaosOp) -> anyhow::Result<()> {
    let c = client(opts);
    let status = match &op {
        ChaosOp::Status => c.chaos_status().await,
        ChaosOp::Partition(a, b) => c.chaos_partition(a, b).await,
        ChaosOp::Heal(pair) => c.chaos_heal(pair.as_ref().map(|(a, b)| (a.as_str(), b.as_str()))).await,
        ChaosOp::Delay(fault) => c.chaos_delay(fault).await,
    }
    .map_err(fail)?;
    if opts.json {
        print_json(&status);
        return Ok(());
    }
    if status.links.is_empty() {
        println!("no faults: every link between regions is as configured");
    } else {
        let mut table = Table::new();
        table.load_style(UTF8_FULL_CONDENSED).set_header(vec!["regions", "cut", "delay ms", "jitter ms", "loss %"]);
        for l in &status.links {
            table.add_row(vec![
                format!("{} <-> {}", l.regions[0], l.regions[1]),
                if l.cut { "yes".into() } else { "no".into() },
                l.delay_ms.map_or("as configured".into(), |d| d.to_string()),
                l.jitter_ms.to_string(),
                l.loss_percent.to_string(),
            ]);
        }
        println!("{table}");
    }
    if !status.unreached_nodes.is_empty() {
        let nodes: Vec<String> = status.unreached_nodes.iter().map(ToString::to_string).collect();
        eprintln!("warning: nodes {} were not reached and keep their previous faults", nodes.join(", "));
    }
    Ok(())
}

pub async fn replication_status(opts: &ClientOpts) -> anyhow::Result<()> {
    let r = client(opts).replication_status().await.map_err(fail)?;
    if opts.json {
        print_json(&r);
        return Ok(());
    }
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED).set_header(vec![
        "link",
        "state",
        "acknowledged",
        "lag (changes)",
        "lag (s)",
        "queued",
        "sent raw / wire",
        "batches",
        "errors",
        "rtt ms",
        "backfilled epoch",
    ]);
    for region in &r.regions {
        if let Some(e) = &region.error {
            let mut row = vec![format!("{} -> *", region.region), format!("unreachable: {e}")];
            row.extend(std::iter::repeat_n("-".to_owned(), 9));
            t.add_row(row);
            continue;
        }
        for l in &region.links {
            let s = l.shipper.as_ref();
            let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            t.add_row(vec![
                format!("{} -> {}", region.region, l.destination),
                or_dash(s.map(|s| s.state.clone())),
                format!("{} / {}", l.acknowledged_seq, region.region_seq),
                l.lag_changes.to_string(),
                or_dash(s.map(|s| format!("{:.1}", s.lag_seconds))),
                or_dash(s.map(|s| format!("{} ({} B)", s.queued_changes, s.queued_bytes))),
                or_dash(s.map(|s| format!("{} / {}", s.sent_bytes_raw, s.sent_bytes_wire))),
                or_dash(s.map(|s| s.batches.to_string())),
                or_dash(s.map(|s| s.errors.to_string())),
                or_dash(s.and_then(|s| s.rtt_ms).map(|r| format!("{r:.1}"))),
                l.backfilled_epoch.map_or("-".into(), |e| e.to_string()),
            ]);
        }
    }
    println!("{t}");
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED).set_header(vec!["link", "dataset", "queued", "lag (s)", "sent", "sent bytes"]);
    let mut any = false;
    for region in &r.regions {
        for l in &region.links {
            for d in l.shipper.iter().flat_map(|s| &s.datasets) {
                any = true;
                t.add_row(vec![
                    format!("{} -> {}", region.region, l.destination),
                    d.dataset.clone(),
                    format!("{} ({} B)", d.queued_changes, d.queued_bytes),
                    format!("{:.1}", d.lag_seconds),
                    d.sent_changes.to_string(),
                    d.sent_bytes.to_string(),
                ]);
            }
        }
    }
    if any {
        println!("{t}");
    }
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED).set_header(vec![
        "region",
        "policy epoch",
        "received (link)",
        "repaired",
        "purged",
        "outbox trimmed to",
    ]);
    let sum = |v: &[(String, u64)]| v.iter().map(|(_, n)| n).sum::<u64>().to_string();
    for region in r.regions.iter().filter(|r| r.error.is_none()) {
        t.add_row(vec![
            region.region.clone(),
            region.policy_epoch.to_string(),
            sum(&region.received),
            sum(&region.repaired),
            region.purged.to_string(),
            region.outbox_trimmed.to_string(),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub async fn replication_verify(opts: &ClientOpts, dataset: Option<&str>) -> anyhow::Result<()> {
    let r = client(opts).replication_verify(dataset).await.map_err(fail)?;
    if opts.json {
        print_json(&r);
    } else {
        let mut t = Table::new();
        t.load_style(UTF8_FULL_CONDENSED).set_header(vec!["regions", "dataset", "objects", "copies"]);
        for p in &r.pairs {
            let pair = format!("{} <-> {}", p.a, p.b);
            if let Some(e) = &p.error {
                t.add_row(vec![pair, "-".into(), "-".into(), format!("not compared: {e}")]);
                continue;
            }
            if p.datasets.is_empty() {
                t.add_row(vec![pair.clone(), "-".into(), "0".into(), "nothing both may hold".into()]);
            }
            for d in &p.datasets {
                let objects = if d.count_a == d.count_b {
                    d.count_a.to_string()
                } else {
                    format!("{} / {}", d.count_a, d.count_b)
                };
                let verdict = if d.equal { "equal" } else { "DIFFER" };
                t.add_row(vec![pair.clone(), d.dataset.clone(), objects, verdict.into()]);
            }
        }
        println!("{t}");
        println!("{}", if r.converged { "converged: every allowed copy is equal" } else { "not converged" });
    }
    if !r.converged {
        std::process::exit(1);
    }
    Ok(())
}

fn ms_ago(at_ms: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    format!("{:.1} s ago", now.saturating_sub(at_ms) as f64 / 1000.0)
}

fn promotion_line(p: &meridian_api::PromotionInfo) -> String {
    let state = match p.ended_ms {
        None => "active".to_owned(),
        Some(end) => format!("ended {}", ms_ago(end)),
    };
    let lag = p.lag_ms.map_or("unknown".to_owned(), |l| format!("{l} ms"));
    format!(
        "{} in {} for {}: epoch {}, {state}, since {}, lag {lag}{}{} ({})",
        p.dataset,
        p.region,
        p.homes.join(", "),
        p.epoch,
        ms_ago(p.since_ms),
        if p.manual { ", by an operator" } else { "" },
        if p.forced { ", forced" } else { "" },
        p.reason
    )
}

pub async fn failover_status(opts: &ClientOpts, events: usize) -> anyhow::Result<()> {
    let s = client(opts).failover_status(Some(events)).await.map_err(fail)?;
    if opts.json {
        print_json(&s);
        return Ok(());
    }
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED).set_header(vec!["region", "dataset", "epoch", "state", "lag ms", "since", "by"]);
    for r in &s.regions {
        for p in &r.promotions {
            t.add_row(vec![
                r.region.clone(),
                p.dataset.clone(),
                p.epoch.to_string(),
                p.ended_ms.map_or("active".to_owned(), |e| format!("ended {}", ms_ago(e))),
                p.lag_ms.map_or("?".to_owned(), |l| l.to_string()),
                ms_ago(p.since_ms),
                if p.manual { "operator" } else { "automatic" }.to_owned(),
            ]);
        }
    }
    if s.regions.iter().all(|r| r.promotions.is_empty()) {
        println!("no region has been promoted");
    } else {
        println!("{t}");
    }
    for r in &s.regions {
        if let Some(e) = &r.error {
            println!("{}: could not be read: {e}", r.region);
        }
        for e in &r.events {
            println!("{} {}: {} {} epoch {}: {}", r.region, ms_ago(e.at_ms), e.kind, e.dataset, e.epoch, e.detail);
        }
    }
    Ok(())
}

pub async fn failover_promote(opts: &ClientOpts, dataset: &str, region: &str, force: bool) -> anyhow::Result<()> {
    let req = meridian_api::PromoteRequest { dataset: dataset.to_owned(), region: region.to_owned(), force };
    let r = client(opts).failover_promote(&req).await.map_err(fail)?;
    if opts.json {
        print_json(&r);
    } else if let Some(p) = &r.promotion {
        println!("promoted {}", promotion_line(p));
    }
    Ok(())
}

pub async fn failover_end(opts: &ClientOpts, dataset: &str, region: &str) -> anyhow::Result<()> {
    let req = meridian_api::EndPromotionRequest { dataset: dataset.to_owned(), region: region.to_owned() };
    let r = client(opts).failover_end(&req).await.map_err(fail)?;
    if opts.json {
        print_json(&r);
    } else {
        match &r.promotion {
            Some(p) => println!("ended {}", promotion_line(p)),
            None => println!("{region} holds no active promotion for {dataset}"),
        }
    }
    Ok(())
}
