//! Validation helpers shared by the format modules: JSON paths, type checks that record a
//! [`FieldError`] and carry on, so a validator reports every bad field in one pass.

use serde_json::{Map, Value};

use super::canonical::Timestamp;
use super::FieldError;

/// Path of the whole body in a [`FieldError`].
pub(crate) const ROOT: &str = "$";

/// `parent.key`, or `parent["key"]` when the key is not a plain identifier.
pub(crate) fn key_path(parent: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    // Very long keys (a metadata key over its limit) would make the path unreadable.
    let shown = if key.chars().count() > 64 {
        let mut s: String = key.chars().take(61).collect();
        s.push_str("...");
        s
    } else {
        key.to_string()
    };
    let segment = if plain {
        shown
    } else {
        Value::String(shown).to_string()
    };
    match (parent, plain) {
        ("" | ROOT, true) => segment,
        ("" | ROOT, false) => format!("[{segment}]"),
        (_, true) => format!("{parent}.{segment}"),
        (_, false) => format!("{parent}[{segment}]"),
    }
}

/// A member that is present and not null (optional fields accept `null` as "absent": the
/// PromptLayer Python SDK sends every field, and Pezzo's class-validator `@IsOptional()` skips
/// `null` too).
pub(crate) fn present<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// `parent[i]`.
pub(crate) fn index_path(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

/// The JSON type name of a value, for messages.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON integer, also in the form `3.0` (JSON Schema's `integer` is any number without a
/// fractional part). `None` for other values and for magnitudes beyond i128-safe f64 precision.
pub(crate) fn as_integer(v: &Value) -> Option<i128> {
    if let Some(u) = v.as_u64() {
        return Some(i128::from(u));
    }
    if let Some(i) = v.as_i64() {
        return Some(i128::from(i));
    }
    let f = v.as_f64()?;
    // 2^63: beyond this an f64 can't be a meaningful id or count for us.
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 2f64.powi(63) {
        Some(f as i128)
    } else {
        None
    }
}

/// An integer that fits `u64`.
pub(crate) fn as_u64(v: &Value) -> Option<u64> {
    as_integer(v).and_then(|i| u64::try_from(i).ok())
}

/// Collects [`FieldError`]s.
#[derive(Debug, Default)]
pub(crate) struct Checker {
    errors: Vec<FieldError>,
}

impl Checker {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Records a problem with `field`.
    pub(crate) fn error(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.into(),
            problem: problem.into(),
        });
    }

    pub(crate) fn finish(self) -> Result<(), Vec<FieldError>> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self.errors)
        }
    }

    /// A required member: records "is required" when missing or null.
    pub(crate) fn required<'a>(
        &mut self,
        obj: &'a Map<String, Value>,
        parent: &str,
        key: &str,
    ) -> Option<&'a Value> {
        match obj.get(key) {
            None => {
                self.error(key_path(parent, key), "is required");
                None
            }
            Some(Value::Null) => {
                self.error(key_path(parent, key), "is required and must not be null");
                None
            }
            Some(v) => Some(v),
        }
    }

    /// `v` as an object, or records `expected an object`.
    pub(crate) fn object<'a>(
        &mut self,
        v: &'a Value,
        path: &str,
    ) -> Option<&'a Map<String, Value>> {
        match v {
            Value::Object(m) => Some(m),
            other => {
                self.error(path, format!("must be an object, got {}", kind(other)));
                None
            }
        }
    }

    pub(crate) fn array<'a>(&mut self, v: &'a Value, path: &str) -> Option<&'a Vec<Value>> {
        match v {
            Value::Array(a) => Some(a),
            other => {
                self.error(path, format!("must be an array, got {}", kind(other)));
                None
            }
        }
    }

    pub(crate) fn string<'a>(&mut self, v: &'a Value, path: &str) -> Option<&'a str> {
        match v {
            Value::String(s) => Some(s),
            other => {
                self.error(path, format!("must be a string, got {}", kind(other)));
                None
            }
        }
    }

    /// A string of at most `max` characters (Unicode scalar values, as Python's `len`).
    pub(crate) fn string_max<'a>(
        &mut self,
        v: &'a Value,
        path: &str,
        max: usize,
    ) -> Option<&'a str> {
        let s = self.string(v, path)?;
        let n = s.chars().count();
        if n > max {
            self.error(
                path,
                format!("must be at most {max} characters long, got {n}"),
            );
            return None;
        }
        Some(s)
    }

    /// A string out of `allowed`.
    pub(crate) fn one_of<'a>(
        &mut self,
        v: &'a Value,
        path: &str,
        allowed: &[&str],
    ) -> Option<&'a str> {
        let s = self.string(v, path)?;
        if allowed.contains(&s) {
            Some(s)
        } else {
            self.error(
                path,
                format!("must be one of {}, got {:?}", allowed.join(", "), s),
            );
            None
        }
    }

    pub(crate) fn boolean(&mut self, v: &Value, path: &str) -> Option<bool> {
        match v {
            Value::Bool(b) => Some(*b),
            other => {
                self.error(path, format!("must be a boolean, got {}", kind(other)));
                None
            }
        }
    }

    /// An integer within `min..=max`.
    pub(crate) fn integer_in(
        &mut self,
        v: &Value,
        path: &str,
        min: i128,
        max: i128,
    ) -> Option<i128> {
        let Some(i) = as_integer(v) else {
            self.error(path, format!("must be an integer, got {}", describe(v)));
            return None;
        };
        if i < min || i > max {
            // "Unbounded" maxima read better as a lower bound alone.
            let unbounded = max == i128::from(i64::MAX) || max == i128::from(u64::MAX);
            let range = if i < min && unbounded {
                format!(">= {min}")
            } else {
                format!("within {min}..={max}")
            };
            self.error(path, format!("must be {range}, got {i}"));
            return None;
        }
        Some(i)
    }

    /// A finite number `>= 0`.
    pub(crate) fn non_negative_number(&mut self, v: &Value, path: &str) -> Option<f64> {
        let Some(f) = v.as_f64() else {
            self.error(path, format!("must be a number, got {}", kind(v)));
            return None;
        };
        if !(f >= 0.0 && f.is_finite()) {
            self.error(path, format!("must be >= 0, got {f}"));
            return None;
        }
        Some(f)
    }

    /// An RFC 3339 date-time string (`2024-01-01T00:00:00.000Z`); with `numbers`, also Unix
    /// seconds as an integer or float (what the PromptLayer SDKs send), or milliseconds above
    /// 2e10 ([`Timestamp::from_unix_number`]).
    pub(crate) fn date_time(&mut self, v: &Value, path: &str, numbers: bool) -> Option<Timestamp> {
        match v {
            Value::String(s) => match Timestamp::parse_rfc3339(s) {
                Some(t) => Some(t),
                None => {
                    self.error(
                        path,
                        format!(
                            "must be an RFC 3339 date-time with offset \
                             (e.g. 2024-01-01T00:00:00.000Z), got {s:?}"
                        ),
                    );
                    None
                }
            },
            Value::Number(n) if numbers => match n.as_f64().and_then(Timestamp::from_unix_number) {
                Some(t) => Some(t),
                None => {
                    self.error(
                        path,
                        format!(
                            "must be Unix seconds (0..=253402300799) or milliseconds \
                             (above 2e10, up to the year 9999), got {n}"
                        ),
                    );
                    None
                }
            },
            other => {
                let expected = if numbers {
                    "a date-time string or Unix seconds"
                } else {
                    "a date-time string"
                };
                self.error(path, format!("must be {expected}, got {}", kind(other)));
                None
            }
        }
    }
}

