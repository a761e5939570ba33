//! Argument validation with the messages of the original `check_arguments`:
//! `Missing the mandatory parameter '<name>'.`, `Parameter '<name>': <reason>.`,
//! `Unexpected parameters: {…}.`
//!
//! ```ignore
//! let mut a = Args::new(params);
//! let count = a.req("count", is_pos_int)?;
//! let cloud = a.opt("cloud", is_string, "default".to_string())?;
//! a.finish()?;
//! ```

use serde_json::{Map, Value};

use crate::rpc::{Params, RpcError};

/// A validator converts a JSON value (or a string, as GET/UPLOAD send) or says why not.
pub type Validator<T> = fn(&Value) -> Result<T, String>;

pub struct Args {
    rest: Params,
}

impl Args {
    pub fn new(params: Params) -> Self {
        Args { rest: params }
    }

    /// A mandatory parameter.
    pub fn req<T>(&mut self, name: &str, v: Validator<T>) -> Result<T, RpcError> {
        match self.rest.remove(name) {
            None => Err(RpcError(format!(
                "Missing the mandatory parameter '{name}'."
            ))),
            Some(val) => v(&val).map_err(|r| RpcError(format!("Parameter '{name}': {r}."))),
        }
    }

    /// An optional parameter; the default is not validated (as in the original).
    pub fn opt<T>(&mut self, name: &str, v: Validator<T>, default: T) -> Result<T, RpcError> {
        match self.rest.remove(name) {
            None => Ok(default),
            Some(val) => v(&val).map_err(|r| RpcError(format!("Parameter '{name}': {r}."))),
        }
    }

    /// Fails if parameters are left over.
    pub fn finish(self) -> Result<(), RpcError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(RpcError(format!(
                "Unexpected parameters: {}.",
                Value::Object(self.rest)
            )))
        }
    }
}

pub fn is_int(v: &Value) -> Result<i64, String> {
    match v {
        Value::Number(n) => n.as_i64().ok_or_else(|| format!("{n} is not an integer")),
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("'{s}' is not an integer")),
        other => Err(format!("{other} is not an integer")),
    }
}

pub fn is_pos_int(v: &Value) -> Result<i64, String> {
    let n = is_int(v)?;
    if n > 0 {
        Ok(n)
    } else {
        Err(format!("{n} is not a positive integer"))
    }
}

pub fn is_pos_nul_int(v: &Value) -> Result<i64, String> {
    let n = is_int(v)?;
    if n >= 0 {
        Ok(n)
    } else {
        Err(format!("{n} is not a positive integer or zero"))
    }
}

pub fn is_bool(v: &Value) -> Result<bool, String> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) if n.as_i64() == Some(1) => Ok(true),
        Value::Number(n) if n.as_i64() == Some(0) => Ok(false),
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "yes" | "y" | "true" | "t" | "1" => Ok(true),
            "no" | "n" | "false" | "f" | "0" => Ok(false),
            _ => Err(format!("'{s}' is not a boolean")),
        },
        other => Err(format!("{other} is not a boolean")),
    }
}

pub fn is_string(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        other => Err(format!("{other} is not a string")),
    }
}

/// A dict; a string holding a JSON object is accepted too (GET/UPLOAD parameters).
pub fn is_dict(v: &Value) -> Result<Map<String, Value>, String> {
    match v {
        Value::Object(m) => Ok(m.clone()),
        Value::String(s) => match serde_json::from_str(s) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(format!("'{s}' is not a dict")),
        },
        other => Err(format!("{other} is not a dict")),
    }
}

pub fn is_list(v: &Value) -> Result<Vec<Value>, String> {
    match v {
        Value::Array(a) => Ok(a.clone()),
        other => Err(format!("{other} is not a list")),
    }
}

/// An uploaded file: `{"filename", "content"}`.
pub fn is_uploaded_file(v: &Value) -> Result<(String, String), String> {
    match (
        v.get("filename").and_then(Value::as_str),
        v.get("content").and_then(Value::as_str),
    ) {
        (Some(f), Some(c)) => Ok((f.to_string(), c.to_string())),
        _ => Err("is not an uploaded file".to_string()),
    }
}

/// An uploaded file with its exact bytes (binary uploads carry `"base64"`).
pub fn is_uploaded_bytes(v: &Value) -> Result<(String, Vec<u8>), String> {
    let (name, content) = is_uploaded_file(v)?;
    match v.get("base64").and_then(Value::as_str) {
        Some(b) => base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b)
            .map(|bytes| (name, bytes))
            .map_err(|e| format!("bad base64 content: {e}")),
        None => Ok((name, content.into_bytes())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(v: Value) -> Params {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn messages_match_the_original() {
        let mut a = Args::new(p(json!({})));
        assert_eq!(
            a.req("count", is_int).unwrap_err().0,
            "Missing the mandatory parameter 'count'."
        );
        let mut a = Args::new(p(json!({"count": "x"})));
        assert_eq!(
            a.req("count", is_int).unwrap_err().0,
            "Parameter 'count': 'x' is not an integer."
        );
        let mut a = Args::new(p(json!({"count": -1})));
        assert_eq!(
            a.req("count", is_pos_int).unwrap_err().0,
            "Parameter 'count': -1 is not a positive integer."
        );
        let mut a = Args::new(p(json!({"count": "3", "zz": 1})));
        assert_eq!(a.req("count", is_pos_int).unwrap(), 3);
        assert_eq!(
            a.opt("cloud", is_string, "default".into()).unwrap(),
            "default"
        );
        assert_eq!(
            a.finish().unwrap_err().0,
            "Unexpected parameters: {\"zz\":1}."
        );
    }

    #[test]
    fn validators() {
        assert!(is_bool(&json!("Yes")).unwrap());
        assert!(!is_bool(&json!("f")).unwrap());
        assert!(is_bool(&json!("maybe")).is_err());
        assert_eq!(is_pos_nul_int(&json!(0)).unwrap(), 0);
        assert!(is_dict(&json!("{\"node\": 2}")).is_ok());
        assert!(is_dict(&json!("[1]")).is_err());
        assert!(is_string(&json!(3)).is_err());
        assert!(is_list(&json!([1])).is_ok());
        assert!(is_uploaded_file(&json!({"filename": "a", "content": "b"})).is_ok());
    }
}
