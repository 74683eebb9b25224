//! Policy text → a located tree: every table, list and scalar with the line and column it came
//! from, whether the text was TOML or YAML.
//!
//! The typed decoder (`decode.rs`) walks this tree instead of using serde's derive directly,
//! because serde stops at the first problem and the validator must report every problem at once,
//! each with its position. This module knows nothing about what a policy means.

use std::fmt;

use crate::diagnostic::{Diagnostic, Rule};
use crate::limits::{POLICY_BYTES_MAX, POLICY_DEPTH_MAX};

/// The text format of a policy document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Toml,
    Yaml,
}

impl Format {
    /// TOML unless the file name ends in `.yaml` or `.yml`.
    pub fn from_file_name(name: &str) -> Format {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".yaml") || lower.ends_with(".yml") {
            Format::Yaml
        } else {
            Format::Toml
        }
    }
}

/// A 1-based line and column (in characters) in the source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    pub line: u32,
    pub column: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Table(Vec<Entry>),
    List(Vec<Node>),
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// A value of a type the policy never uses (a TOML datetime, a YAML null); named for errors.
    Other(&'static str),
}

impl Value {
    /// What the value is, for "expected X, found Y" messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Table(_) => "a table",
            Value::List(_) => "a list",
            Value::Str(_) => "a string",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a boolean",
            Value::Other(what) => what,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub key_pos: Pos,
    pub value: Node,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

/// Parses `text` into a located tree. A syntax error, an oversized document or one nested too
/// deeply is one diagnostic; nothing past a syntax error can be trusted, so there is no more.
pub fn parse(text: &str, format: Format) -> Result<Node, Diagnostic> {
    if text.len() > POLICY_BYTES_MAX {
        return Err(Diagnostic::new(
            None,
            Rule::DocumentTooLarge,
            format!("the document is {} bytes; the limit is {POLICY_BYTES_MAX}", text.len()),
        )
        .hint("split rarely changed datasets under a `[default]` rule, or shorten descriptions"));
    }
    let node = match format {
        Format::Toml => parse_toml(text)?,
        Format::Yaml => parse_yaml(text)?,
    };
    let depth = depth_of(&node);
    if depth > POLICY_DEPTH_MAX {
        return Err(Diagnostic::new(
            Some(node.pos),
            Rule::DocumentTooDeep,
            format!("the document nests {depth} levels deep; a policy never needs more than {POLICY_DEPTH_MAX}"),
        ));
    }
    Ok(node)
}

fn depth_of(node: &Node) -> usize {
    match &node.value {
        Value::Table(entries) => 1 + entries.iter().map(|e| depth_of(&e.value)).max().unwrap_or(0),
        Value::List(items) => 1 + items.iter().map(depth_of).max().unwrap_or(0),
        _ => 1,
    }
}

/// Byte offset → (line, column), both 1-based, columns counted in characters.
struct LineIndex<'a> {
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    fn new(text: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { text, line_starts }
    }

    fn pos(&self, offset: usize) -> Pos {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&start| start <= offset) - 1;
        let start = self.line_starts[line];
        let column = self.text.get(start..offset).map_or(offset - start, |s| s.chars().count());
        Pos { line: line as u32 + 1, column: column as u32 + 1 }
    }
}

