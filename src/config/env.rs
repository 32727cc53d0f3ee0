//! `${VAR}` substitution. It runs on the parsed TOML tree, before the raw layer is read,
//! so a variable can stand in any string of any section; it is its own module because
//! it knows no section, only how errors name a key. Errors never quote the string, which
//! may be a secret.

use super::{invalid, valid_name, ConfigError};

/// How errors name an element of `[[remote]]` or `[[replication]]`: by its name when it
/// has a usable one, else by index.
fn element_label(kind: &str, index: usize, name: Option<&str>) -> String {
    match name {
        Some(name) if valid_name(name) => format!("{kind} \"{name}\""),
        _ => format!("{kind}[{index}]"),
    }
}

pub(super) fn substitute_root(
    table: &mut toml::Table,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    for (key, value) in table.iter_mut() {
        match value {
            toml::Value::Array(items) if key == "remote" || key == "replication" => {
                for (i, item) in items.iter_mut().enumerate() {
                    let toml::Value::Table(element) = item else {
                        substitute_value(item, &format!("{key}[{i}]"), env)?;
                        continue;
                    };
                    let name = element.get("name").and_then(|n| n.as_str());
                    let label = element_label(key, i, name);
                    for (field, value) in element.iter_mut() {
                        substitute_value(value, &format!("{label}: {field}"), env)?;
                    }
                }
            }
            _ => substitute_value(value, key, env)?,
        }
    }
    Ok(())
}

fn substitute_value(
    value: &mut toml::Value,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) if s.contains('$') => {
            *s = substitute(s, key, env)?;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute_value(item, &format!("{key}[{i}]"), env)?;
            }
        }
        toml::Value::Table(table) => {
            for (k, item) in table.iter_mut() {
                substitute_value(item, &format!("{key}.{k}"), env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Replaces `${VAR}` with the variable's value and `$$` with `$`; any other `$` is kept.
/// Errors never quote the string, which may be a secret.
fn substitute(
    s: &str,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let Some(end) = tail.find('}') else {
                return Err(invalid(
                    key,
                    "unterminated \"${\" (write \"$${\" for a literal \"${\")",
                ));
            };
            let var = &tail[..end];
            let well_formed = var.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !well_formed {
                return Err(invalid(
                    key,
                    "\"${...}\" must hold an environment variable name (letters, digits, _)",
                ));
            }
            match env(var) {
                Some(value) => out.push_str(&value),
                None => {
                    return Err(ConfigError::EnvNotSet {
                        key: key.to_string(),
                        var: var.to_string(),
                    })
                }
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}