/// `kind`, but shows the number itself (so `1.5` reads as "got 1.5").
fn describe(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        other => kind(other).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths() {
        assert_eq!(key_path(ROOT, "metadata"), "metadata");
        assert_eq!(key_path("metadata", "provider"), "metadata.provider");
        assert_eq!(key_path("metadata", "a.b"), "metadata[\"a.b\"]");
        assert_eq!(index_path("tags", 3), "tags[3]");
        let long = "k".repeat(2000);
        assert_eq!(
            key_path("metadata", &long).chars().count(),
            "metadata.".len() + 64
        );
    }

    #[test]
    fn integers_accept_integral_floats_only() {
        assert_eq!(as_integer(&json!(3)), Some(3));
        assert_eq!(as_integer(&json!(-3)), Some(-3));
        assert_eq!(as_integer(&json!(3.0)), Some(3));
        assert_eq!(as_integer(&json!(3.5)), None);
        assert_eq!(as_integer(&json!(1e300)), None);
        assert_eq!(as_integer(&json!("3")), None);
        assert_eq!(as_u64(&json!(-1)), None);
        assert_eq!(as_u64(&json!(u64::MAX)), Some(u64::MAX));
    }

    #[test]
    fn checker_collects_everything() {
        let mut c = Checker::new();
        assert_eq!(c.integer_in(&json!(101), "score", 0, 100), None);
        assert_eq!(c.integer_in(&json!(1.5), "n", 0, 100), None);
        assert_eq!(c.integer_in(&json!(-1), "t", 0, i128::from(u64::MAX)), None);
        assert_eq!(c.string_max(&json!("abcd"), "s", 3), None);
        assert!(c.date_time(&json!(1_700_000_000.5), "t1", false).is_none());
        assert!(c.date_time(&json!(1_700_000_000.5), "t2", true).is_some());
        let errs = c.finish().expect_err("errors");
        let got: Vec<(&str, &str)> = errs
            .iter()
            .map(|e| (e.field.as_str(), e.problem.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("score", "must be within 0..=100, got 101"),
                ("n", "must be an integer, got 1.5"),
                ("t", "must be >= 0, got -1"),
                ("s", "must be at most 3 characters long, got 4"),
                ("t1", "must be a date-time string, got a number"),
            ]
        );
    }
}
