//! Located tree → [`PolicyDocument`], reporting every shape problem (unknown field, wrong type,
//! missing field, bad duration…) rather than stopping at the first. Meaning-level rules are in
//! `validate.rs`; this module only checks that each value is the kind of thing its field holds.

use std::collections::BTreeMap;

use meridian_core::{DatasetName, RegionId};

use crate::diagnostic::{did_you_mean, Diagnostic, Rule};
use crate::document::*;
use crate::limits::{DATASETS_MAX, REGION_LIST_MAX, TEXT_BYTES_MAX};
use crate::source::{Entry, Node, Pos, Value};
use crate::units::{Dur, Rate, Window};

/// Decodes a whole document. A dataset whose shape is broken is reported and left out, so the
/// meaning-level rules still run over the others and every problem is reported in one pass;
/// `None` only when the document itself is not a table.
pub fn decode(root: &Node, diags: &mut Vec<Diagnostic>) -> Option<PolicyDocument> {
    let mut cx = Cx { diags };
    cx.document(root)
}

const DOCUMENT_FIELDS: &[&str] = &["format", "default", "dataset"];
const RULE_FIELDS: &[&str] = &[
    "description",
    "locality",
    "classification",
    "kind",
    "home",
    "allowed",
    "mirrors",
    "sync",
    "conflict",
    "consistency",
    "max_staleness",
    "failover",
    "retention",
    "quarantine",
    "encryption_at_rest",
];
const SYNC_FIELDS: &[&str] = &["mode", "every", "jitter", "window", "rate", "max_lag"];
const FAILOVER_FIELDS: &[&str] = &["order", "rpo"];
const QUARANTINE_FIELDS: &[&str] = &["hold", "release", "release_after", "purge_grace"];

/// An optional field: absent is fine; present but broken makes the enclosing table unsound
/// (its problem is already reported).
macro_rules! optional {
    ($fields:expr, $sound:ident, $key:literal, |$n:ident| $decode:expr) => {
        $fields.get($key).and_then(|$n| {
            let v = $decode;
            $sound &= v.is_some();
            v
        })
    };
}

struct Cx<'d> {
    diags: &'d mut Vec<Diagnostic>,
}

/// A table's entries by key, after unknown keys were reported.
struct Fields<'n> {
    pos: Pos,
    by_key: BTreeMap<&'n str, &'n Entry>,
}

impl<'n> Fields<'n> {
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.by_key.get(key).map(|e| &e.value)
    }
}

