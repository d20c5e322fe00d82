//! Where `TRELLIS_*` settings come from: the process environment, or a map in tests.

use std::collections::BTreeMap;

use crate::error::ConfigError;

const PREFIX: &str = "TRELLIS_";
/// Separates nesting levels in a variable name (`TRELLIS_INBOUND__LISTEN`).
const LEVEL: &str = "__";

/// A source of environment variables; tests pass a [`MapEnv`] instead of mutating the process.
pub trait EnvSource {
    fn vars(&self) -> Vec<(String, String)>;
}

/// The real process environment.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect()
    }
}

/// A fixed set of variables.
#[derive(Debug, Default, Clone)]
pub struct MapEnv(pub BTreeMap<String, String>);

impl<const N: usize> From<[(&str, &str); N]> for MapEnv {
    fn from(pairs: [(&str, &str); N]) -> Self {
        MapEnv(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }
}

impl EnvSource for MapEnv {
    fn vars(&self) -> Vec<(String, String)> {
        self.0.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Writes every `TRELLIS_*` variable into `table` (overriding what the file said).
/// `TRELLIS_CONFIG` and `TRELLIS_LOG` belong to the command line, not the config, and are skipped.
pub fn overlay(table: &mut toml::Table, env: &dyn EnvSource) -> Result<(), ConfigError> {
    for (name, raw) in env.vars() {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        if matches!(rest, "CONFIG" | "LOG" | "REQUIRE_TOOLS") {
            continue;
        }
        let path: Vec<String> = rest.split(LEVEL).map(str::to_ascii_lowercase).collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Invalid {
                key: name,
                problem: "empty key segment".into(),
            });
        }
        let value = parse_value(&raw);
        insert(table, &path, value).map_err(|problem| ConfigError::Invalid {
            key: name.clone(),
            problem,
        })?;
    }
    Ok(())
}

/// A TOML value when the text is one (`4`, `true`, `[...]`, `{...}`), else the text as a string.
fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn insert(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    match path {
        [] => Err("empty key".into()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [head, rest @ ..] => {
            let entry = table
                .entry(head.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => insert(t, rest, value),
                _ => Err(format!("`{head}` is not a table")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_typed_when_they_parse() {
        assert_eq!(parse_value("4"), toml::Value::Integer(4));
        assert_eq!(parse_value("true"), toml::Value::Boolean(true));
        assert_eq!(
            parse_value("127.0.0.1:80"),
            toml::Value::String("127.0.0.1:80".into())
        );
        assert!(matches!(parse_value("[1,2]"), toml::Value::Array(_)));
    }

    #[test]
    fn nested_keys() {
        let mut t = toml::Table::new();
        let env = MapEnv::from([
            ("TRELLIS_A__B", "x"),
            ("OTHER", "y"),
            ("TRELLIS_CONFIG", "/x"),
        ]);
        overlay(&mut t, &env).unwrap();
        assert_eq!(t["a"]["b"].as_str(), Some("x"));
        assert_eq!(t.len(), 1);
    }
}
