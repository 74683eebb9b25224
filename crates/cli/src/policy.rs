//! `meridian policy ...`: policy documents from the command line. `check` runs offline, with no
//! cluster: the same parser and validator the nodes use.

use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, Context};
use meridian_node::config::ClusterConfig;
use meridian_policy::limits::POLICY_BYTES_MAX;
use meridian_policy::{Format, Policy};
use serde_json::json;

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
