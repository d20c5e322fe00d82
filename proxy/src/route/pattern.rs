//! ALB wildcard patterns: `*` matches zero or more characters (including `/`), `?` exactly one.
//!
//! Path patterns compare case-sensitively; host, header and query patterns case-insensitively
//! (ASCII), as ALB does. Matching borrows the input and never allocates.

use std::fmt;
use std::str::FromStr;

/// Longest pattern accepted, as ALB's 128-character limit.
pub const MAX_PATTERN_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PatternError {
    #[error("pattern is empty")]
    Empty,
    #[error("pattern is longer than {MAX_PATTERN_LEN} characters")]
    TooLong,
    #[error("path pattern must start with '/' or '*'")]
    NotAbsolute,
    #[error("character {0:?} is not allowed in this pattern")]
    BadChar(char),
    #[error("regular expression is longer than {MAX_REGEX_LEN} characters")]
    RegexTooLong,
    #[error("bad regular expression: {0}")]
    Regex(String),
}

/// Whether a pattern compares letters exactly or ignoring ASCII case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    Sensitive,
    Insensitive,
}

/// A compiled wildcard pattern. For case-insensitive patterns the text is stored lowercased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wildcard {
    text: Box<str>,
    case: Case,
    /// Byte length of the wildcard-free prefix.
    literal_prefix: usize,
    has_wildcard: bool,
    /// The only wildcard is a final `*` (`/api/*`, ALB's usual form): a prefix compare.
    prefix_star: bool,
}

impl Wildcard {
    /// Any text up to [`MAX_PATTERN_LEN`] without control characters.
    pub fn new(text: &str, case: Case) -> Result<Self, PatternError> {
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        if text.len() > MAX_PATTERN_LEN {
            return Err(PatternError::TooLong);
        }
        if let Some(c) = text.chars().find(|c| c.is_control()) {
            return Err(PatternError::BadChar(c));
        }
        let text: Box<str> = match case {
            Case::Sensitive => text.into(),
            Case::Insensitive => text.to_ascii_lowercase().into(),
        };
        let literal_prefix = text.find(['*', '?']).unwrap_or(text.len());
        Ok(Self {
            has_wildcard: literal_prefix < text.len(),
            prefix_star: literal_prefix + 1 == text.len() && text.ends_with('*'),
            literal_prefix,
            text,
            case,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The part before the first wildcard.
    pub fn literal_prefix(&self) -> &str {
        &self.text[..self.literal_prefix]
    }

    pub fn has_wildcard(&self) -> bool {
        self.has_wildcard
    }

    pub fn matches(&self, input: &str) -> bool {
        let (p, s) = (self.text.as_bytes(), input.as_bytes());
        if !self.has_wildcard {
            return match self.case {
                Case::Sensitive => p == s,
                Case::Insensitive => p.eq_ignore_ascii_case(s),
            };
        }
        if self.prefix_star {
            let Some(head) = s.get(..self.literal_prefix) else {
                return false;
            };
            let literal = &p[..self.literal_prefix];
            return match self.case {
                Case::Sensitive => head == literal,
                // The pattern is stored lower-case.
                Case::Insensitive => head.eq_ignore_ascii_case(literal),
            };
        }
        glob(p, s, self.case)
    }
}

impl fmt::Display for Wildcard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A `path-pattern` value: case-sensitive, starts with `/` (or `*`), ALB's character set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern(Wildcard);

impl PathPattern {
    pub fn wildcard(&self) -> &Wildcard {
        &self.0
    }

    pub fn matches(&self, path: &str) -> bool {
        self.0.matches(path)
    }

    /// The first path segment when it is a plain literal (`/api/*` → `api`, `/api` → `api`):
    /// every path this pattern matches then has exactly that first segment. The rule index
    /// buckets on it.
    pub fn literal_first_segment(&self) -> Option<&str> {
        let rest = self.0.as_str().strip_prefix('/')?;
        let end = rest.find('/').unwrap_or(rest.len());
        let seg = &rest[..end];
        if seg.contains(['*', '?']) {
            return None;
        }
        // `/api` followed by end, or `/api/...`: both pin the first segment.
        Some(seg)
    }
}

impl FromStr for PathPattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !(s.starts_with('/') || s.starts_with('*')) {
            return Err(if s.is_empty() {
                PatternError::Empty
            } else {
                PatternError::NotAbsolute
            });
        }
        // ALB: A-Z a-z 0-9 _ - . $ / ~ " ' @ : + & * ?  (plus % and = for encoded paths).
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "_-.$/~\"'@:+&*?%=,;!()".contains(*c)))
        {
            return Err(PatternError::BadChar(c));
        }
        Wildcard::new(s, Case::Sensitive).map(Self)
    }
}

