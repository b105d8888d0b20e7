//! RFC 6902 JSON Patch operations, with RFC 6901 pointer escaping (`~` → `~0`, `/` → `~1`, so
//! a label key such as `topology.kubernetes.io/zone` is one path segment).

use serde::Serialize;
use serde_json::Value;

/// One JSON Patch operation. Only `add` is needed: it creates a member or replaces an existing
/// one, and appends to an array at `-`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum PatchOp {
    /// Sets `value` at `path`.
    Add {
        /// JSON pointer.
        path: String,
        /// The value.
        value: Value,
    },
}

impl PatchOp {
    /// `add` of `value` at the pointer made of `segments`.
    pub fn add(segments: &[&str], value: Value) -> Self {
        Self::Add {
            path: pointer(segments),
            value,
        }
    }
}

/// The JSON pointer of `segments`, each escaped.
pub fn pointer(segments: &[&str]) -> String {
    segments.iter().fold(String::new(), |mut path, segment| {
        path.push('/');
        path.push_str(&segment.replace('~', "~0").replace('/', "~1"));
        path
    })
}

/// Applies `ops` to `doc` (tests only: checks that a patch does what it says, and that a second
/// admission of the patched object changes nothing).
#[cfg(test)]
pub(crate) fn apply(doc: &mut Value, ops: &[PatchOp]) {
    for PatchOp::Add { path, value } in ops {
        let segments: Vec<String> = path
            .split('/')
            .skip(1)
            .map(|s| s.replace("~1", "/").replace("~0", "~"))
            .collect();
        let (last, parents) = segments.split_last().expect("non-empty path");
        let mut node = &mut *doc;
        for segment in parents {
            node = match node {
                Value::Array(items) => &mut items[segment.parse::<usize>().expect("index")],
                other => other.get_mut(segment.as_str()).expect("parent exists"),
            };
        }
        match node {
            Value::Array(items) if last == "-" => items.push(value.clone()),
            Value::Array(items) => items.insert(last.parse().expect("index"), value.clone()),
            Value::Object(map) => {
                map.insert(last.clone(), value.clone());
            }
            other => panic!("cannot add {path} under {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_escapes_tilde_and_slash() {
        assert_eq!(
            pointer(&["metadata", "labels", "topology.kubernetes.io/zone"]),
            "/metadata/labels/topology.kubernetes.io~1zone"
        );
        assert_eq!(pointer(&["a~b/c"]), "/a~0b~1c");
    }

    #[test]
    fn add_serialises_as_rfc6902() {
        let op = PatchOp::add(&["metadata", "labels"], serde_json::json!({"a": "1"}));
        assert_eq!(
            serde_json::to_value(&op).unwrap(),
            serde_json::json!({"op": "add", "path": "/metadata/labels", "value": {"a": "1"}})
        );
    }
}