impl Cx<'_> {
    fn push(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn wrong_type(&mut self, node: &Node, what: &str, expected: &str) {
        self.push(Diagnostic::at(
            node.pos,
            Rule::WrongType,
            format!("{what} must be {expected}, not {}", node.value.type_name()),
        ));
    }

    /// A table whose keys are checked against `known`; unknown ones get a "did you mean".
    fn table<'n>(&mut self, node: &'n Node, what: &str, known: &[&str]) -> Option<Fields<'n>> {
        let Value::Table(entries) = &node.value else {
            self.wrong_type(node, what, "a table");
            return None;
        };
        let mut by_key = BTreeMap::new();
        for entry in entries {
            if known.contains(&entry.key.as_str()) {
                by_key.insert(entry.key.as_str(), entry);
                continue;
            }
            let mut d =
                Diagnostic::at(entry.key_pos, Rule::UnknownField, format!("{what} has no field {:?}", entry.key));
            d = match did_you_mean(&entry.key, known.iter().copied()) {
                Some(s) => d.hint(format!("did you mean `{s}`?")),
                None => d.hint(format!("the fields are: {}", known.join(", "))),
            };
            self.push(d);
        }
        Some(Fields { pos: node.pos, by_key })
    }

    fn string(&mut self, node: &Node, what: &str) -> Option<Loc<String>> {
        match &node.value {
            Value::Str(s) if s.len() > TEXT_BYTES_MAX => {
                self.push(Diagnostic::at(
                    node.pos,
                    Rule::TooMany,
                    format!("{what} is {} bytes; the limit is {TEXT_BYTES_MAX}", s.len()),
                ));
                None
            }
            Value::Str(s) => Some(Loc::new(s.clone(), node.pos)),
            _ => {
                self.wrong_type(node, what, "a string");
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, what: &str) -> Option<Loc<bool>> {
        match &node.value {
            Value::Bool(b) => Some(Loc::new(*b, node.pos)),
            _ => {
                self.wrong_type(node, what, "true or false");
                None
            }
        }
    }

    fn keyword<K: Keyword>(&mut self, node: &Node, what: &str) -> Option<Loc<K>> {
        let words: Vec<&str> = K::words().collect();
        let choices = words.iter().map(|w| format!("\"{w}\"")).collect::<Vec<_>>().join(", ");
        let Value::Str(s) = &node.value else {
            self.wrong_type(node, what, &format!("one of {choices}"));
            return None;
        };
        if let Some(k) = K::parse(s) {
            return Some(Loc::new(k, node.pos));
        }
        let d = Diagnostic::at(node.pos, Rule::InvalidValue, format!("{what} {s:?} is not one of {choices}"));
        self.push(match did_you_mean(s, words.iter().copied()) {
            Some(w) => d.hint(format!("did you mean \"{w}\"?")),
            None => d,
        });
        None
    }

    fn parsed<T>(
        &mut self,
        node: &Node,
        what: &str,
        rule: Rule,
        example: &str,
        parse: fn(&str) -> Result<T, String>,
    ) -> Option<Loc<T>> {
        let Value::Str(s) = &node.value else {
            self.wrong_type(node, what, &format!("a string such as \"{example}\""));
            return None;
        };
        match parse(s) {
            Ok(v) => Some(Loc::new(v, node.pos)),
            Err(why) => {
                self.push(
                    Diagnostic::at(node.pos, rule, format!("{what} {s:?}: {why}"))
                        .hint(format!("write it like \"{example}\"")),
                );
                None
            }
        }
    }

    fn duration(&mut self, node: &Node, what: &str) -> Option<Loc<Dur>> {
        self.parsed(node, what, Rule::BadDuration, "30s", Dur::parse)
    }

    /// A duration that must be above zero (a budget or period of zero means nothing).
    fn positive_duration(&mut self, node: &Node, what: &str) -> Option<Loc<Dur>> {
        let d = self.duration(node, what)?;
        if d.value.ms() == 0 {
            self.push(Diagnostic::at(node.pos, Rule::BadDuration, format!("{what} must be longer than zero")));
            return None;
        }
        Some(d)
    }

    fn region_list(&mut self, node: &Node, what: &str) -> Option<Loc<RegionList>> {
        let Value::List(items) = &node.value else {
            self.wrong_type(node, what, "a list of region names");
            return None;
        };
        if items.len() > REGION_LIST_MAX {
            self.push(Diagnostic::at(
                node.pos,
                Rule::TooMany,
                format!("{what} names {} regions; a topology has at most {REGION_LIST_MAX}", items.len()),
            ));
            return None;
        }
        let mut out: RegionList = Vec::new();
        let mut ok = true;
        for item in items {
            let Some(name) = self.string(item, &format!("each entry of {what}")) else {
                ok = false;
                continue;
            };
            if let Err(e) = RegionId::new(name.value.clone()) {
                self.push(Diagnostic::at(item.pos, Rule::InvalidName, format!("{what}: {e}")));
                ok = false;
                continue;
            }
            if let Some(first) = out.iter().find(|r| r.value == name.value) {
                self.push(
                    Diagnostic::at(item.pos, Rule::DuplicateRegion, format!("{what} names {:?} twice", name.value))
                        .hint(format!("remove one; the first is at {}", first.pos)),
                );
                ok = false;
                continue;
            }
            out.push(name);
        }
        ok.then(|| Loc::new(out, node.pos))
    }

    fn document(&mut self, root: &Node) -> Option<PolicyDocument> {
        let fields = self.table(root, "the policy", DOCUMENT_FIELDS)?;
        let format = match fields.get("format") {
            None => None,
            Some(node) => match &node.value {
                Value::Int(1) => Some(Loc::new(1, node.pos)),
                Value::Int(n) => {
                    self.push(
                        Diagnostic::at(node.pos, Rule::UnsupportedFormat, format!("format {n} is not supported"))
                            .hint("this release reads format = 1"),
                    );
                    None
                }
                _ => {
                    self.wrong_type(node, "format", "an integer");
                    None
                }
            },
        };
        let default = match fields.get("default") {
            None => None,
            Some(node) => {
                let rules = self.table(node, "[default]", RULE_FIELDS).and_then(|f| self.rules(&f, "[default]"));
                rules.map(|r| Loc::new(r, node.pos))
            }
        };
        let mut datasets = Vec::new();
        match fields.get("dataset") {
            None => {}
            Some(node) => match &node.value {
                Value::List(items) => {
                    if items.len() > DATASETS_MAX {
                        self.push(
                            Diagnostic::at(
                                node.pos,
                                Rule::TooMany,
                                format!("the policy names {} datasets; the limit is {DATASETS_MAX}", items.len()),
                            )
                            .hint("give datasets that share rules to `[default]`"),
                        );
                        return None;
                    }
                    for item in items {
                        if let Some(ds) = self.dataset(item) {
                            datasets.push(Loc::new(ds, item.pos));
                        }
                    }
                }
                _ => self.wrong_type(node, "dataset", "a list of tables (`[[dataset]]` in TOML)"),
            },
        }
        Some(PolicyDocument { format, default, datasets })
    }

    fn dataset(&mut self, node: &Node) -> Option<DatasetSpec> {
        let mut known = vec!["name"];
        known.extend_from_slice(RULE_FIELDS);
        let fields = self.table(node, "a dataset", &known)?;
        let name = match fields.get("name") {
            None => {
                self.push(
                    Diagnostic::at(fields.pos, Rule::MissingField, "a dataset has no `name`")
                        .hint("add name = \"...\" (lowercase letters, digits, '-' and '_')"),
                );
                None
            }
            Some(n) => self.string(n, "name").and_then(|name| match DatasetName::new(name.value.clone()) {
                Ok(_) => Some(name),
                Err(e) => {
                    self.push(Diagnostic::at(name.pos, Rule::InvalidName, e.to_string()));
                    None
                }
            }),
        };
        let what = match &name {
            Some(n) => format!("dataset {:?}", n.value),
            None => "a dataset".to_string(),
        };
        let rules = self.rules(&fields, &what);
        Some(DatasetSpec { name: name?, rules: rules? })
    }

    fn rules(&mut self, f: &Fields<'_>, what: &str) -> Option<DatasetRules> {
        let mut sound = true;
        let required = |cx: &mut Self, key: &str, choices: &str| {
            if f.get(key).is_none() {
                cx.push(
                    Diagnostic::at(f.pos, Rule::MissingField, format!("{what} has no `{key}`"))
                        .hint(format!("add {key} = one of {choices}")),
                );
            }
        };
        required(self, "locality", "\"global\", \"regional\", \"user\"");
        required(self, "classification", "\"public\", \"internal\", \"confidential\", \"restricted\"");

        let locality = f.get("locality").and_then(|n| self.keyword::<Locality>(n, "locality"));
        let classification = f.get("classification").and_then(|n| self.keyword::<Classification>(n, "classification"));
        let description = optional!(f, sound, "description", |n| self.string(n, "description"));
        let kind = optional!(f, sound, "kind", |n| self.keyword::<Kind>(n, "kind"));
        let home = optional!(f, sound, "home", |n| self.region_list(n, "home"));
        let allowed = optional!(f, sound, "allowed", |n| self.region_list(n, "allowed"));
        let mirrors = optional!(f, sound, "mirrors", |n| self.mirrors(n));
        let sync = optional!(f, sound, "sync", |n| self.sync(n));
        let conflict = optional!(f, sound, "conflict", |n| self.keyword::<ConflictRule>(n, "conflict"));
        let consistency = optional!(f, sound, "consistency", |n| self.keyword::<Consistency>(n, "consistency"));
        let max_staleness = optional!(f, sound, "max_staleness", |n| self.positive_duration(n, "max_staleness"));
        let failover = optional!(f, sound, "failover", |n| self.failover(n));
        let retention = optional!(f, sound, "retention", |n| self.retention(n));
        let quarantine = optional!(f, sound, "quarantine", |n| self.quarantine(n));
        let encryption_at_rest = optional!(f, sound, "encryption_at_rest", |n| self.boolean(n, "encryption_at_rest"));
        if !sound {
            return None;
        }
        Some(DatasetRules {
            description,
            locality: locality?,
            classification: classification?,
            kind,
            home,
            allowed,
            mirrors,
            sync,
            conflict,
            consistency,
            max_staleness,
            failover,
            retention,
            quarantine,
            encryption_at_rest,
        })
    }

    fn mirrors(&mut self, node: &Node) -> Option<Loc<Mirrors>> {
        match &node.value {
            Value::Str(s) if s == "all-allowed" => Some(Loc::new(Mirrors::AllAllowed, node.pos)),
            Value::Str(s) => {
                let d = Diagnostic::at(
                    node.pos,
                    Rule::InvalidValue,
                    format!("mirrors {s:?} is neither a list nor \"all-allowed\""),
                );
                self.push(d.hint("write mirrors = [\"eu-west\"] or mirrors = \"all-allowed\""));
                None
            }
            Value::List(_) => self.region_list(node, "mirrors").map(|l| Loc::new(Mirrors::List(l.value), node.pos)),
            _ => {
                self.wrong_type(node, "mirrors", "a list of region names or \"all-allowed\"");
                None
            }
        }
    }

    fn sync(&mut self, node: &Node) -> Option<Loc<SyncSpec>> {
        let f = self.table(node, "sync", SYNC_FIELDS)?;
        let mut sound = true;
        let spec = SyncSpec {
            mode: optional!(f, sound, "mode", |n| self.keyword(n, "sync.mode")),
            every: optional!(f, sound, "every", |n| self.positive_duration(n, "sync.every")),
            jitter: optional!(f, sound, "jitter", |n| self.duration(n, "sync.jitter")),
            window: optional!(f, sound, "window", |n| self.parsed(
                n,
                "sync.window",
                Rule::BadWindow,
                "01:00-05:00",
                Window::parse
            )),
            rate: optional!(f, sound, "rate", |n| self.parsed(n, "sync.rate", Rule::BadRate, "5MB/s", Rate::parse)),
            max_lag: optional!(f, sound, "max_lag", |n| self.positive_duration(n, "sync.max_lag")),
        };
        sound.then(|| Loc::new(spec, node.pos))
    }

    fn failover(&mut self, node: &Node) -> Option<Loc<FailoverSpec>> {
        if let Value::List(_) = node.value {
            self.wrong_type(node, "failover", "a table");
            if let Some(d) = self.diags.last_mut() {
                d.hint = Some("write failover = { order = [\"eu-central\"], rpo = \"30s\" }".into());
            }
            return None;
        }
        let f = self.table(node, "failover", FAILOVER_FIELDS)?;
        let order = match f.get("order") {
            Some(n) => self.region_list(n, "failover.order"),
            None => {
                self.push(
                    Diagnostic::at(f.pos, Rule::MissingField, "failover has no `order`")
                        .hint("add order = [\"region\", ...]: the regions to try, in order"),
                );
                None
            }
        };
        let rpo = match f.get("rpo") {
            Some(n) => Some(self.positive_duration(n, "failover.rpo")?),
            None => None,
        };
        Some(Loc::new(FailoverSpec { order: order?, rpo }, node.pos))
    }

    fn retention(&mut self, node: &Node) -> Option<Loc<Retention>> {
        if node.value == Value::Str("forever".into()) {
            return Some(Loc::new(Retention::Forever, node.pos));
        }
        let d = self.positive_duration(node, "retention")?;
        Some(Loc::new(Retention::For(d.value), d.pos))
    }

    fn quarantine(&mut self, node: &Node) -> Option<Loc<QuarantineSpec>> {
        let f = self.table(node, "quarantine", QUARANTINE_FIELDS)?;
        let mut sound = true;
        let spec = QuarantineSpec {
            hold: optional!(f, sound, "hold", |n| self.boolean(n, "quarantine.hold")),
            release: optional!(f, sound, "release", |n| self.keyword(n, "quarantine.release")),
            release_after: optional!(f, sound, "release_after", |n| self
                .positive_duration(n, "quarantine.release_after")),
            purge_grace: optional!(f, sound, "purge_grace", |n| self.duration(n, "quarantine.purge_grace")),
        };
        sound.then(|| Loc::new(spec, node.pos))
    }
}
