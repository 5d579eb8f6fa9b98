//! Decoding Proxmox's number-or-string and 0/1-boolean values.
//!
//! The API is written in Perl, so a JSON value's type depends on how the scalar was last
//! used: `nextid` is `"105"`, `memory` is `"2048"`, `template` is `1`, `loadavg` entries are
//! strings. These `deserialize_with` helpers accept every spelling seen in the wild.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

pub(crate) fn value_to_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        Value::String(s) => {
            let s = s.trim();
            s.parse::<u64>().ok().or_else(|| {
                s.parse::<f64>()
                    .ok()
                    .filter(|f| *f >= 0.0)
                    .map(|f| f as u64)
            })
        }
        Value::Bool(b) => Some(u64::from(*b)),
        _ => None,
    }
}

pub(crate) fn value_to_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

pub(crate) fn value_to_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => n.as_f64().map(|f| f != 0.0),
        Value::String(s) => match s.trim() {
            "1" | "true" | "yes" | "on" => Some(true),
            "0" | "false" | "no" | "off" | "" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

pub(crate) fn value_to_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(if *b { "1" } else { "0" }.to_owned()),
        _ => None,
    }
}

fn opt_value<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    Ok(v.filter(|v| !v.is_null()))
}

pub(crate) fn u64_<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = Value::deserialize(d)?;
    value_to_u64(&v).ok_or_else(|| D::Error::custom(format!("expected an integer, got {v}")))
}

pub(crate) fn u32_<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = u64_(d)?;
    u32::try_from(n).map_err(|_| D::Error::custom(format!("{n} out of range")))
}

pub(crate) fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match opt_value(d)? {
        None => Ok(None),
        Some(v) => value_to_u64(&v)
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("expected an integer, got {v}"))),
    }
}

pub(crate) fn opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    match opt_u64(d)? {
        None => Ok(None),
        Some(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| D::Error::custom(format!("{n} out of range"))),
    }
}

pub(crate) fn opt_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    match opt_value(d)? {
        None => Ok(None),
        Some(v) => value_to_f64(&v)
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("expected a number, got {v}"))),
    }
}

/// A boolean that may be absent (false), `0/1`, `"0"/"1"` or JSON `true/false`.
pub(crate) fn bool_<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match opt_value(d)? {
        None => Ok(false),
        Some(v) => {
            value_to_bool(&v).ok_or_else(|| D::Error::custom(format!("expected 0/1, got {v}")))
        }
    }
}

/// A string that may also come as a number.
pub(crate) fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match opt_value(d)? {
        None => Ok(None),
        Some(v) => value_to_string(&v)
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("expected a string, got {v}"))),
    }
}

/// A list given as a JSON array or as a comma/semicolon/space separated string.
pub(crate) fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    match opt_value(d)? {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items.iter().filter_map(value_to_string).collect()),
        Some(v) => {
            let s = value_to_string(&v)
                .ok_or_else(|| D::Error::custom(format!("expected a list, got {v}")))?;
            Ok(split_list(&s))
        }
    }
}

/// A list of numbers given as an array of numbers or numeric strings (`loadavg`).
pub(crate) fn f64_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    match opt_value(d)? {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| value_to_f64(v).ok_or_else(|| D::Error::custom(format!("bad number {v}"))))
            .collect(),
        Some(v) => Err(D::Error::custom(format!("expected a list, got {v}"))),
    }
}

pub(crate) fn split_list(s: &str) -> Vec<String> {
    s.split([',', ';', ' '])
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    struct T {
        #[serde(deserialize_with = "u32_")]
        vmid: u32,
        #[serde(default, deserialize_with = "opt_u64")]
        mem: Option<u64>,
        #[serde(default, deserialize_with = "bool_")]
        template: bool,
        #[serde(default, deserialize_with = "opt_f64")]
        cpu: Option<f64>,
        #[serde(default, deserialize_with = "opt_string")]
        name: Option<String>,
        #[serde(default, deserialize_with = "string_list")]
        groups: Vec<String>,
        #[serde(default, deserialize_with = "f64_list")]
        loadavg: Vec<f64>,
    }

    #[test]
    fn numbers_or_strings() {
        let a: T = serde_json::from_str(
            r#"{"vmid":"105","mem":"2048","template":1,"cpu":"0.25","name":123,
                "groups":"a,b c;d","loadavg":["0.12","0.10",0.09]}"#,
        )
        .unwrap();
        assert_eq!(a.vmid, 105);
        assert_eq!(a.mem, Some(2048));
        assert!(a.template);
        assert_eq!(a.cpu, Some(0.25));
        assert_eq!(a.name.as_deref(), Some("123"));
        assert_eq!(a.groups, ["a", "b", "c", "d"]);
        assert_eq!(a.loadavg, [0.12, 0.10, 0.09]);

        let b: T = serde_json::from_str(r#"{"vmid":105,"mem":null,"template":"0","groups":["x"]}"#)
            .unwrap();
        assert_eq!(b.vmid, 105);
        assert_eq!(b.mem, None);
        assert!(!b.template);
        assert_eq!(b.groups, ["x"]);

        let c: T = serde_json::from_str(r#"{"vmid":106,"template":true}"#).unwrap();
        assert!(c.template);
        assert!(serde_json::from_str::<T>(r#"{"vmid":"x"}"#).is_err());
        assert!(serde_json::from_str::<T>(r#"{"vmid":1,"template":"maybe"}"#).is_err());
        assert!(serde_json::from_str::<T>(r#"{"vmid":99999999999}"#).is_err());
    }
}
