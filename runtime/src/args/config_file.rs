//! The run configuration's sources: a TOML, JSON or YAML file (by extension) and `--name value`
//! overrides, both read into JSON values. Keys given twice and non-finite numbers are refused,
//! naming the file.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A TOML error in one line: where (line and column, from its span) and what (the parser's
/// own message is several lines, with the source line drawn under a caret).
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else { return e.message().trim().to_string() };
    let before = &text.as_bytes()[..span.start.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before.len() - before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {column}: {}", e.message().trim())
}

/// Reads a TOML, JSON or YAML file (by extension) into a JSON object.
pub fn read_config_file(path: &Path) -> Result<Map<String, Value>> {
    let text = crate::files::read_text(path)?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let value: Value = match ext.as_str() {
        "toml" => {
            let table: toml::Table = toml::from_str(&text).map_err(|e| Error::config(path, format!("not valid TOML: {}", toml_error(&text, &e))))?;
            if let Some((key, x)) = non_finite(&table) {
                return Err(Error::config(path, format!("`{key}` = {x}: settings take finite numbers only")));
            }
            serde_json::to_value(table).map_err(|e| Error::config(path, e.to_string()))?
        }
        "json" => {
            crate::files::check_unique_keys(&text, "json").map_err(|e| Error::config(path, format!("not valid JSON: {e}")))?;
            serde_json::from_str(&text).map_err(|e| Error::config(path, format!("not valid JSON: {e}")))?
        }
        "yaml" | "yml" => {
            crate::files::check_unique_keys(&text, "yaml").map_err(|e| Error::config(path, format!("not valid YAML: {e}")))?;
            let v: Value = serde_yaml_ng::from_str(&text).map_err(|e| Error::config(path, format!("not valid YAML: {e}")))?;
            if let Some(key) = null_float(&text, &v) {
                return Err(Error::config(path, format!("`{key}`: settings take finite numbers only")));
            }
            v
        }
        _ => return Err(Error::config(path, "unknown config format: use a .toml, .json, .yaml or .yml file")),
    };
    match value {
        Value::Object(m) => Ok(m),
        Value::Null => Ok(Map::new()),
        _ => Err(Error::config(path, "expected a table of settings at the top level")),
    }
}

/// The first key (dotted path) of a TOML table whose value is a NaN or an infinity.
fn non_finite(table: &toml::Table) -> Option<(String, f64)> {
    fn walk(prefix: &str, v: &toml::Value) -> Option<(String, f64)> {
        match v {
            toml::Value::Float(x) if !x.is_finite() => Some((prefix.to_string(), *x)),
            toml::Value::Table(t) => t.iter().find_map(|(k, v)| walk(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, v)),
            toml::Value::Array(a) => a.iter().enumerate().find_map(|(i, v)| walk(&format!("{prefix}[{i}]"), v)),
            _ => None,
        }
    }
    table.iter().find_map(|(k, v)| walk(k, v))
}

/// YAML's `.nan` and `.inf` become JSON nulls; the first top-level key whose null came from one.
fn null_float(text: &str, v: &Value) -> Option<String> {
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).ok()?;
    let map = yaml.as_mapping()?;
    v.as_object()?.iter().filter(|(_, x)| x.is_null()).find_map(|(k, _)| {
        let f = map.get(k.as_str())?.as_f64()?;
        (!f.is_finite()).then(|| k.clone())
    })
}

/// Parses `--name value` / `--name=value` / `--flag` pairs. A value is read as JSON when it is a
/// number, boolean, null, array or object, and as a string otherwise.
pub fn parse_overrides(args: &[String]) -> Result<Vec<(String, Value)>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let Some(flag) = args[i].strip_prefix("--") else {
            return Err(Error::Invalid(format!("unexpected argument `{}`: settings are given as --name value", args[i])));
        };
        let (key, raw) = match flag.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None if i + 1 < args.len() && !args[i + 1].starts_with("--") => {
                i += 1;
                (flag.to_string(), Some(args[i].clone()))
            }
            None => (flag.to_string(), None),
        };
        let value = match raw {
            None => Value::Bool(true),
            Some(r) => match serde_json::from_str::<Value>(&r) {
                Ok(v @ (Value::Number(_) | Value::Bool(_) | Value::Null | Value::Array(_) | Value::Object(_))) => v,
                _ => Value::String(r),
            },
        };
        out.push((key, value));
        i += 1;
    }
    Ok(out)
}
