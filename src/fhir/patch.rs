//! JSON Patch (RFC 6902) applied to a resource, without I/O.
//!
//! The write check (`authz::write`) cannot ask the upstream what a `PATCH` would make
//! of a record, so it applies the patch itself to the current version it fetched and
//! checks the result as it checks an update's body. The upstream then applies the same
//! patch to the same version (the proxy pins it with `If-Match`), so what was checked
//! is what is stored. All six operations (`add`, `remove`, `replace`, `move`, `copy`,
//! `test`) and JSON Pointer (RFC 6901, `~0`/`~1` escapes, `-` for the end of an array)
//! are implemented exactly; anything the RFC calls an error is one here, so the proxy
//! never checks a result the upstream would not produce.

use serde_json::Value;

/// Most operations accepted in one patch.
pub const MAX_OPERATIONS: usize = 1000;

/// Why a patch cannot be applied (the text names the operation, never a value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("json patch operation {index}: {what}")]
pub struct PatchError {
    pub index: usize,
    pub what: &'static str,
}

/// One parsed operation.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    Add(Vec<String>, Value),
    Remove(Vec<String>),
    Replace(Vec<String>, Value),
    Move {
        from: Vec<String>,
        path: Vec<String>,
    },
    Copy {
        from: Vec<String>,
        path: Vec<String>,
    },
    Test(Vec<String>, Value),
}

/// The JSON Pointer `p` as its reference tokens (`""` is the whole document).
fn pointer(p: &str) -> Option<Vec<String>> {
    if p.is_empty() {
        return Some(Vec::new());
    }
    let rest = p.strip_prefix('/')?;
    rest.split('/')
        .map(|t| {
            // `~` must be followed by `0` or `1`.
            let mut out = String::with_capacity(t.len());
            let mut chars = t.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => out.push('~'),
                        Some('1') => out.push('/'),
                        _ => return None,
                    }
                } else {
                    out.push(c);
                }
            }
            Some(out)
        })
        .collect()
}

fn parse_op(index: usize, op: &Value) -> Result<Op, PatchError> {
    let err = |what| PatchError { index, what };
    let obj = op.as_object().ok_or(err("not an object"))?;
    let name = obj
        .get("op")
        .and_then(Value::as_str)
        .ok_or(err("no `op`"))?;
    let at = |key: &str| -> Result<Vec<String>, PatchError> {
        obj.get(key)
            .and_then(Value::as_str)
            .and_then(pointer)
            .ok_or(err("missing or invalid pointer"))
    };
    let value = || obj.get("value").cloned().ok_or(err("no `value`"));
    Ok(match name {
        "add" => Op::Add(at("path")?, value()?),
        "remove" => Op::Remove(at("path")?),
        "replace" => Op::Replace(at("path")?, value()?),
        "move" => Op::Move {
            from: at("from")?,
            path: at("path")?,
        },
        "copy" => Op::Copy {
            from: at("from")?,
            path: at("path")?,
        },
        "test" => Op::Test(at("path")?, value()?),
        _ => return Err(err("unknown `op`")),
    })
}

/// An array index token: `0` or digits without a leading zero.
fn array_index(token: &str) -> Option<usize> {
    let ok = !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_digit())
        && (token == "0" || !token.starts_with('0'));
    if ok { token.parse().ok() } else { None }
}

fn get<'v>(doc: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(doc, |v, t| match v {
        Value::Object(o) => o.get(t),
        Value::Array(a) => a.get(array_index(t)?),
        _ => None,
    })
}

fn get_mut<'v>(doc: &'v mut Value, path: &[String]) -> Option<&'v mut Value> {
    path.iter().try_fold(doc, |v, t| match v {
        Value::Object(o) => o.get_mut(t),
        Value::Array(a) => a.get_mut(array_index(t)?),
        _ => None,
    })
}

fn add(doc: &mut Value, path: &[String], value: Value) -> Result<(), &'static str> {
    let Some((last, parent)) = path.split_last() else {
        *doc = value;
        return Ok(());
    };
    match get_mut(doc, parent).ok_or("parent does not exist")? {
        Value::Object(o) => {
            o.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(a) => {
            let at = if last == "-" {
                a.len()
            } else {
                array_index(last).ok_or("invalid array index")?
            };
            if at > a.len() {
                return Err("array index out of bounds");
            }
            a.insert(at, value);
            Ok(())
        }
        _ => Err("parent is not a container"),
    }
}

fn remove(doc: &mut Value, path: &[String]) -> Result<Value, &'static str> {
    let (last, parent) = path
        .split_last()
        .ok_or("cannot remove the whole document")?;
    match get_mut(doc, parent).ok_or("parent does not exist")? {
        Value::Object(o) => o.shift_remove(last).ok_or("target does not exist"),
        Value::Array(a) => {
            let at = array_index(last).ok_or("invalid array index")?;
            if at >= a.len() {
                return Err("target does not exist");
            }
            Ok(a.remove(at))
        }
        _ => Err("parent is not a container"),
    }
}

