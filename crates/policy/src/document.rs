//! The policy document as written: every field optional where the text may leave it out, every
//! value with its position. Serializing a document gives its canonical form (positions dropped,
//! keys sorted, durations and rates in canonical spelling), which is what a version's hash
//! covers; deriving its JSON Schema gives `docs/policy.schema.json`.
//!
//! Defaults are not applied here: that is `policy.rs`, so that the hash names what the operator
//! wrote, and a change of defaults in a later release shows up as a plan, not as a new hash.

use std::borrow::Cow;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Serialize, Serializer};

use crate::source::Pos;
use crate::units::{Dur, Rate, Window};

/// A value and where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc<T> {
    pub value: T,
    pub pos: Pos,
}

impl<T> Loc<T> {
    pub fn new(value: T, pos: Pos) -> Self {
        Loc { value, pos }
    }
}

impl<T: Serialize> Serialize for Loc<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(s)
    }
}

impl<T: JsonSchema> JsonSchema for Loc<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
}

/// A closed set of words, parsed with a "did you mean" for near misses.
pub trait Keyword: Sized + Copy + 'static {
    const WORDS: &'static [(&'static str, Self)];

    fn word(self) -> &'static str;

    fn parse(s: &str) -> Option<Self> {
        Self::WORDS.iter().find(|(w, _)| *w == s).map(|(_, v)| *v)
    }

    fn words() -> impl Iterator<Item = &'static str> {
        Self::WORDS.iter().map(|(w, _)| *w)
    }
}

macro_rules! keyword_enum {
    ($(#[$doc:meta])* $ty:ident { $($(#[$vdoc:meta])* $variant:ident => $word:literal,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize, JsonSchema)]
        pub enum $ty {
            $($(#[$vdoc])* #[serde(rename = $word)] $variant,)*
        }

        impl Keyword for $ty {
            const WORDS: &'static [(&'static str, Self)] = &[$(($word, $ty::$variant),)*];
            fn word(self) -> &'static str {
                match self { $($ty::$variant => $word,)* }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.word())
            }
        }
    };
}

keyword_enum! {
    /// Where a dataset's keys live.
    Locality {
        /// The dataset has fixed home regions; copies may go to any allowed region.
        Global => "global",
        /// The dataset has fixed home regions and, unless `allowed` says more, stays in them.
        Regional => "regional",
        /// Each key lives in its owner's region (a `region/` key prefix or a `home` attribute).
        User => "user",
    }
}

keyword_enum! {
    /// How sensitive a dataset is; sets hard limits and defaults. Ordered from least to most.
    Classification {
        Public => "public",
        Internal => "internal",
        /// Encryption at rest is required.
        Confidential => "confidential",
        /// One home per key, no mirrors, never outside `allowed` (default: the home region).
        Restricted => "restricted",
    }
}

keyword_enum! {
    /// The value type of a dataset's keys.
    Kind {
        /// A JSON value per key.
        Document => "document",
        /// A PN-counter per key.
        Counter => "counter",
        /// An observed-remove set of strings per key.
        Set => "set",
        /// Named fields, each a last-writer-wins register holding a JSON value.
        Map => "map",
    }
}

keyword_enum! {
    /// How concurrent writes in different home regions are resolved.
    ConflictRule {
        /// Highest HLC timestamp wins; ties broken by region name.
        Lww => "lww",
        /// Merge by the kind's laws (counter, set, map).
        Crdt => "crdt",
        /// Keep every concurrent version; a later write with their causal context resolves them.
        Siblings => "siblings",
    }
}

keyword_enum! {
    /// The read consistency used when a request names none.
    Consistency {
        Strong => "strong",
        Bounded => "bounded",
        Session => "session",
        Eventual => "eventual",
        Local => "local",
    }
}

keyword_enum! {
    /// When a link ships changes.
    SyncMode {
        /// As soon as they commit.
        Continuous => "continuous",
        /// Every `every`, shifted by up to `jitter` so links do not fire together.
        Interval => "interval",
        /// During a daily UTC `window`.
        Window => "window",
    }
}

