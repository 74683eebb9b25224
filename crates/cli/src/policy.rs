//! `meridian policy ...`: policy documents from the command line. `check` runs offline, with no
//! cluster: the same parser and validator the nodes use. The others talk to a cluster's
//! `/v1/policy` API: `plan`, `apply`, `history`, `status`, `show`, `rollback` and `explain`.

use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, Context};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use meridian_api::{
    ErrorCode, Explanation, LinkBody, PolicyApplyRequest, PolicyApplyResponse, PolicyDocumentBody, PolicyEntry,
    RegionBytes,
};
use meridian_client::ClientError;
use meridian_node::config::ClusterConfig;
use meridian_policy::limits::POLICY_BYTES_MAX;
use meridian_policy::{Format, Policy};
use serde_json::json;

use crate::commands::{client, fail, print_json};
use crate::ClientOpts;

/// Reads a policy file, refusing one over the size limit before reading it whole.
pub fn read_policy_file(path: &Path) -> anyhow::Result<String> {
    let file = std::fs::File::open(path).with_context(|| format!("open policy file {}", path.display()))?;
    let mut text = String::new();
    file.take(POLICY_BYTES_MAX as u64 + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("read policy file {} (it must be UTF-8 text)", path.display()))?;
    if text.len() > POLICY_BYTES_MAX {
        return Err(anyhow!(
            "document_too_large: {} is over {POLICY_BYTES_MAX} bytes, the limit for a policy document",
            path.display()
        ));
    }
    Ok(text)
}

/// `meridian policy check FILE [--config CLUSTER.toml] [--json]`.
pub fn check(file: &Path, config: Option<&Path>, json_out: bool) -> anyhow::Result<()> {
    let text = read_policy_file(file)?;
    let name = file.display().to_string();
    let config = match config {
        Some(path) => Some(ClusterConfig::load(path).context("load the cluster configuration")?),
        None => None,
    };
    let topology = config.as_ref().map(|c| &c.topology);
    match Policy::parse(&text, Format::from_file_name(&name), &name, topology) {
        Ok(policy) => {
            let datasets: Vec<&str> = policy.datasets().map(|(n, _)| n.as_str()).collect();
            if json_out {
                let out = json!({
                    "ok": true,
                    "version": policy.id().to_hex(),
                    "datasets": datasets,
                    "has_default": policy.default_rules().is_some(),
                    "regions_checked": topology.is_some(),
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "ok: {name}: {} dataset(s){}, version {}",
                    datasets.len(),
                    if policy.default_rules().is_some() { " and a default" } else { "" },
                    policy.id().short()
                );
                if topology.is_none() {
                    println!("note: region names were checked for form only; pass --config CLUSTER.toml to check them against a topology");
                }
            }
            Ok(())
        }
        Err(report) => {
            if json_out {
                let out = json!({ "ok": false, "file": name, "problems": report.diagnostics });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                eprintln!("{report}");
            }
            Err(anyhow!("policy_invalid: {name} has {} problem(s)", report.diagnostics.len()))
        }
    }
}

/// The length of a version id as the CLI shows it (the full id is 64 hex characters).
const SHORT_ID_LEN: usize = 12;

/// A version id cut to its first 12 characters.
fn short(version: &str) -> &str {
    version.get(..SHORT_ID_LEN).unwrap_or(version)
}

/// A byte count in SI units (powers of 1000, as policy rates are written): `512 B`, `1.5 MB`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KB", "MB", "GB", "TB", "PB", "EB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1000.0;
    let mut unit = 0;
    while value >= 999.95 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Milliseconds since the Unix epoch as a UTC time, `2024-05-01T12:34:56.789Z`.
fn format_utc(at_ms: u64) -> String {
    let secs = at_ms / 1000;
    let (year, month, day) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        at_ms % 1000
    )
}

/// The proleptic Gregorian date `days` days after 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

fn join_or(items: &[String], empty: &str) -> String {
    if items.is_empty() {
        empty.to_owned()
    } else {
        items.join(", ")
    }
}

fn new_table(header: Vec<&str>) -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED).set_header(header);
    t
}