fn parse_toml(text: &str) -> Result<Node, Diagnostic> {
    use toml::de::{DeTable, DeValue};
    let index = LineIndex::new(text);
    let root = DeTable::parse(text).map_err(|e| {
        let pos = e.span().map(|s| index.pos(s.start));
        Diagnostic::new(pos, Rule::Syntax, format!("TOML: {}", e.message().trim_end()))
    })?;

    fn table(index: &LineIndex<'_>, t: &DeTable<'_>) -> Value {
        let mut entries: Vec<(usize, Entry)> = t
            .iter()
            .map(|(k, v)| {
                let start = k.span().start;
                let entry = Entry {
                    key: k.get_ref().to_string(),
                    key_pos: index.pos(start),
                    value: node(index, v.get_ref(), v.span().start),
                };
                (start, entry)
            })
            .collect();
        // The parser's map is sorted by key; the document's order reads better in reports.
        entries.sort_by_key(|(start, _)| *start);
        Value::Table(entries.into_iter().map(|(_, e)| e).collect())
    }

    fn node(index: &LineIndex<'_>, v: &DeValue<'_>, start: usize) -> Node {
        let value = match v {
            DeValue::String(s) => Value::Str(s.to_string()),
            DeValue::Integer(i) => {
                let digits: String = i.as_str().chars().filter(|c| *c != '_').collect();
                let (sign, body) = match digits.strip_prefix('-') {
                    Some(rest) => (-1i64, rest.to_string()),
                    None => (1, digits.trim_start_matches('+').to_string()),
                };
                let body = match i.radix() {
                    16 => body.trim_start_matches("0x").to_string(),
                    8 => body.trim_start_matches("0o").to_string(),
                    2 => body.trim_start_matches("0b").to_string(),
                    _ => body,
                };
                match i64::from_str_radix(&body, i.radix()) {
                    Ok(n) => Value::Int(sign * n),
                    Err(_) => Value::Other("an integer out of range"),
                }
            }
            DeValue::Float(f) => match f.as_str().replace('_', "").parse::<f64>() {
                Ok(x) => Value::Float(x),
                Err(_) => Value::Other("a float"),
            },
            DeValue::Boolean(b) => Value::Bool(*b),
            DeValue::Datetime(_) => Value::Other("a datetime"),
            DeValue::Array(items) => {
                Value::List(items.iter().map(|item| node(index, item.get_ref(), item.span().start)).collect())
            }
            DeValue::Table(t) => table(index, t),
        };
        Node { pos: index.pos(start), value }
    }

    Ok(Node { pos: index.pos(root.span().start), value: table(&index, root.get_ref()) })
}

/// A YAML node as serde-saphyr hands it over; converted to [`Node`] right after.
enum YamlNode {
    Map(Vec<(serde_saphyr::Spanned<String>, serde_saphyr::Spanned<YamlNode>)>),
    Seq(Vec<serde_saphyr::Spanned<YamlNode>>),
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Null,
}