/// JSON equality as RFC 6902 `test` defines it: numbers by value.
fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y,
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| equal(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| equal(v, w)))
        }
        _ => a == b,
    }
}

/// Applies `patch` (the JSON array of operations) to a copy of `doc`; all or nothing.
pub fn apply(doc: &Value, patch: &Value) -> Result<Value, PatchError> {
    let ops = patch.as_array().ok_or(PatchError {
        index: 0,
        what: "a patch is an array of operations",
    })?;
    if ops.len() > MAX_OPERATIONS {
        return Err(PatchError {
            index: MAX_OPERATIONS,
            what: "too many operations",
        });
    }
    let mut out = doc.clone();
    for (index, op) in ops.iter().enumerate() {
        let op = parse_op(index, op)?;
        let err = |what| PatchError { index, what };
        match op {
            Op::Add(path, value) => add(&mut out, &path, value).map_err(err)?,
            Op::Remove(path) => {
                remove(&mut out, &path).map_err(err)?;
            }
            Op::Replace(path, value) => {
                let target = get_mut(&mut out, &path).ok_or(err("target does not exist"))?;
                *target = value;
            }
            Op::Move { from, path } => {
                if path.len() > from.len() && path.starts_with(&from) {
                    return Err(err("cannot move a value into itself"));
                }
                let value = remove(&mut out, &from).map_err(err)?;
                add(&mut out, &path, value).map_err(err)?;
            }
            Op::Copy { from, path } => {
                let value = get(&out, &from)
                    .cloned()
                    .ok_or(err("`from` does not exist"))?;
                add(&mut out, &path, value).map_err(err)?;
            }
            Op::Test(path, value) => {
                let target = get(&out, &path).ok_or(err("target does not exist"))?;
                if !equal(target, &value) {
                    return Err(err("test failed"));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    fn obs() -> Value {
        json!({"resourceType": "Observation", "id": "o1",
               "subject": {"reference": "Patient/p1"},
               "code": {"coding": [{"code": "a"}, {"code": "b"}]}})
    }

    #[test]
    fn rfc_operations() {
        let out = apply(
            &obs(),
            &json!([
                {"op": "replace", "path": "/subject/reference", "value": "Patient/p2"},
                {"op": "add", "path": "/code/coding/-", "value": {"code": "c"}},
                {"op": "add", "path": "/code/coding/0", "value": {"code": "z"}},
                {"op": "remove", "path": "/code/coding/1"},
                {"op": "copy", "from": "/subject", "path": "/focus"},
                {"op": "move", "from": "/focus", "path": "/performer"},
                {"op": "test", "path": "/performer/reference", "value": "Patient/p2"}
            ]),
        )
        .unwrap();
        assert_eq!(out["subject"]["reference"], "Patient/p2");
        assert_eq!(out["performer"]["reference"], "Patient/p2");
        assert!(out.get("focus").is_none());
        assert_eq!(
            out["code"]["coding"],
            json!([{"code": "z"}, {"code": "b"}, {"code": "c"}])
        );
    }

    #[test]
    fn pointer_escapes() {
        let doc = json!({"a/b": 1, "c~d": 2});
        let out = apply(
            &doc,
            &json!([{"op": "replace", "path": "/a~1b", "value": 3},
                    {"op": "remove", "path": "/c~0d"}]),
        )
        .unwrap();
        assert_eq!(out, json!({"a/b": 3}));
        assert!(apply(&doc, &json!([{"op": "remove", "path": "/c~2d"}])).is_err());
    }

    #[test]
    fn errors_are_errors() {
        for bad in [
            json!({"op": "add"}),
            json!([{"op": "replace", "path": "/missing", "value": 1}]),
            json!([{"op": "remove", "path": "/code/coding/5"}]),
            json!([{"op": "add", "path": "/code/coding/01", "value": 1}]),
            json!([{"op": "add", "path": "/code/coding/3", "value": 1}]),
            json!([{"op": "add", "path": "/nope/x", "value": 1}]),
            json!([{"op": "test", "path": "/id", "value": "o2"}]),
            json!([{"op": "move", "from": "/code", "path": "/code/x"}]),
            json!([{"op": "frobnicate", "path": "/id"}]),
            json!([{"op": "replace", "path": "id", "value": 1}]),
            json!([{"op": "add", "path": "/id"}]),
        ] {
            assert!(apply(&obs(), &bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn all_or_nothing_and_numbers() {
        let doc = json!({"v": 1.0});
        assert!(apply(&doc, &json!([{"op": "test", "path": "/v", "value": 1}])).is_ok());
        // A failed operation leaves the input untouched (a copy is patched).
        let before = obs();
        let _ = apply(
            &before,
            &json!([{"op": "remove", "path": "/subject"}, {"op": "remove", "path": "/x"}]),
        );
        assert_eq!(before, obs());
        // The whole document can be replaced.
        assert_eq!(
            apply(&doc, &json!([{"op": "replace", "path": "", "value": 2}])).unwrap(),
            json!(2)
        );
    }
}