keyword_enum! {
    /// What lets a held object out of its origin region.
    ReleaseRule {
        /// An operator's release (audited).
        Operator => "operator",
        /// The object's age passing `release_after`.
        Age => "age",
    }
}

/// A whole policy document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[schemars(title = "Meridian policy", deny_unknown_fields)]
pub struct PolicyDocument {
    /// The document format. 1, the only one so far, is assumed when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<Loc<u32>>,
    /// Rules for datasets the policy does not name. Without it, writes to unnamed datasets are
    /// refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<Loc<DatasetRules>>,
    /// One entry per dataset.
    #[serde(default, rename = "dataset")]
    pub datasets: Vec<Loc<DatasetSpec>>,
}

/// One named dataset and its rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct DatasetSpec {
    /// Lowercase letters, digits, `-` and `_`, starting with a letter; at most 64 bytes.
    pub name: Loc<String>,
    #[serde(flatten)]
    pub rules: DatasetRules,
}

/// The rules of one dataset (or of the default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct DatasetRules {
    /// Free text for people; part of the version's hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<Loc<String>>,
    pub locality: Loc<Locality>,
    pub classification: Loc<Classification>,
    /// Default `document`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<Loc<Kind>>,
    /// Regions that accept writes. Required for `global` and `regional`; not allowed for `user`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub home: Option<Loc<RegionList>>,
    /// The only regions the data may ever reach. Default: the home regions for `regional` and
    /// `restricted` data (for `user` + `restricted`, each key's home), every region otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed: Option<Loc<RegionList>>,
    /// Regions holding a read-only copy: a list, or `"all-allowed"`. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirrors: Option<Loc<Mirrors>>,
    /// When and how fast links ship this dataset. Default: continuous, unlimited, no lag budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<Loc<SyncSpec>>,
    /// Required when there are several homes. Default with one home: `lww` for documents,
    /// `crdt` for the other kinds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conflict: Option<Loc<ConflictRule>>,
    /// Read consistency when a request names none. Default `strong`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Loc<Consistency>>,
    /// Required with (and only with) `consistency = "bounded"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_staleness: Option<Loc<Dur>>,
    /// Where writes go when every home is unreachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover: Option<Loc<FailoverSpec>>,
    /// How long old versions and tombstones are kept: a duration or `"forever"` (default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention: Option<Loc<Retention>>,
    /// Holding new objects in their origin region, and purging copies found where they may not be.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<Loc<QuarantineSpec>>,
    /// Required (and the default) for `confidential` and `restricted`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption_at_rest: Option<Loc<bool>>,
}

/// A list of region names.
pub type RegionList = Vec<Loc<String>>;

/// Which regions hold a read-only copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mirrors {
    AllAllowed,
    List(RegionList),
}

impl Serialize for Mirrors {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Mirrors::AllAllowed => s.serialize_str("all-allowed"),
            Mirrors::List(list) => list.serialize(s),
        }
    }
}

impl JsonSchema for Mirrors {
    fn schema_name() -> Cow<'static, str> {
        "Mirrors".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Regions holding a read-only copy: a list of region names, or \"all-allowed\".",
            "anyOf": [
                { "type": "array", "items": { "type": "string" }, "uniqueItems": true },
                { "const": "all-allowed" }
            ]
        })
    }
}

/// When and how fast a dataset's links ship.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct SyncSpec {
    /// Default `continuous`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Loc<SyncMode>>,
    /// Required with `interval`: how often a link ships.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub every: Option<Loc<Dur>>,
    /// With `interval`: each link's fixed shift, below `every`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jitter: Option<Loc<Dur>>,
    /// Required with `window`: `HH:MM-HH:MM`, UTC; may wrap past midnight.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<Loc<Window>>,
    /// Per link, a token bucket in bytes per second, like `5MB/s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<Loc<Rate>>,
    /// The lag budget: adaptive scheduling may defer this dataset up to it, never beyond.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_lag: Option<Loc<Dur>>,
}