/// A `host-header` value: case-insensitive, letters, digits, `-`, `.`, `*`, `?`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern(Wildcard);

impl HostPattern {
    pub fn wildcard(&self) -> &Wildcard {
        &self.0
    }

    /// `host` may carry a `:port`, which is ignored.
    pub fn matches(&self, host: &str) -> bool {
        self.0.matches(strip_port(host))
    }
}

impl FromStr for HostPattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "-.*?_".contains(*c)))
        {
            return Err(PatternError::BadChar(c));
        }
        Wildcard::new(s, Case::Insensitive).map(Self)
    }
}

pub use trellis_core::route_spec::MAX_REGEX_LEN;

/// A regular expression that must match the whole input (Envoy `safe_regex`, App Mesh `regex`).
/// RE2 semantics from the `regex` crate: linear time in the input, no backtracking blow-up.
#[derive(Debug, Clone)]
pub struct RegexPattern {
    re: regex::Regex,
    /// As written, for display and equality.
    text: Box<str>,
}

impl RegexPattern {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whole-input match; no allocation on the match path.
    pub fn matches(&self, input: &str) -> bool {
        self.re.is_match(input)
    }
}

impl PartialEq for RegexPattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}
impl Eq for RegexPattern {}

impl FromStr for RegexPattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use trellis_core::route_spec::{RegexError, whole_match_regex};
        let re = whole_match_regex(s).map_err(|e| match e {
            RegexError::Empty => PatternError::Empty,
            RegexError::TooLong => PatternError::RegexTooLong,
            RegexError::Bad(m) => PatternError::Regex(m),
        })?;
        Ok(Self { re, text: s.into() })
    }
}

impl fmt::Display for RegexPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

