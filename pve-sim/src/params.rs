//! Parameter extraction and checking as PVE's HTTP server does it: query string merged
//! with a form or JSON body (a POST without Content-Type is a form), GET/DELETE with a body
//! refused with 501, booleans only `0/1` in form encoding, unknown and missing parameters
//! reported together in a 400 `errors` map.

use std::collections::BTreeMap;

use axum::extract::{FromRequest, Request};
use axum::http::{Method, header};
use serde_json::Value;

use crate::error::{PveError, PveResult};

/// A parameter value as it arrived: a string (form/query) or a JSON value.
#[derive(Clone, Debug)]
pub(crate) enum PVal {
    Form(String),
    Json(Value),
}

impl PVal {
    fn as_text(&self) -> String {
        match self {
            PVal::Form(s) => s.clone(),
            PVal::Json(Value::String(s)) => s.clone(),
            PVal::Json(v) => v.to_string(),
        }
    }
}

/// Merged request parameters.
#[derive(Clone, Debug, Default)]
pub(crate) struct Params {
    pub map: BTreeMap<String, PVal>,
}

/// Parameter types with PVE's error texts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Ty {
    Str,
    Int(i64, i64),
    Bool,
    Node,
    /// `dns-name` (VM names).
    DnsName,
    StorageId,
    /// One of these strings.
    Enum(&'static [&'static str]),
    /// A VM disk key (`scsi0`, `efidisk0`, ...), an enumeration in PVE's schema.
    DiskKey,
}

/// One schema entry: name, type, required.
pub(crate) struct P(pub &'static str, pub Ty, pub bool);

const MAX_BODY: usize = 1 << 20;

impl<S: Send + Sync> FromRequest<S> for Params {
    type Rejection = PveError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let method = req.method().clone();
        let mut map = BTreeMap::new();
        if let Some(q) = req.uri().query() {
            for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
                map.insert(k.into_owned(), PVal::Form(v.into_owned()));
            }
        }
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/json"));
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY)
            .await
            .map_err(|_| {
                PveError::with_status(axum::http::StatusCode::BAD_REQUEST, "request too large")
            })?;
        if !bytes.is_empty() {
            if method == Method::GET || method == Method::DELETE || method == Method::HEAD {
                return Err(PveError::not_implemented(format!(
                    "Unexpected content for method '{method}'"
                )));
            }
            if is_json {
                match serde_json::from_slice::<Value>(&bytes) {
                    Ok(Value::Object(o)) => {
                        for (k, v) in o {
                            if !v.is_null() {
                                map.insert(k, PVal::Json(v));
                            }
                        }
                    }
                    Ok(Value::Null) => {}
                    _ => {
                        return Err(PveError::with_status(
                            axum::http::StatusCode::BAD_REQUEST,
                            "malformed JSON body",
                        ));
                    }
                }
            } else {
                for (k, v) in url::form_urlencoded::parse(&bytes) {
                    map.insert(k.into_owned(), PVal::Form(v.into_owned()));
                }
            }
        }
        Ok(Params { map })
    }
}

