//! What the validator says: one [`Diagnostic`] per problem, each with a position, the rule broken
//! (a stable code, listed in docs/policy.md) and a hint for the fix.

use std::fmt;

use serde::Serialize;

use crate::source::Pos;

macro_rules! rules {
    ($($variant:ident => $code:literal,)*) => {
        /// A rule a policy document can break. The codes are a stable contract: scripts and the
        /// API match on them, docs/policy.md lists them.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Rule { $($variant,)* }

        impl Rule {
            pub const ALL: &'static [Rule] = &[$(Rule::$variant,)*];

            pub fn code(self) -> &'static str {
                match self { $(Rule::$variant => $code,)* }
            }
        }
    };
}

rules! {
    Syntax => "syntax",
    DocumentTooLarge => "document_too_large",
    DocumentTooDeep => "document_too_deep",
    UnsupportedFormat => "unsupported_format",
    UnknownField => "unknown_field",
    WrongType => "wrong_type",
    MissingField => "missing_field",
    InvalidValue => "invalid_value",
    InvalidName => "invalid_name",
    DuplicateDataset => "duplicate_dataset",
    DuplicateRegion => "duplicate_region",
    TooMany => "too_many",
    BadDuration => "bad_duration",
    BadRate => "bad_rate",
    BadWindow => "bad_window",
    UnknownRegion => "unknown_region",
    HomeRequired => "home_required",
    HomeOnUserLocality => "home_on_user_locality",
    HomeNotAllowed => "home_not_allowed",
    MirrorNotAllowed => "mirror_not_allowed",
    MirrorIsHome => "mirror_is_home",
    FailoverNotAllowed => "failover_not_allowed",
    FailoverWithoutCopy => "failover_without_copy",
    FailoverEmpty => "failover_empty",
    RestrictedSingleHome => "restricted_single_home",
    RestrictedMirrors => "restricted_mirrors",
    EncryptionRequired => "encryption_required",
    ConflictRequired => "conflict_required",
    ConflictKindMismatch => "conflict_kind_mismatch",
    SyncFieldForMode => "sync_field_for_mode",
    SyncFieldRequired => "sync_field_required",
    JitterTooLarge => "jitter_too_large",
    MaxLagUnreachable => "max_lag_unreachable",
    StalenessWithoutBounded => "staleness_without_bounded",
    StalenessRequired => "staleness_required",
    ReleaseAfterMismatch => "release_after_mismatch",
    NoDatasets => "no_datasets",
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.code())
    }
}

/// One problem in a policy document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// Where the problem is; `None` only for problems of the whole document (its size).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub pos: Option<Pos>,
    pub rule: Rule,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Serialize for Pos {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Pos", 2)?;
        st.serialize_field("line", &self.line)?;
        st.serialize_field("column", &self.column)?;
        st.end()
    }
}

impl Diagnostic {
    pub fn new(pos: Option<Pos>, rule: Rule, message: impl Into<String>) -> Self {
        Diagnostic { pos, rule, message: message.into(), hint: None }
    }

    pub fn at(pos: Pos, rule: Rule, message: impl Into<String>) -> Self {
        Self::new(Some(pos), rule, message)
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// Every problem found in one document, sorted by position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The name the document is reported under (its file name, or `<request>`).
    pub file: String,
    pub diagnostics: Vec<Diagnostic>,
}

impl Report {
    pub fn new(file: impl Into<String>, mut diagnostics: Vec<Diagnostic>) -> Self {
        diagnostics.sort_by(|a, b| (a.pos, a.rule, &a.message).cmp(&(b.pos, b.rule, &b.message)));
        diagnostics.dedup();
        Report { file: file.into(), diagnostics }
    }
}

impl fmt::Display for Report {
    /// `file:line:column: error[rule]: message`, then an indented hint line: the shape compilers
    /// use, so editors can jump to each problem.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.diagnostics {
            match d.pos {
                Some(p) => write!(f, "{}:{}:{}: ", self.file, p.line, p.column)?,
                None => write!(f, "{}: ", self.file)?,
            }
            writeln!(f, "error[{}]: {}", d.rule, d.message)?;
            if let Some(hint) = &d.hint {
                writeln!(f, "    hint: {hint}")?;
            }
        }
        let n = self.diagnostics.len();
        write!(f, "{n} problem{} found", if n == 1 { "" } else { "s" })
    }
}

impl std::error::Error for Report {}

/// The candidate closest to `input` by edit distance, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(input: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let input_lower = input.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|c| (edit_distance(&input_lower, c), c))
        .filter(|(d, c)| *d <= (c.len().max(input.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance over characters, with adjacent transpositions counted as one edit.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev2: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                cur[j] = cur[j].min(prev2[j - 2] + 1);
            }
        }
        prev2 = std::mem::replace(&mut prev, cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case() {
        let mut seen = std::collections::BTreeSet::new();
        for r in Rule::ALL {
            assert!(r.code().bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{r:?}");
            assert!(seen.insert(r.code()), "duplicate code {}", r.code());
        }
    }

    #[test]
    fn suggestions_catch_typos_and_ignore_strangers() {
        let fields = ["name", "locality", "classification", "mirrors", "allowed"];
        assert_eq!(did_you_mean("mirros", fields), Some("mirrors"));
        assert_eq!(did_you_mean("clasification", fields), Some("classification"));
        assert_eq!(did_you_mean("Locality", fields), Some("locality"));
        assert_eq!(did_you_mean("alowed", fields), Some("allowed"));
        assert_eq!(did_you_mean("colour", fields), None);
        assert_eq!(edit_distance("ab", "ba"), 1);
    }

    #[test]
    fn report_renders_like_a_compiler() {
        let r = Report::new(
            "p.toml",
            vec![
                Diagnostic::at(Pos { line: 3, column: 1 }, Rule::UnknownField, "b").hint("h"),
                Diagnostic::at(Pos { line: 1, column: 2 }, Rule::WrongType, "a"),
            ],
        );
        assert_eq!(
            r.to_string(),
            "p.toml:1:2: error[wrong_type]: a\np.toml:3:1: error[unknown_field]: b\n    hint: h\n2 problems found"
        );
    }
}
