//! The `WITH (key = value, ...)` options of sources, sinks and tables.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::{Error, Result};

/// Options with case-insensitive keys, typed getters whose errors name the
/// option and the object it belongs to, and a check for unknown keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    owner: String,
    values: BTreeMap<String, String>,
}

impl Options {
    /// Empty options belonging to `owner` (e.g. "source 'clicks'").
    pub fn new(owner: impl Into<String>) -> Self {
        Options {
            owner: owner.into(),
            values: BTreeMap::new(),
        }
    }

    /// Options from `(key, value)` pairs.
    pub fn from_pairs<K: AsRef<str>, V: Into<String>>(
        owner: impl Into<String>,
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let mut o = Options::new(owner);
        for (k, v) in pairs {
            o.set(k.as_ref(), v);
        }
        o
    }

    /// Who these options belong to, for error messages.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Sets `key` (lower-cased) to `value`.
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        self.values.insert(key.to_ascii_lowercase(), value.into());
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.values.remove(&key.to_ascii_lowercase())
    }

    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values
            .get(&key.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// The value of `key`, or an error naming it when it is missing.
    pub fn require(&self, key: &str) -> Result<&str> {
        self.get(key)
            .ok_or_else(|| Error::plan(format!("{} needs the option '{key}'", self.owner)))
    }

    /// All `(key, value)` pairs, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// `key` parsed as a non-negative integer.
    pub fn get_usize(&self, key: &str) -> Result<Option<usize>> {
        self.parse_with(key, "a non-negative integer", |v| v.parse::<usize>().ok())
    }

    /// `key` parsed as a number.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.parse_with(key, "a number", |v| {
            v.parse::<f64>().ok().filter(|f| f.is_finite())
        })
    }

    /// `key` parsed as a boolean (`true`/`false`).
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.parse_with(key, "true or false", |v| {
            match v.to_ascii_lowercase().as_str() {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            }
        })
    }

    /// `key` parsed as a duration such as `500ms`, `5s`, `2 minutes`.
    pub fn get_duration(&self, key: &str) -> Result<Option<Duration>> {
        self.parse_with(key, "a duration such as '5s' or '100ms'", |v| {
            parse_duration(v).ok()
        })
    }

    /// `key` as one of `allowed` (case-insensitive), lower-cased.
    pub fn get_choice(&self, key: &str, allowed: &[&str]) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                let lower = v.to_ascii_lowercase();
                if allowed.contains(&lower.as_str()) {
                    Ok(Some(lower))
                } else {
                    Err(Error::plan(format!(
                        "{}: option '{key}' is '{v}', expected one of: {}",
                        self.owner,
                        allowed.join(", ")
                    )))
                }
            }
        }
    }

    fn parse_with<T>(
        &self,
        key: &str,
        expected: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => parse(v.trim()).map(Some).ok_or_else(|| {
                Error::plan(format!(
                    "{}: option '{key}' is '{v}', expected {expected}",
                    self.owner
                ))
            }),
        }
    }

    /// Fails naming the first key that is not in `known`.
    pub fn check_known(&self, known: &[&str]) -> Result<()> {
        for k in self.values.keys() {
            if !known.contains(&k.as_str()) {
                return Err(Error::plan(format!(
                    "{}: unknown option '{k}' (known options: {})",
                    self.owner,
                    known.join(", ")
                )));
            }
        }
        Ok(())
    }
}

/// Parses durations such as `250ms`, `5s`, `5 seconds`, `2m`, `1 minute`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let t = text.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || Error::plan(format!("'{text}' is not a duration (try '5s' or '100ms')"));
    let n: f64 = num.parse().map_err(|_| bad())?;
    if !n.is_finite() || n < 0.0 {
        return Err(bad());
    }
    let secs = match unit.trim() {
        "ms" | "millis" | "millisecond" | "milliseconds" => n / 1000.0,
        "" | "s" | "sec" | "secs" | "second" | "seconds" => n,
        "m" | "min" | "mins" | "minute" | "minutes" => n * 60.0,
        "h" | "hour" | "hours" => n * 3600.0,
        "d" | "day" | "days" => n * 86400.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_reject_garbage() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(
            parse_duration("250 ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            parse_duration("2 minutes").unwrap(),
            Duration::from_secs(120)
        );
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("5 fortnights").is_err());
    }

    #[test]
    fn errors_name_the_owner_and_the_option() {
        let o = Options::from_pairs("sink 'out'", [("FORMAT", "xml")]);
        let e = o
            .get_choice("format", &["json", "csv"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sink 'out'") && e.contains("'format'") && e.contains("xml"),
            "{e}"
        );
        let e = o.check_known(&["path"]).unwrap_err().to_string();
        assert!(e.contains("unknown option 'format'"), "{e}");
        assert!(
            o.require("path")
                .unwrap_err()
                .to_string()
                .contains("'path'")
        );
    }
}