/// Iterative glob with single-star backtracking: linear for typical patterns, no allocation.
fn glob(p: &[u8], s: &[u8], case: Case) -> bool {
    let eq = |a: u8, b: u8| match case {
        Case::Sensitive => a == b,
        Case::Insensitive => a == b.to_ascii_lowercase(),
    };
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(b'?') => {
                // `?` is one character, not one byte.
                pi += 1;
                si += utf8_len(s[si]);
            }
            Some(&c) if eq(c, s[si]) => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    let next = ss + utf8_len(s[ss]);
                    star = Some((sp, next));
                    si = next;
                }
                None => return false,
            },
        }
    }
    if si > s.len() {
        return false;
    }
    p[pi..].iter().all(|&c| c == b'*')
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xff => 4,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> PathPattern {
        p.parse().unwrap()
    }

    /// A pattern whose only wildcard is a final `*` is matched by a prefix compare: it must
    /// agree with the general matcher everywhere.
    #[test]
    fn trailing_star_prefix_compare_agrees_with_glob() {
        let inputs = [
            "",
            "/",
            "/a",
            "/api",
            "/api/",
            "/api/x",
            "/API/x",
            "/apix",
            "/ap",
            "/api/é/*",
            "é",
        ];
        for case in [Case::Sensitive, Case::Insensitive] {
            for pat in ["*", "/*", "/api/*", "/api*", "/API/*", "/é*"] {
                let w = Wildcard::new(pat, case).unwrap();
                assert!(w.prefix_star, "{pat}");
                for input in inputs {
                    assert_eq!(
                        w.matches(input),
                        glob(w.text.as_bytes(), input.as_bytes(), case),
                        "{pat:?} {input:?} {case:?}"
                    );
                }
            }
            for pat in ["/api", "/a*b", "/*/x", "/a?*", "/**"] {
                assert!(!Wildcard::new(pat, case).unwrap().prefix_star, "{pat}");
            }
        }
    }

    /// ALB path-pattern semantics as a table: (pattern, path, matches).
    #[test]
    fn path_pattern_table() {
        let table: &[(&str, &str, bool)] = &[
            ("/img/*", "/img/a.png", true),
            ("/img/*", "/img/", true),
            ("/img/*", "/img", false),
            ("/img/*", "/IMG/a.png", false),       // case-sensitive
            ("/img/*", "/img/deep/x/y.png", true), // * crosses '/'
            ("/img/*.png", "/img/deep/a.png", true),
            ("/img/*.png", "/img/a.jpg", false),
            ("/a?c", "/abc", true),
            ("/a?c", "/ac", false),
            ("/a?c", "/abbc", false),
            ("/a?c", "/aéc", true), // ? is one character
            ("/api", "/api", true),
            ("/api", "/api/", false),
            ("/api", "/Api", false),
            ("*", "/anything/at/all", true),
            ("/*/edit", "/users/edit", true),
            ("/*/edit", "/users/7/edit", true),
            ("/*/edit", "/users/7/editx", false),
            ("/a*b*c", "/axxbyyc", true),
            ("/a*b*c", "/axxbyy", false),
            ("/**", "/", true),
            ("/v?/*", "/v1/x", true),
            ("/v?/*", "/v10/x", false),
        ];
        for (pat, input, want) in table {
            assert_eq!(path(pat).matches(input), *want, "{pat} vs {input}");
        }
    }

    #[test]
    fn host_pattern_table() {
        let table: &[(&str, &str, bool)] = &[
            ("example.com", "example.com", true),
            ("example.com", "EXAMPLE.com", true), // case-insensitive
            ("Example.COM", "example.com", true),
            ("example.com", "example.com:8080", true), // port ignored
            ("*.example.com", "api.example.com", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "a.b.example.com", true),
            ("api-?.example.com", "api-1.example.com", true),
            ("api-?.example.com", "api-12.example.com", false),
        ];
        for (pat, input, want) in table {
            let p: HostPattern = pat.parse().unwrap();
            assert_eq!(p.matches(input), *want, "{pat} vs {input}");
        }
    }

    #[test]
    fn bad_patterns_are_rejected() {
        assert_eq!("".parse::<PathPattern>(), Err(PatternError::Empty));
        assert_eq!(
            "api/*".parse::<PathPattern>(),
            Err(PatternError::NotAbsolute)
        );
        assert_eq!(
            "/a b".parse::<PathPattern>(),
            Err(PatternError::BadChar(' '))
        );
        assert_eq!(
            format!("/{}", "a".repeat(200)).parse::<PathPattern>(),
            Err(PatternError::TooLong)
        );
        assert!("exa mple.com".parse::<HostPattern>().is_err());
    }

    #[test]
    fn literal_first_segment() {
        assert_eq!(path("/api/*").literal_first_segment(), Some("api"));
        assert_eq!(path("/api").literal_first_segment(), Some("api"));
        assert_eq!(path("/api*").literal_first_segment(), None);
        assert_eq!(path("/a?i/x").literal_first_segment(), None);
        assert_eq!(path("*").literal_first_segment(), None);
        assert_eq!(path("/").literal_first_segment(), Some(""));
    }

    #[test]
    fn regex_matches_the_whole_input() {
        let r: RegexPattern = r"/users/\d+".parse().unwrap();
        assert!(r.matches("/users/42"));
        assert!(!r.matches("/users/42/edit"), "anchored at the end");
        assert!(!r.matches("/v1/users/42"), "anchored at the start");
        let alt: RegexPattern = "/a|/b".parse().unwrap();
        assert!(alt.matches("/b") && !alt.matches("/ab"));
        assert!(matches!(
            "/(".parse::<RegexPattern>(),
            Err(PatternError::Regex(_))
        ));
        assert_eq!("".parse::<RegexPattern>(), Err(PatternError::Empty));
        assert_eq!(
            "a".repeat(2000).parse::<RegexPattern>(),
            Err(PatternError::RegexTooLong)
        );
        assert!(matches!(
            "(a{1000}){1000}".parse::<RegexPattern>(),
            Err(PatternError::Regex(_))
        ));
    }

    #[test]
    fn strip_port_forms() {
        assert_eq!(strip_port("a.com:80"), "a.com");
        assert_eq!(strip_port("a.com"), "a.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }
}