fn check_value(ty: Ty, v: &PVal) -> Result<(), String> {
    let text = v.as_text();
    match ty {
        Ty::Str => Ok(()),
        Ty::Bool => match v {
            PVal::Json(Value::Bool(_)) => Ok(()),
            _ if text == "0" || text == "1" => Ok(()),
            _ => Err(format!("type check ('boolean') failed - got '{text}'")),
        },
        Ty::Int(min, max) => {
            let n: i64 = text
                .parse()
                .map_err(|_| format!("type check ('integer') failed - got '{text}'"))?;
            if n < min {
                Err(format!("value must have a minimum value of {min}"))
            } else if n > max {
                Err(format!("value must have a maximum value of {max}"))
            } else {
                Ok(())
            }
        }
        Ty::Node => {
            if valid_node_name(&text) {
                Ok(())
            } else {
                Err(format!(
                    "value '{text}' does not look like a valid node name"
                ))
            }
        }
        Ty::DnsName => {
            if valid_dns_name(&text) {
                Ok(())
            } else {
                Err(format!(
                    "value '{text}' does not look like a valid DNS name"
                ))
            }
        }
        Ty::Enum(values) => {
            if values.contains(&text.as_str()) {
                Ok(())
            } else {
                Err(format!(
                    "value '{text}' does not have a value in the enumeration '{}'",
                    values.join(", ")
                ))
            }
        }
        Ty::DiskKey => {
            if crate::state::is_disk_key(&text) {
                Ok(())
            } else {
                let mut all: Vec<String> = Vec::new();
                for (p, n) in [("ide", 3), ("scsi", 30), ("virtio", 15), ("sata", 5)] {
                    all.extend((0..=n).map(|i| format!("{p}{i}")));
                }
                all.extend(["efidisk0".to_string(), "tpmstate0".to_string()]);
                Err(format!(
                    "value '{text}' does not have a value in the enumeration '{}'",
                    all.join(", ")
                ))
            }
        }
        Ty::StorageId => {
            if valid_storage_id(&text) {
                Ok(())
            } else {
                Err(format!("storage ID '{text}' contains illegal characters"))
            }
        }
    }
}

pub(crate) fn valid_node_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

pub(crate) fn valid_dns_name(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(valid_node_name)
}

pub(crate) fn valid_storage_id(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 2
        && b[0].is_ascii_alphabetic()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// Parses a `{vmid}` path segment.
pub(crate) fn path_vmid(s: &str) -> PveResult<u32> {
    match check_value(Ty::Int(100, 999_999_999), &PVal::Form(s.to_string())) {
        Ok(()) => Ok(s.parse().unwrap_or(0)),
        Err(e) => Err(PveError::param("vmid", e)),
    }
}

impl Params {
    /// Checks against a schema; `extra` accepts additional keys (e.g. VM config keys).
    pub fn check(&self, spec: &[P], extra: impl Fn(&str) -> bool) -> PveResult<()> {
        let mut errors = BTreeMap::new();
        for P(name, ty, required) in spec {
            match self.map.get(*name) {
                None if *required => {
                    errors.insert(
                        name.to_string(),
                        "property is missing and it is not optional".to_string(),
                    );
                }
                None => {}
                Some(v) => {
                    if let Err(e) = check_value(*ty, v) {
                        errors.insert(name.to_string(), e);
                    }
                }
            }
        }
        for k in self.map.keys() {
            if !spec.iter().any(|p| p.0 == k) && !extra(k) {
                errors.insert(
                    k.clone(),
                    "property is not defined in schema and the schema does not allow additional properties"
                        .to_string(),
                );
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(PveError::params(errors))
        }
    }

    pub fn str(&self, k: &str) -> Option<String> {
        self.map.get(k).map(PVal::as_text)
    }
    pub fn int(&self, k: &str) -> Option<i64> {
        self.str(k).and_then(|s| s.parse().ok())
    }
    pub fn bool(&self, k: &str) -> Option<bool> {
        self.map.get(k).map(|v| match v {
            PVal::Json(Value::Bool(b)) => *b,
            other => other.as_text() == "1",
        })
    }
    pub fn flag(&self, k: &str) -> bool {
        self.bool(k).unwrap_or(false)
    }
    /// The value as JSON for storing in a VM config: integers stay numbers.
    pub fn json(&self, k: &str) -> Option<Value> {
        self.map.get(k).map(|v| match v {
            PVal::Json(j) => j.clone(),
            PVal::Form(s) => Value::String(s.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_only_zero_one_in_forms() {
        assert!(check_value(Ty::Bool, &PVal::Form("1".into())).is_ok());
        assert_eq!(
            check_value(Ty::Bool, &PVal::Form("true".into())).unwrap_err(),
            "type check ('boolean') failed - got 'true'"
        );
        assert!(check_value(Ty::Bool, &PVal::Json(Value::Bool(true))).is_ok());
        assert_eq!(
            check_value(Ty::Int(100, 999), &PVal::Form("5".into())).unwrap_err(),
            "value must have a minimum value of 100"
        );
        assert!(valid_dns_name("web-1.lab"));
        assert!(!valid_dns_name("web_1"));
    }
}