/// The text and name sent for a policy file: its contents, `yaml` for `.yaml`/`.yml` names
/// (else `toml`), and its file name (the server stores it with the version).
fn document_body(file: &Path) -> anyhow::Result<PolicyDocumentBody> {
    let text = read_policy_file(file)?;
    let format = match Format::from_file_name(&file.display().to_string()) {
        Format::Yaml => "yaml",
        Format::Toml => "toml",
    };
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| file.display().to_string());
    Ok(PolicyDocumentBody { text, format: Some(format.to_owned()), file: Some(name) })
}

/// Like [`fail`], but a `policy_invalid` answer first prints every problem the way `check`
/// does (`FILE:LINE:COLUMN: error[RULE]: message`, then an indented hint) on stderr, under
/// `file`, the name the operator knows the document by. With `--json` the error body (with its
/// `problems`) is also printed on stdout.
fn policy_fail(e: ClientError, file: &str, json_out: bool) -> anyhow::Error {
    let ClientError::Api { status, body } = e else {
        return fail(e);
    };
    let problems = match &body.problems {
        Some(p) if body.code == ErrorCode::PolicyInvalid && !p.is_empty() => p,
        _ => return fail(ClientError::Api { status, body }),
    };
    if json_out {
        print_json(&body);
    }
    let mut report = String::new();
    for p in problems {
        match (p.line, p.column) {
            (Some(line), Some(column)) => report.push_str(&format!("{file}:{line}:{column}: ")),
            (Some(line), None) => report.push_str(&format!("{file}:{line}: ")),
            _ => report.push_str(&format!("{file}: ")),
        }
        report.push_str(&format!("error[{}]: {}\n", p.rule, p.message));
        if let Some(hint) = &p.hint {
            report.push_str(&format!("    hint: {hint}\n"));
        }
    }
    let n = problems.len();
    eprintln!("{report}{n} problem{} found", if n == 1 { "" } else { "s" });
    anyhow!("{}: {file} has {n} problem(s); nothing was changed (HTTP {status})", ErrorCode::PolicyInvalid.as_str())
}

fn link_list(links: &[LinkBody]) -> String {
    links.iter().map(|l| format!("  {}: {} → {}", l.dataset, l.from, l.to)).collect::<Vec<_>>().join("\n")
}

