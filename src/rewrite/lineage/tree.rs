//! Reading libpg_query's parse tree as JSON: a node's kind and body, its
//! fields, lists and names.

use serde_json::Value;

/// `{"node": {"Kind": body}}` (or `{"Kind": body}`): the node's kind and body.
pub(super) fn kind(value: &Value) -> Option<(&str, &Value)> {
    let object = value.as_object()?;
    let inner = match object.get("node") {
        Some(node) if object.len() == 1 => node.as_object()?,
        _ => object,
    };
    let mut entries = inner.iter();
    match (entries.next(), entries.next()) {
        (Some((k, body)), None) if body.is_object() => Some((k.as_str(), body)),
        _ => None,
    }
}

pub(super) fn field<'v>(body: &'v Value, name: &str) -> &'v Value {
    body.get(name).unwrap_or(&Value::Null)
}

pub(super) fn list<'v>(body: &'v Value, name: &str) -> &'v [Value] {
    body.get(name)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

pub(super) fn text<'v>(body: &'v Value, name: &str) -> &'v str {
    body.get(name).and_then(Value::as_str).unwrap_or("")
}

/// The strings of a list of `String` nodes (names).
pub(super) fn names(nodes: &[Value]) -> Vec<String> {
    nodes
        .iter()
        .filter_map(|n| match kind(n) {
            Some(("String", body)) => Some(text(body, "sval").to_owned()),
            _ => None,
        })
        .collect()
}

/// The alias of a FROM item: its name and column names.
pub(super) fn alias(body: &Value) -> (Option<String>, Vec<String>) {
    let alias = field(body, "alias");
    let name = Some(text(alias, "aliasname")).filter(|n| !n.is_empty());
    (name.map(str::to_owned), names(list(alias, "colnames")))
}
