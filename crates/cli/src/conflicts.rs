//! `meridian op` (operations on counters, sets and maps) and `meridian conflicts`.

use anyhow::{anyhow, bail};
use clap::Subcommand;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use meridian_api::{ConflictInfo, OpRequest, ResolveRequest, SiblingInfo};

use crate::commands::{client, fail, print_json};
use crate::ClientOpts;

#[derive(Subcommand)]
pub enum ConflictsCommand {
    /// This region's conflict records, newest first (ids are per region: ask a node of the
    /// region you mean with --endpoint).
    List {
        #[arg(long)]
        dataset: Option<String>,
        /// Only this key (needs --dataset).
        #[arg(long, requires = "dataset")]
        key: Option<String>,
        /// open (siblings wait for a choice), resolved (by the rule) or superseded.
        #[arg(long, value_parser = ["open", "resolved", "superseded"])]
        state: Option<String>,
        /// Only records older than this id (the previous page's next id).
        #[arg(long)]
        before: Option<u64>,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1000))]
        limit: u64,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// One record: every concurrent version with its value, and the outcome.
    Show {
        id: u64,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Act on a record: keep one of its versions, write a value of your own, or delete the key.
    /// For siblings the write supersedes exactly the record's versions; for a counter, set or
    /// map the value is reached by operations, so what other regions do meanwhile still merges.
    Resolve {
        id: u64,
        /// Keep this version (an etag `conflicts show` lists).
        #[arg(long, group = "choice")]
        choose: Option<String>,
        /// Write this JSON value instead.
        #[arg(long, group = "choice")]
        value: Option<String>,
        /// Delete the key.
        #[arg(long, group = "choice")]
        delete: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
}

/// Turn `meridian op`'s words into the API's body.
fn op_request(op: &str, args: &[String]) -> anyhow::Result<OpRequest> {
    let mut req = OpRequest::default();
    match op {
        "increment" | "decrement" => match args {
            [] => {}
            [n] => req.amount = Some(n.parse().map_err(|_| anyhow!("{op} takes a whole number, not {n:?}"))?),
            _ => bail!("{op} takes at most one amount"),
        },
        "add" | "remove" => {
            if args.is_empty() {
                bail!("{op} takes the members, e.g. `meridian op carts c1 {op} lamp desk`");
            }
            req.members = Some(args.to_vec());
        }
        "set" => {
            let mut fields = serde_json::Map::new();
            for a in args {
                let (f, v) = a.split_once('=').ok_or_else(|| anyhow!("set takes FIELD=JSON, e.g. name='\"Ada\"'"))?;
                let v: serde_json::Value = serde_json::from_str(v)
                    .map_err(|e| anyhow!("the value of {f} is not JSON ({e}); quote strings"))?;
                fields.insert(f.to_owned(), v);
            }
            if fields.is_empty() {
                bail!("set takes FIELD=JSON pairs");
            }
            req.fields = Some(serde_json::Value::Object(fields));
        }
        "delete" => {
            if args.is_empty() {
                bail!("delete takes the field names");
            }
            req.fields = Some(serde_json::json!(args));
        }
        // Unknown operations go to the server, which names the ones it knows.
        _ => {}
    }
    Ok(req)
}

pub async fn op(opts: &ClientOpts, dataset: &str, key: &str, op: &str, args: &[String]) -> anyhow::Result<()> {
    let req = op_request(op, args)?;
    let c = client(opts);
    let r = c.op(dataset, key, op, &req).await.map_err(fail)?;
    crate::commands::carry_session(opts, &c)?;
    if opts.json {
        print_json(&r);
    } else {
        println!("{op} {dataset}/{key}: version {} ({})", r.version.etag, crate::commands::served_text(&r.served_by));
    }
    Ok(())
}

fn shown(s: &SiblingInfo) -> String {
    if s.deleted {
        format!("(deleted) @ {}", s.version.etag)
    } else {
        format!("{} @ {}", s.value, s.version.etag)
    }
}

fn print_one(c: &ConflictInfo) {
    println!("conflict {} in {}: {}/{} ({}, {})", c.id, c.region, c.dataset, c.key, c.rule, c.state);
    println!("  from: {}   at: {} ms", c.source, c.at_ms);
    for v in &c.versions {
        println!("  version: {}", shown(v));
    }
    println!("  outcome: {}", shown(&c.outcome));
}

pub async fn conflicts(command: ConflictsCommand) -> anyhow::Result<()> {
    match command {
        ConflictsCommand::List { dataset, key, state, before, limit, client: opts } => {
            let r = client(&opts)
                .conflicts(dataset.as_deref(), key.as_deref(), state.as_deref(), before, Some(limit as usize))
                .await
                .map_err(fail)?;
            if opts.json {
                print_json(&r);
                return Ok(());
            }
            let mut t = Table::new();
            t.load_style(UTF8_FULL_CONDENSED).set_header(vec![
                "id",
                "dataset/key",
                "rule",
                "state",
                "versions",
                "outcome",
                "from",
            ]);
            for c in &r.items {
                t.add_row([
                    c.id.to_string(),
                    format!("{}/{}", c.dataset, c.key),
                    c.rule.clone(),
                    c.state.clone(),
                    c.versions.len().to_string(),
                    shown(&c.outcome),
                    c.source.clone(),
                ]);
            }
            println!("{t}");
            println!("region {}: {} records held, {} expired", r.region, r.held, r.expired);
            if let Some(b) = r.next_before {
                println!("more: --before {b}");
            }
        }
        ConflictsCommand::Show { id, client: opts } => {
            let c = client(&opts).conflict(id).await.map_err(fail)?;
            if opts.json {
                print_json(&c);
            } else {
                print_one(&c);
            }
        }
        ConflictsCommand::Resolve { id, choose, value, delete, client: opts } => {
            let value = match value {
                Some(v) => {
                    Some(serde_json::from_str(&v).map_err(|e| anyhow!("--value is not JSON ({e}); quote strings"))?)
                }
                None => None,
            };
            if choose.is_none() && value.is_none() && !delete {
                bail!("say how to resolve it: --choose ETAG, --value JSON or --delete");
            }
            let req = ResolveRequest { choose, value, delete };
            let r = client(&opts).resolve(id, &req).await.map_err(fail)?;
            if opts.json {
                print_json(&r);
            } else {
                println!("resolved conflict {id} of {}/{}: version {}", r.dataset, r.key, r.version.etag);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_words_become_the_api_body() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(op_request("increment", &[]).unwrap().amount, None);
        assert_eq!(op_request("decrement", &s(&["5"])).unwrap().amount, Some(5));
        assert!(op_request("increment", &s(&["-5"])).is_err());
        assert_eq!(op_request("add", &s(&["a", "b"])).unwrap().members, Some(s(&["a", "b"])));
        assert!(op_request("remove", &[]).is_err());
        let set = op_request("set", &s(&["name=\"Ada\"", "age=36"])).unwrap();
        assert_eq!(set.fields, Some(serde_json::json!({"name": "Ada", "age": 36})));
        assert!(op_request("set", &s(&["name=Ada"])).is_err(), "an unquoted string is not JSON");
        assert_eq!(op_request("delete", &s(&["age"])).unwrap().fields, Some(serde_json::json!(["age"])));
    }
}