/// Where writes go when every home region is unreachable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct FailoverSpec {
    /// Regions in the order they are tried; each must hold a copy (a mirror or another home).
    pub order: Loc<RegionList>,
    /// The recovery point budget: a target is promoted only if its lag is within it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpo: Option<Loc<Dur>>,
}

/// How long old versions and tombstones are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    Forever,
    For(Dur),
}

impl Serialize for Retention {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Retention::Forever => s.serialize_str("forever"),
            Retention::For(d) => s.collect_str(d),
        }
    }
}

impl JsonSchema for Retention {
    fn schema_name() -> Cow<'static, str> {
        "Retention".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A duration such as \"400d\", or \"forever\".",
            "type": "string",
            "pattern": format!("^(forever|{DURATION_PATTERN})$"),
        })
    }
}

/// Quarantine settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct QuarantineSpec {
    /// Hold new objects in the region they were written in until released. Default false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold: Option<Loc<bool>>,
    /// What releases a held object. Default `operator`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release: Option<Loc<ReleaseRule>>,
    /// Required with (and only with) `release = "age"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_after: Option<Loc<Dur>>,
    /// How long a copy found in a forbidden region is kept (quarantined, never served) before it
    /// is purged. Default 24h.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purge_grace: Option<Loc<Dur>>,
}

const DURATION_PATTERN: &str = "([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?";

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for Dur {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A duration: integers with units d, h, m, s, ms, largest first, such as \"1h30m\".",
            "type": "string",
            "pattern": format!("^{DURATION_PATTERN}$"),
            "minLength": 2,
        })
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for Rate {
    fn schema_name() -> Cow<'static, str> {
        "Rate".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Bytes per second, such as \"5MB/s\" or \"512KiB/s\".",
            "type": "string",
            "pattern": "^[0-9]+(\\.[0-9]{1,3})?(B|KB|MB|GB|KiB|MiB|GiB)/s$",
        })
    }
}

impl Serialize for Window {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for Window {
    fn schema_name() -> Cow<'static, str> {
        "Window".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A daily window in UTC, such as \"01:00-05:00\"; it may wrap past midnight.",
            "type": "string",
            "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9]$",
        })
    }
}

/// The JSON Schema of a policy document, as published at `docs/policy.schema.json` and
/// `/v1/policy/schema`.
pub fn json_schema() -> serde_json::Value {
    let schema =
        schemars::generate::SchemaSettings::draft2020_12().into_generator().into_root_schema_for::<PolicyDocument>();
    let mut value = serde_json::to_value(schema).expect("a schema is plain JSON");
    drop_null(&mut value);
    value
}

/// Optional fields are simply left out: neither TOML nor the decoder has a null, so the schema
/// must not offer one (schemars adds it for every `Option`).
fn drop_null(v: &mut serde_json::Value) {
    use serde_json::Value;
    let Value::Object(map) = v else {
        if let Value::Array(items) = v {
            items.iter_mut().for_each(drop_null);
        }
        return;
    };
    if let Some(Value::Array(types)) = map.get_mut("type") {
        types.retain(|t| t != "null");
        if types.len() == 1 {
            let only = types.remove(0);
            map.insert("type".into(), only);
        }
    }
    if let Some(Value::Array(any)) = map.get("anyOf") {
        let rest: Vec<Value> = any.iter().filter(|s| s.get("type") != Some(&Value::from("null"))).cloned().collect();
        if rest.len() == 1 {
            map.remove("anyOf");
            if let Value::Object(inner) = &rest[0] {
                for (k, val) in inner {
                    map.entry(k.clone()).or_insert_with(|| val.clone());
                }
            }
        } else {
            map.insert("anyOf".into(), Value::Array(rest));
        }
    }
    map.values_mut().for_each(drop_null);
}