/// `meridian policy plan FILE`: what applying the document would change.
pub async fn plan(opts: &ClientOpts, file: &Path) -> anyhow::Result<()> {
    let doc = document_body(file)?;
    let name = file.display().to_string();
    let plan = client(opts).policy_plan(&doc).await.map_err(|e| policy_fail(e, &name, opts.json))?;
    if opts.json {
        print_json(&plan);
        return Ok(());
    }
    println!(
        "version {} (active) → {} (proposed)",
        plan.current.as_deref().map(short).unwrap_or("none"),
        short(&plan.proposed)
    );
    if plan.same_version {
        println!("no change: {name} is the active version already");
    }
    let region_cell = |regions: &[RegionBytes], sign: char| {
        regions
            .iter()
            .map(|r| {
                if plan.unreachable.contains(&r.region) {
                    format!("{} (size unknown)", r.region)
                } else {
                    format!("{} {sign}{} ({} keys)", r.region, human_bytes(r.bytes), r.keys)
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    if plan.datasets.is_empty() {
        println!("no datasets");
    } else {
        let mut t = new_table(vec!["dataset", "change", "gaining", "losing", "notes"]);
        for d in &plan.datasets {
            t.add_row(vec![
                d.dataset.clone(),
                d.change.clone(),
                region_cell(&d.gaining, '+'),
                region_cell(&d.losing, '-'),
                d.notes.join("\n"),
            ]);
        }
        println!("{t}");
    }
    if plan.links_opened.is_empty() {
        println!("links opened: none");
    } else {
        println!("links opened:\n{}", link_list(&plan.links_opened));
    }
    if plan.links_closed.is_empty() {
        println!("links closed: none");
    } else {
        println!("links closed:\n{}", link_list(&plan.links_closed));
    }
    if !plan.unreachable.is_empty() {
        println!("unreachable (their byte figures are missing): {}", plan.unreachable.join(", "));
    }
    Ok(())
}

fn print_applied(verb: &str, r: &PolicyApplyResponse) {
    let e = &r.entry;
    println!("{verb} version {} as epoch {} ({}, {}%)", short(&e.version), e.epoch, e.mode, e.percent);
    if let Some(base) = e.base.as_deref().filter(|_| e.mode != "enforce" || e.percent < 100) {
        println!("keys this entry does not cover stay under version {}", short(base));
    }
    println!("propagated: {}", join_or(&r.propagated, "none"));
    if r.pending.is_empty() {
        println!("pending: none");
    } else {
        println!("pending: {} (their leaders catch up from the authority in the background)", r.pending.join(", "));
    }
}

/// `meridian policy apply FILE [--shadow | --enforce] [--percent N]`.
/// Deadline of a policy change: it reads the authority, commits there, then installs a copy in
/// every region; giving up earlier could leave a user unsure whether it committed.
const CHANGE_TIMEOUT_SECS_MIN: u64 = 60;

fn change_client(opts: &ClientOpts) -> meridian_client::Client {
    let mut opts = opts.clone();
    opts.timeout_secs = opts.timeout_secs.max(CHANGE_TIMEOUT_SECS_MIN);
    client(&opts)
}

pub async fn apply(opts: &ClientOpts, file: &Path, shadow: bool, percent: u8) -> anyhow::Result<()> {
    let document = document_body(file)?;
    let name = file.display().to_string();
    let req = PolicyApplyRequest {
        document,
        mode: Some(if shadow { "shadow" } else { "enforce" }.to_owned()),
        percent: Some(percent),
    };
    let r = change_client(opts).policy_apply(&req).await.map_err(|e| policy_fail(e, &name, opts.json))?;
    if opts.json {
        print_json(&r);
    } else {
        print_applied("applied", &r);
    }
    Ok(())
}

/// `meridian policy rollback VERSION`.
pub async fn rollback(opts: &ClientOpts, version: &str) -> anyhow::Result<()> {
    let r = change_client(opts).policy_rollback(version).await.map_err(|e| policy_fail(e, version, opts.json))?;
    if opts.json {
        print_json(&r);
    } else {
        print_applied("rolled back to", &r);
    }
    Ok(())
}

fn entry_row(e: &PolicyEntry) -> Vec<String> {
    vec![
        e.epoch.to_string(),
        short(&e.version).to_owned(),
        e.action.clone(),
        e.mode.clone(),
        format!("{}%", e.percent),
        e.base.as_deref().map(short).unwrap_or("-").to_owned(),
        format_utc(e.at_ms),
        e.datasets.join(", "),
    ]
}

const ENTRY_HEADER: [&str; 8] = ["epoch", "version", "action", "mode", "percent", "base", "at (UTC)", "datasets"];

/// `meridian policy history`: every entry, newest first.
pub async fn history(opts: &ClientOpts) -> anyhow::Result<()> {
    let h = client(opts).policy_history().await.map_err(fail)?;
    if opts.json {
        print_json(&h);
        return Ok(());
    }
    if h.entries.is_empty() {
        println!("no policy has been applied yet");
        return Ok(());
    }
    let mut t = new_table(ENTRY_HEADER.to_vec());
    for e in &h.entries {
        t.add_row(entry_row(e));
    }
    println!("{t}");
    Ok(())
}

/// `meridian policy status`: the active entry and where each region's copy stands.
pub async fn status(opts: &ClientOpts) -> anyhow::Result<()> {
    let s = client(opts).policy_status().await.map_err(fail)?;
    if opts.json {
        print_json(&s);
        return Ok(());
    }
    match &s.active {
        Some(e) => {
            println!(
                "active: version {} at epoch {} ({}, {}, {}%), since {}",
                short(&e.version),
                e.epoch,
                e.action,
                e.mode,
                e.percent,
                format_utc(e.at_ms)
            );
            if let Some(base) = e.base.as_deref().filter(|_| e.mode != "enforce" || e.percent < 100) {
                println!("keys this entry does not cover stay under version {}", short(base));
            }
            println!("datasets: {}", join_or(&e.datasets, "none"));
        }
        None => println!("active: none (no policy has been applied yet)"),
    }
    println!("authority: {}", s.authority);
    let active_epoch = s.active.as_ref().map(|e| e.epoch);
    let mut t = new_table(vec!["region", "epoch", "state"]);
    for r in &s.regions {
        let (epoch, state) = match (&r.error, r.epoch) {
            (Some(err), _) => ("-".to_owned(), format!("error: {err}")),
            (None, None) => ("-".to_owned(), "no policy yet".to_owned()),
            (None, Some(n)) => {
                let state = match active_epoch {
                    Some(a) if n < a => "behind",
                    Some(a) if n > a => "ahead",
                    Some(_) => "current",
                    None => "?",
                };
                (n.to_string(), state.to_owned())
            }
        };
        t.add_row(vec![r.region.clone(), epoch, state]);
    }
    println!("{t}");
    Ok(())
}

/// `meridian policy show VERSION`: the stored text of a version, as it was written.
pub async fn show(opts: &ClientOpts, version: &str) -> anyhow::Result<()> {
    let v = client(opts).policy_version(version).await.map_err(fail)?;
    if opts.json {
        print_json(&v);
        return Ok(());
    }
    print!("{}", v.text);
    if !v.text.ends_with('\n') {
        println!();
    }
    eprintln!(
        "version {} ({}, written as {}); datasets: {}",
        v.version,
        v.format,
        v.file,
        join_or(&v.datasets, "none")
    );
    Ok(())
}

fn print_placement(x: &Explanation) {
    let mut t = new_table(vec!["region", "role", "why"]);
    for r in &x.regions {
        t.add_row(vec![r.region.clone(), r.role.clone(), r.reason.clone()]);
    }
    println!("{t}");
    if x.links.is_empty() {
        println!("links: none");
    } else {
        println!("links:");
        for l in &x.links {
            let mut line = format!("  {} → {}: {}", l.from, l.to, l.schedule);
            if let Some(rate) = &l.rate {
                line.push_str(&format!(", rate {rate}"));
            }
            if let Some(lag) = &l.max_lag {
                line.push_str(&format!(", max lag {lag}"));
            }
            println!("{line}");
        }
    }
}

/// `meridian policy explain DATASET KEY [--home REGION]`.
pub async fn explain(opts: &ClientOpts, dataset: &str, key: &str, home: Option<&str>) -> anyhow::Result<()> {
    let x = client(opts).policy_explain(dataset, key, home).await.map_err(fail)?;
    if opts.json {
        print_json(&x);
        return Ok(());
    }
    println!("{}/{}", x.dataset, x.key);
    println!("version: {} ({})", short(&x.version), x.governed_by);
    println!("rules: {}", x.rules);
    println!("locality: {}", x.locality);
    println!("classification: {}", x.classification);
    println!("kind: {}", x.kind);
    print_placement(&x);
    println!("consistency: {}", x.consistency);
    println!("conflict: {}", x.conflict);
    println!("failover: {}", join_or(&x.failover, "none"));
    println!("retention: {}", x.retention);
    println!("encryption at rest: {}", if x.encryption_at_rest { "yes" } else { "no" });
    println!("quarantine: {}", x.quarantine);
    if let Some(shadow) = &x.shadow {
        println!();
        println!("under the shadow version {} (not enforced):", short(&shadow.version));
        print_placement(shadow);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_utc(1_714_566_896_789), "2024-05-01T12:34:56.789Z");
        assert_eq!(format_utc(1_735_689_599_000), "2024-12-31T23:59:59.000Z");
    }

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_500), "1.5 KB");
        assert_eq!(human_bytes(999_999), "1.0 MB");
        assert_eq!(human_bytes(2_340_000_000), "2.3 GB");
    }

    #[test]
    fn ids_are_shortened() {
        assert_eq!(short("0123456789abcdef0123"), "0123456789ab");
        assert_eq!(short("abc"), "abc");
    }
}
