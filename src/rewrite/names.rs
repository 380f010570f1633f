//! Resolving SQL names against the policy: table names to `schema.table`
//! policy keys, and column references to protected columns.

use sqlparser::ast::{Ident, ObjectName};

use crate::config::{Policy, TablePolicy};

/// The normalized name of an identifier (unquoted names fold to lower case).
pub fn ident_name(ident: &Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_lowercase()
    }
}

/// The policy table an object name refers to (unqualified names: the
/// `public` one, else a policy table of that name in any schema).
pub fn policy_table<'p>(
    policy: &'p Policy,
    name: &ObjectName,
) -> Option<(&'p str, &'p TablePolicy)> {
    let key = relation_key(name)?;
    if let Some((k, v)) = policy.tables.get_key_value(&key) {
        return Some((k.as_str(), v));
    }
    // An unqualified name may find a policy table in another schema on
    // the session's search_path: it is taken as that table (the safe
    // reading; the proxy does not follow search_path).
    // Two policy tables of that name: the first is taken; `ambiguous_table`
    // lets the planner refuse the statement instead.
    let bare = unqualified(name)?;
    let key = keys_named(policy.tables.keys(), &bare).next()?;
    policy
        .tables
        .get_key_value(key)
        .map(|(k, v)| (k.as_str(), v))
}

/// The `schema.relation` keys among `keys` whose relation is `bare`.
pub fn keys_named<'k, 'b>(
    keys: impl Iterator<Item = &'k String> + 'b,
    bare: &'b str,
) -> impl Iterator<Item = &'k String> + 'b
where
    'k: 'b,
{
    keys.filter(move |k| k.rsplit('.').next() == Some(bare))
}

/// The first of `keys` whose relation name `sql` contains anywhere.
pub fn mentioned_key<'k>(mut keys: impl Iterator<Item = &'k String>, sql: &str) -> Option<String> {
    let lower = sql.to_lowercase();
    keys.find(|key| {
        let relation = key.rsplit('.').next().unwrap_or(key);
        lower.contains(&relation.to_lowercase())
    })
    .cloned()
}

/// An unqualified name that matches more than one policy table: which one
/// the session means depends on its search_path, which the proxy does not
/// follow.
pub fn ambiguous_table(policy: &Policy, name: &ObjectName) -> bool {
    let Some(bare) = unqualified(name) else {
        return false;
    };
    keys_named(policy.tables.keys(), &bare).count() > 1
}

/// The last part of a name, normalized (`s.t` → `t`).
pub fn last_name(name: &ObjectName) -> Option<String> {
    name.0.last().and_then(|p| p.as_ident()).map(ident_name)
}

/// The name of an unqualified object name, normalized.
pub fn unqualified(name: &ObjectName) -> Option<String> {
    match name.0.as_slice() {
        [part] => part.as_ident().map(ident_name),
        _ => None,
    }
}

/// `schema.relation` for an object name (unqualified names are taken from
/// the `public` schema, the default search_path).
pub fn relation_key(name: &ObjectName) -> Option<String> {
    let parts: Vec<String> = name
        .0
        .iter()
        .filter_map(|p| p.as_ident().map(ident_name))
        .collect();
    match parts.as_slice() {
        [table] => Some(format!("public.{table}")),
        [schema, table] | [_, schema, table] => Some(format!("{schema}.{table}")),
        _ => None,
    }
}

/// True if `sql` names a policy table anywhere (used when parsing fails:
/// unparseable SQL that may touch a protected table is refused).
pub fn mentions_policy_table(policy: &Policy, sql: &str) -> Option<String> {
    mentioned_key(policy.tables.keys(), sql)
}