impl<'de> serde::Deserialize<'de> for YamlNode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = YamlNode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a YAML value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<YamlNode, E> {
                Ok(YamlNode::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<YamlNode, E> {
                Ok(YamlNode::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<YamlNode, E> {
                i64::try_from(v).map(YamlNode::Int).map_err(|_| E::custom("integer out of range"))
            }
            fn visit_f64<E>(self, v: f64) -> Result<YamlNode, E> {
                Ok(YamlNode::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<YamlNode, E> {
                Ok(YamlNode::Str(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<YamlNode, E> {
                Ok(YamlNode::Str(v))
            }
            fn visit_unit<E>(self) -> Result<YamlNode, E> {
                Ok(YamlNode::Null)
            }
            fn visit_none<E>(self) -> Result<YamlNode, E> {
                Ok(YamlNode::Null)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<YamlNode, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(YamlNode::Seq(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<YamlNode, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key()? {
                    entries.push((key, map.next_value()?));
                }
                Ok(YamlNode::Map(entries))
            }
        }
        d.deserialize_any(V)
    }
}

fn parse_yaml(text: &str) -> Result<Node, Diagnostic> {
    fn pos(loc: &serde_saphyr::Location) -> Pos {
        Pos { line: loc.line() as u32, column: loc.column() as u32 }
    }
    fn convert(n: serde_saphyr::Spanned<YamlNode>) -> Node {
        let at = pos(&n.referenced);
        let value = match n.value {
            YamlNode::Map(entries) => Value::Table(
                entries
                    .into_iter()
                    .map(|(k, v)| Entry { key_pos: pos(&k.referenced), key: k.value, value: convert(v) })
                    .collect(),
            ),
            YamlNode::Seq(items) => Value::List(items.into_iter().map(convert).collect()),
            YamlNode::Str(s) => Value::Str(s),
            YamlNode::Int(i) => Value::Int(i),
            YamlNode::Float(x) => Value::Float(x),
            YamlNode::Bool(b) => Value::Bool(b),
            YamlNode::Null => Value::Other("null"),
        };
        Node { pos: at, value }
    }
    let root: serde_saphyr::Spanned<YamlNode> = serde_saphyr::from_str(text).map_err(|e| {
        let at = e.location().map(|l| pos(&l));
        let message = e.to_string();
        let mut first_line = message.lines().next().unwrap_or("invalid YAML").trim();
        // The position is reported in its own place; drop the parser's copy of it.
        first_line = first_line.strip_prefix("error: ").unwrap_or(first_line);
        if first_line.starts_with("line ") {
            if let Some(i) = first_line.find(": ") {
                first_line = &first_line[i + 2..];
            }
        }
        Diagnostic::new(at, Rule::Syntax, format!("YAML: {first_line}"))
    })?;
    let mut node = convert(root);
    // An empty YAML document is an empty policy, as an empty TOML file is.
    if node.value == Value::Other("null") {
        node.value = Value::Table(Vec::new());
        node.pos = Pos { line: 1, column: 1 };
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(node: &Node) -> Vec<(String, Pos)> {
        match &node.value {
            Value::Table(entries) => entries.iter().map(|e| (e.key.clone(), e.key_pos)).collect(),
            other => panic!("not a table: {other:?}"),
        }
    }

    #[test]
    fn toml_positions_are_one_based_and_in_document_order() {
        let text = "b = 1\n[[dataset]]\nname = \"x\"\n  zz = [\"é\", \"y\"]\n";
        let root = parse(text, Format::Toml).unwrap();
        let top = keys(&root);
        assert_eq!(top[0], ("b".into(), Pos { line: 1, column: 1 }));
        assert_eq!(top[1].0, "dataset");
        let Value::Table(entries) = &root.value else { unreachable!() };
        let Value::List(items) = &entries[1].value.value else { panic!() };
        let ds = keys(&items[0]);
        assert_eq!(ds, vec![("name".into(), Pos { line: 3, column: 1 }), ("zz".into(), Pos { line: 4, column: 3 })]);
        let Value::Table(fields) = &items[0].value else { unreachable!() };
        let Value::List(list) = &fields[1].value.value else { panic!() };
        assert_eq!(list[1].pos, Pos { line: 4, column: 14 }, "columns count characters, not bytes");
    }

    #[test]
    fn yaml_gives_the_same_tree_shape_with_positions() {
        let text = "b: 1\ndataset:\n  - name: x\n    zz: [a, 2]\n";
        let root = parse(text, Format::Yaml).unwrap();
        assert_eq!(keys(&root)[0], ("b".into(), Pos { line: 1, column: 1 }));
        let Value::Table(entries) = &root.value else { unreachable!() };
        let Value::List(items) = &entries[1].value.value else { panic!() };
        assert_eq!(keys(&items[0])[1], ("zz".into(), Pos { line: 4, column: 5 }));
        let Value::Table(fields) = &items[0].value else { unreachable!() };
        assert_eq!(
            fields[1].value.value,
            Value::List(vec![
                Node { pos: Pos { line: 4, column: 10 }, value: Value::Str("a".into()) },
                Node { pos: Pos { line: 4, column: 13 }, value: Value::Int(2) },
            ])
        );
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        let err = parse("a = \n", Format::Toml).unwrap_err();
        assert_eq!(err.rule, Rule::Syntax);
        assert_eq!(err.pos.map(|p| p.line), Some(1));
        let err = parse("a: [1, 2\nb: 3\n", Format::Yaml).unwrap_err();
        assert_eq!(err.rule, Rule::Syntax);
        assert!(err.pos.is_some());
    }

    #[test]
    fn empty_documents_are_empty_tables() {
        assert_eq!(parse("", Format::Toml).unwrap().value, Value::Table(vec![]));
        assert_eq!(parse("", Format::Yaml).unwrap().value, Value::Table(vec![]));
    }

    #[test]
    fn oversized_and_deep_documents_are_refused_before_use() {
        let big = format!("a = \"{}\"\n", "x".repeat(POLICY_BYTES_MAX));
        assert_eq!(parse(&big, Format::Toml).unwrap_err().rule, Rule::DocumentTooLarge);
        let deep = format!("a = {}{}\n", "[".repeat(40), "]".repeat(40));
        assert_eq!(parse(&deep, Format::Toml).unwrap_err().rule, Rule::DocumentTooDeep);
    }
}
