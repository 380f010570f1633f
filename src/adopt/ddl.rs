//! The schema steps of a table's transition (docs/ADOPTING.md, "Steps,
//! locks and how long they are held"), as SQL text. Every step is catalog
//! changes only: no statement here scans or rewrites the table, except the
//! VALIDATEs, which take locks that let reads and writes go on.

use crate::catalog::adoption::shadow_column;
use crate::catalog::envelope::{blind_index_constraint_name, constraint_name, ENVELOPE_PREFIX_HEX};
use crate::catalog::quote_ident;
use crate::config::{SearchMode, TablePolicy};
use crate::rewrite::quote_literal;

use super::shape::TableShape;

/// Tells every proxy LISTENing on `cmk_schema_change` to reload its catalog
/// when the step's transaction commits (without waiting for
/// `server.catalog_refresh`, with or without `migrate`'s event trigger).
/// Citus: the DDL that follows stays on the coordinator (in the step's
/// transaction).
const CITUS_LOCAL_DDL: &str = "SET LOCAL citus.enable_ddl_propagation = off";
/// Citus: DDL reaches the workers again.
const CITUS_PROPAGATED_DDL: &str = "SET LOCAL citus.enable_ddl_propagation = on";

fn notify(step: &str) -> String {
    format!(
        "NOTIFY {}, {}",
        crate::catalog::schema_notify::CHANNEL,
        quote_literal(step)
    )
}

/// Name of the CHECK that proves no legacy value is left, before the
/// legacy columns are dropped.
pub const NO_PLAINTEXT_CHECK: &str = "cmk_adopt_no_plaintext";

/// `name` with `suffix`, cut to PostgreSQL's 63-byte names.
fn suffixed(name: &str, suffix: &str) -> String {
    let mut base = name.to_owned();
    while base.len() + suffix.len() > 63 {
        base.pop();
    }
    format!("{base}{suffix}")
}

/// The relations and function a transition creates for a table `name`.
#[derive(Debug, Clone)]
pub struct Names {
    /// The real table while the view has the table's name.
    pub base: String,
    /// The view's name before the swap.
    pub transition_view: String,
    /// The INSTEAD OF trigger function.
    pub function: String,
}

impl Names {
    /// The names for table `name` (without schema).
    pub fn of(name: &str) -> Names {
        Names {
            base: suffixed(name, "__cmk_base"),
            transition_view: suffixed(name, "__cmk_transition"),
            function: suffixed(name, "__cmk_write"),
        }
    }
}

/// `true` when `cell` (an SQL bytea expression) starts with the envelope.
fn is_envelope(cell: &str) -> String {
    format!("substr({cell}, 1, 4) = '\\x{ENVELOPE_PREFIX_HEX}'::bytea")
}

/// A column of the final layout (what the view shows).
struct Shown<'a> {
    name: &'a str,
    /// Legacy type of a protected column.
    protected: Option<&'a str>,
    generated: bool,
}

/// The columns the view shows, in order: the table's own (protected ones
/// merged), then the EDEK and blind-index columns that are new.
fn shown<'a>(
    shape: &'a TableShape,
    policy: &'a TablePolicy,
    added: &'a [String],
) -> Vec<Shown<'a>> {
    let mut out: Vec<Shown<'a>> = shape
        .columns
        .iter()
        .map(|c| Shown {
            name: &c.name,
            protected: policy
                .columns
                .contains_key(&c.name)
                .then_some(c.type_name.as_str()),
            generated: c.generated,
        })
        .collect();
    out.extend(added.iter().map(|name| Shown {
        name,
        protected: None,
        generated: false,
    }));
    out
}

/// The EDEK and blind-index columns the legacy table lacks.
pub fn added_columns(shape: &TableShape, policy: &TablePolicy) -> Vec<String> {
    let mut wanted = vec![policy.edek_column.clone()];
    for (column, column_policy) in &policy.columns {
        if column_policy.search == SearchMode::Equality {
            wanted.push(format!("{column}_bidx"));
        }
    }
    wanted.retain(|c| shape.column(c).is_none());
    wanted
}

/// The value a reader of the view sees for protected column `c` of `b`.
fn merged(c: &str) -> String {
    format!(
        "coalesce(b.{}, convert_to(b.{}::text, 'UTF8'))",
        quote_ident(&shadow_column(c)),
        quote_ident(c)
    )
}

/// The prepare step: shadow, EDEK and blind-index columns, the envelope
/// CHECKs (NOT VALID: the shadow columns are empty), the transition view
/// with the table's defaults and grants, its INSTEAD OF trigger and the
/// `cmk.adoptions` row. One transaction, catalog changes only.
pub fn prepare(table: &str, shape: &TableShape, policy: &TablePolicy) -> Vec<String> {
    let names = Names::of(&shape.name);
    let relation = shape.relation(&shape.name);
    let view = shape.relation(&names.transition_view);
    let base = shape.relation(&names.base);
    let added = added_columns(shape, policy);
    let mut out = Vec::new();
    let mut adds: Vec<String> = policy
        .columns
        .keys()
        .map(|c| format!("ADD COLUMN {} bytea", quote_ident(&shadow_column(c))))
        .collect();
    for column in &added {
        let ty = if *column == policy.edek_column {
            "jsonb"
        } else {
            "bytea"
        };
        adds.push(format!("ADD COLUMN {} {ty}", quote_ident(column)));
    }
    out.push(format!("ALTER TABLE {relation} {}", adds.join(", ")));
    for column in policy.columns.keys() {
        out.push(format!(
            "ALTER TABLE {relation} ADD CONSTRAINT {} CHECK ({}) NOT VALID",
            quote_ident(&constraint_name(column)),
            is_envelope(&quote_ident(&shadow_column(column)))
        ));
    }
    // Every cell gets its blind index: lookups are answered once the table
    // is in its format and this is validated (docs/SEARCH.md).
    for column in searchable(policy) {
        out.push(format!(
            "ALTER TABLE {relation} ADD CONSTRAINT {} CHECK (({} IS NULL) = ({} IS NULL)) NOT VALID",
            quote_ident(&blind_index_constraint_name(column)),
            quote_ident(&shadow_column(column)),
            quote_ident(&format!("{column}_bidx"))
        ));
    }
    out.push(format!(
        "CREATE VIEW {view} WITH (security_invoker = true) AS {}",
        view_select(shape, policy, &added, &relation, true)
    ));
    out.extend(view_defaults_and_grants(shape, &view));
    out.push(trigger_function(shape, policy, &added, &base, &names));
    out.push(trigger(shape, &names, &view));
    out.push(format!(
        "INSERT INTO cmk.adoptions (table_name, phase, view_oid, base_oid, base_name) \
         VALUES ({}, 'prepared', {}::regclass::oid, {}, {})",
        quote_literal(table),
        quote_literal(&view),
        shape.oid,
        quote_literal(&names.base)
    ));
    out.push(notify("cmk-proxy encrypt: prepare"));
    out
}

/// The transition view's query over `relation`: every column in order,
/// protected ones `merged` (cell or legacy text) when `merge`, else as they
/// are (the view `decrypt` makes before the swap, over cells only).
fn view_select(
    shape: &TableShape,
    policy: &TablePolicy,
    added: &[String],
    relation: &str,
    merge: bool,
) -> String {
    let select: Vec<String> = shown(shape, policy, added)
        .iter()
        .map(|c| match c.protected {
            Some(_) if merge => format!("{} AS {}", merged(c.name), quote_ident(c.name)),
            _ => format!("b.{}", quote_ident(c.name)),
        })
        .collect();
    format!("SELECT {} FROM {relation} AS b", select.join(", "))
}

/// The table's column defaults and DML grants, copied to the view.
fn view_defaults_and_grants(shape: &TableShape, view: &str) -> Vec<String> {
    let mut defaults: Vec<String> = shape
        .columns
        .iter()
        .filter(|c| !c.generated)
        .filter_map(|c| {
            let default = c.default.as_ref()?;
            Some(format!(
                "ALTER VIEW {view} ALTER COLUMN {} SET DEFAULT {default}",
                quote_ident(&c.name)
            ))
        })
        .collect();
    // Citus propagates the view to its workers but refuses view defaults
    // there: they are set on the coordinator only, where the application's
    // statements are planned.
    if shape.distributed && !defaults.is_empty() {
        defaults.insert(0, CITUS_LOCAL_DDL.to_owned());
        defaults.push(CITUS_PROPAGATED_DDL.to_owned());
    }
    let mut out = defaults;
    for (grantee, privilege) in &shape.grants {
        let grantee = if grantee == "PUBLIC" {
            "PUBLIC".to_owned()
        } else {
            quote_ident(grantee)
        };
        out.push(format!("GRANT {privilege} ON {view} TO {grantee}"));
    }
    out
}

/// The INSTEAD OF trigger on the view.
fn trigger(shape: &TableShape, names: &Names, view: &str) -> String {
    format!(
        "CREATE TRIGGER cmk_write INSTEAD OF INSERT OR UPDATE OR DELETE ON {view} \
         FOR EACH ROW EXECUTE FUNCTION {}()",
        shape.relation(&names.function)
    )
}

/// The INSTEAD OF trigger of the view: writes go to the real table, cells
/// to the shadow columns, anything else to the legacy columns (to be sealed
/// by the converter); an UPDATE changes only the columns whose new value
/// differs from the one it read, against the row's latest version.
fn trigger_function(
    shape: &TableShape,
    policy: &TablePolicy,
    added: &[String],
    base: &str,
    names: &Names,
) -> String {
    let columns = shown(shape, policy, added);
    let writable: Vec<&Shown<'_>> = columns.iter().filter(|c| !c.generated).collect();
    let q = |name: &str| quote_ident(name);
    let envelope_new = |c: &str| is_envelope(&format!("NEW.{}", q(c)));
    let legacy_new = |c: &str, ty: &str| format!("convert_from(NEW.{}, 'UTF8')::{ty}", q(c));

    let mut insert_columns = Vec::new();
    let mut insert_values = Vec::new();
    let mut sets = Vec::new();
    // A written value is split into cell or legacy value in PL/pgSQL, not in
    // the INSERT or UPDATE: Citus evaluates the functions of a statement on a
    // distributed table before running it, whatever CASE guards them.
    let mut split = Vec::new();
    let mut declare = Vec::new();
    for (i, c) in writable.iter().enumerate() {
        let unchanged = format!("NEW.{0} IS NOT DISTINCT FROM OLD.{0}", q(c.name));
        match c.protected {
            Some(ty) => {
                let shadow = q(&shadow_column(c.name));
                declare.push(format!("cmk_new_cell{i} bytea; cmk_new_legacy{i} {ty};"));
                split.push(format!(
                    "cmk_new_cell{i} := CASE WHEN {0} THEN NEW.{1} END; \
                     cmk_new_legacy{i} := CASE WHEN NOT ({0}) THEN {2} END;",
                    envelope_new(c.name),
                    q(c.name),
                    legacy_new(c.name, ty)
                ));
                insert_columns.push(shadow.clone());
                insert_values.push(format!("cmk_new_cell{i}"));
                insert_columns.push(q(c.name));
                insert_values.push(format!("cmk_new_legacy{i}"));
                sets.push(format!(
                    "{shadow} = CASE WHEN {unchanged} THEN b.{shadow} ELSE cmk_new_cell{i} END"
                ));
                sets.push(format!(
                    "{0} = CASE WHEN {unchanged} THEN b.{0} ELSE cmk_new_legacy{i} END",
                    q(c.name)
                ));
            }
            None if c.name == policy.edek_column => {
                insert_columns.push(q(c.name));
                insert_values.push(format!("NEW.{}", q(c.name)));
                // EDEK copies are merged, never dropped.
                sets.push(format!(
                    "{0} = CASE WHEN {unchanged} THEN b.{0} ELSE coalesce(b.{0}, '{{}}'::jsonb) || coalesce(NEW.{0}, '{{}}'::jsonb) END",
                    q(c.name)
                ));
            }
            None => {
                insert_columns.push(q(c.name));
                insert_values.push(format!("NEW.{}", q(c.name)));
                sets.push(format!(
                    "{0} = CASE WHEN {unchanged} THEN b.{0} ELSE NEW.{0} END",
                    q(c.name)
                ));
            }
        }
    }
    // The row written is read back raw and merged in PL/pgSQL: Citus allows
    // no STABLE function (convert_to) in the RETURNING of a distributed table.
    let mut returning = Vec::new();
    let mut into = Vec::new();
    let mut merge = Vec::new();
    for (i, c) in columns.iter().enumerate() {
        match c.protected {
            Some(ty) => {
                returning.push(format!("b.{}", q(&shadow_column(c.name))));
                returning.push(format!("b.{}", q(c.name)));
                into.push(format!("cmk_cell{i}"));
                into.push(format!("cmk_legacy{i}"));
                declare.push(format!("cmk_cell{i} bytea; cmk_legacy{i} {ty};"));
                merge.push(format!(
                    "NEW.{} := coalesce(cmk_cell{i}, convert_to(cmk_legacy{i}::text, 'UTF8'));",
                    q(c.name)
                ));
            }
            None => {
                returning.push(format!("b.{}", q(c.name)));
                into.push(format!("NEW.{}", q(c.name)));
            }
        }
    }
    let key: Vec<String> = shape
        .primary_key
        .iter()
        .map(|k| format!("b.{0} = OLD.{0}", q(k)))
        .collect();
    let overriding = if shape.columns.iter().any(|c| c.identity) {
        " OVERRIDING SYSTEM VALUE"
    } else {
        ""
    };
    format!(
        "CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $cmk$\n\
         DECLARE {declare}\n\
         BEGIN\n\
         IF TG_OP = 'INSERT' THEN\n\
           {split}\n\
           INSERT INTO {base} AS b ({insert_columns}){overriding} VALUES ({insert_values})\n\
             RETURNING {returning} INTO {into};\n\
           {merge}\n\
           RETURN NEW;\n\
         ELSIF TG_OP = 'UPDATE' THEN\n\
           {split}\n\
           UPDATE {base} AS b SET {sets} WHERE {key}\n\
             RETURNING {returning} INTO {into};\n\
           IF NOT FOUND THEN RETURN NULL; END IF;\n\
           {merge}\n\
           RETURN NEW;\n\
         ELSE\n\
           DELETE FROM {base} AS b WHERE {key};\n\
           IF NOT FOUND THEN RETURN NULL; END IF;\n\
           RETURN OLD;\n\
         END IF;\n\
         END\n\
         $cmk$",
        function = shape.relation(&names.function),
        insert_columns = insert_columns.join(", "),
        insert_values = insert_values.join(", "),
        returning = returning.join(", "),
        into = into.join(", "),
        declare = declare.join(" "),
        split = split.join(" "),
        merge = merge.join(" "),
        sets = sets.join(", "),
        key = key.join(" AND "),
    )
}

/// The swap: the real table steps aside, the view takes its name. The
/// table is still named `name` here.
pub fn swap(table: &str, schema_shape: &TableShape) -> Vec<String> {
    let names = Names::of(&schema_shape.name);
    vec![
        format!(
            "ALTER TABLE {} RENAME TO {}",
            schema_shape.relation(&schema_shape.name),
            quote_ident(&names.base)
        ),
        format!(
            "ALTER VIEW {} RENAME TO {}",
            schema_shape.relation(&names.transition_view),
            quote_ident(&schema_shape.name)
        ),
        format!(
            "UPDATE cmk.adoptions SET phase = 'converting', updated_at = now() WHERE table_name = {}",
            quote_literal(table)
        ),
        notify("cmk-proxy encrypt: swap"),
    ]
}

/// The CHECK that proves the legacy columns empty (added NOT VALID, then
/// validated without blocking writes), on the real table `base`.
pub fn no_plaintext_check(base: &str, policy: &TablePolicy) -> String {
    let empty: Vec<String> = policy
        .columns
        .keys()
        .map(|c| format!("{} IS NULL", quote_ident(c)))
        .collect();
    format!(
        "ALTER TABLE {base} ADD CONSTRAINT {NO_PLAINTEXT_CHECK} CHECK ({}) NOT VALID",
        empty.join(" AND ")
    )
}

/// The finish: the view and its function go, the real table takes its name
/// back, the (empty) legacy columns are dropped and the shadow columns take
/// their names, the adoption row goes.
pub fn finish(table: &str, schema: &str, name: &str, policy: &TablePolicy) -> Vec<String> {
    let names = Names::of(name);
    let rel = |n: &str| format!("{}.{}", quote_ident(schema), quote_ident(n));
    let relation = rel(name);
    let mut out = vec![
        format!("DROP VIEW {relation}"),
        format!("DROP FUNCTION {}()", rel(&names.function)),
        format!(
            "ALTER TABLE {} RENAME TO {}",
            rel(&names.base),
            quote_ident(name)
        ),
        format!("ALTER TABLE {relation} DROP CONSTRAINT {NO_PLAINTEXT_CHECK}"),
    ];
    let drops: Vec<String> = policy
        .columns
        .keys()
        .map(|c| format!("DROP COLUMN {}", quote_ident(c)))
        .collect();
    out.push(format!("ALTER TABLE {relation} {}", drops.join(", ")));
    for column in policy.columns.keys() {
        out.push(format!(
            "ALTER TABLE {relation} RENAME COLUMN {} TO {}",
            quote_ident(&shadow_column(column)),
            quote_ident(column)
        ));
    }
    out.push(format!(
        "DELETE FROM cmk.adoptions WHERE table_name = {}",
        quote_literal(table)
    ));
    out.push(notify("cmk-proxy encrypt: finish"));
    out
}

/// VALIDATE of the envelope (and blind-index) CHECKs once the table is in
/// its format.
pub fn validate_envelopes(relation: &str, policy: &TablePolicy) -> Vec<String> {
    let envelopes = policy.columns.keys().map(|c| constraint_name(c));
    let indexes = searchable(policy).map(blind_index_constraint_name);
    envelopes
        .chain(indexes)
        .map(|name| {
            format!(
                "ALTER TABLE {relation} VALIDATE CONSTRAINT {}",
                quote_ident(&name)
            )
        })
        .collect()
}

/// The policy's `search: equality` columns.
fn searchable(policy: &TablePolicy) -> impl Iterator<Item = &str> {
    policy
        .columns
        .iter()
        .filter(|(_, p)| p.search == crate::config::SearchMode::Equality)
        .map(|(c, _)| c.as_str())
}

/// The table as the transition sees it on the way back: the table in the
/// policy's format (`shape`) with its protected columns of their declared
/// (legacy) types, which `decrypt` adds back beside the cells.
pub fn legacy_shape(shape: &TableShape, policy: &TablePolicy) -> TableShape {
    let mut legacy = shape.clone();
    for column in &mut legacy.columns {
        if let Some(column_policy) = policy.columns.get(&column.name) {
            column.type_name = column_policy.ty.sql_name().to_owned();
        }
    }
    legacy
}

/// `decrypt`'s prepare: the transition view beside the table in its format,
/// showing its columns as they are (cells), with the table's defaults and
/// grants, and the `cmk.adoptions` row in phase `leaving`. Proxies map the
/// view before it takes the table's name. Catalog changes only.
pub fn prepare_leaving(table: &str, shape: &TableShape, policy: &TablePolicy) -> Vec<String> {
    let names = Names::of(&shape.name);
    let relation = shape.relation(&shape.name);
    let view = shape.relation(&names.transition_view);
    let mut out = vec![format!(
        "CREATE VIEW {view} WITH (security_invoker = true) AS {}",
        view_select(shape, policy, &[], &relation, false)
    )];
    out.extend(view_defaults_and_grants(shape, &view));
    out.push(format!(
        "INSERT INTO cmk.adoptions (table_name, phase, view_oid, base_oid, base_name) \
         VALUES ({}, 'leaving', {}::regclass::oid, {}, {})",
        quote_literal(table),
        quote_literal(&view),
        shape.oid,
        quote_literal(&names.base)
    ));
    out.push(notify("cmk-proxy decrypt: prepare"));
    out
}

/// `decrypt`'s swap, into the same transition state as `encrypt`'s: the
/// table steps aside, its cell columns take their shadow names (same
/// attribute numbers, so the envelope CHECKs and every proxy's map follow
/// them), legacy-typed columns are added (nullable, no default: catalog
/// only), the view shows cell or legacy value and gets its trigger, then
/// takes the table's name. `shape` is the table in its format.
pub fn swap_leaving(table: &str, shape: &TableShape, policy: &TablePolicy) -> Vec<String> {
    let names = Names::of(&shape.name);
    let base = shape.relation(&names.base);
    let view = shape.relation(&names.transition_view);
    let legacy = legacy_shape(shape, policy);
    let mut out = vec![format!(
        "ALTER TABLE {} RENAME TO {}",
        shape.relation(&shape.name),
        quote_ident(&names.base)
    )];
    // Cells are emptied on the way back while their blind indexes stay
    // until the finish drops them (lookups are refused meanwhile).
    for column in searchable(policy) {
        out.push(format!(
            "ALTER TABLE {base} DROP CONSTRAINT IF EXISTS {}",
            quote_ident(&blind_index_constraint_name(column))
        ));
    }
    for column in policy.columns.keys() {
        out.push(format!(
            "ALTER TABLE {base} RENAME COLUMN {} TO {}",
            quote_ident(column),
            quote_ident(&shadow_column(column))
        ));
    }
    let adds: Vec<String> = policy
        .columns
        .iter()
        .map(|(c, p)| format!("ADD COLUMN {} {}", quote_ident(c), p.ty.sql_name()))
        .collect();
    out.push(format!("ALTER TABLE {base} {}", adds.join(", ")));
    out.push(format!(
        "CREATE OR REPLACE VIEW {view} WITH (security_invoker = true) AS {}",
        view_select(&legacy, policy, &[], &base, true)
    ));
    out.push(trigger_function(&legacy, policy, &[], &base, &names));
    out.push(trigger(shape, &names, &view));
    out.push(format!(
        "ALTER VIEW {view} RENAME TO {}",
        quote_ident(&shape.name)
    ));
    out.push(format!(
        "UPDATE cmk.adoptions SET phase = 'converting', updated_at = now() WHERE table_name = {}",
        quote_literal(table)
    ));
    out.push(notify("cmk-proxy decrypt: swap"));
    out
}

/// The partial index that finds the cells left on the way back, so the
/// finish checks them in milliseconds under its lock (built CONCURRENTLY).
pub fn cells_left_index(base: &str, name: &str, policy: &TablePolicy, key: &[String]) -> String {
    let left: Vec<String> = policy
        .columns
        .keys()
        .map(|c| format!("{} IS NOT NULL", quote_ident(&shadow_column(c))))
        .collect();
    let key: Vec<String> = key.iter().map(|k| quote_ident(k)).collect();
    format!(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {base} ({}) WHERE {}",
        quote_ident(&cells_left_index_name(name)),
        key.join(", "),
        left.join(" OR ")
    )
}

/// Name of the index of `cells_left_index`.
pub fn cells_left_index_name(name: &str) -> String {
    suffixed(name, "__cmk_cells_left")
}

/// `decrypt`'s finish (no cell left): the view and its function go, the
/// real table takes its name back, the cell, EDEK and blind-index columns
/// are dropped (catalog only), the adoption row goes. The table is then a
/// legacy table: proxies pass its statements through.
pub fn finish_leaving(table: &str, schema: &str, name: &str, policy: &TablePolicy) -> Vec<String> {
    let names = Names::of(name);
    let rel = |n: &str| format!("{}.{}", quote_ident(schema), quote_ident(n));
    let relation = rel(name);
    let mut drops: Vec<String> = policy
        .columns
        .keys()
        .map(|c| format!("DROP COLUMN {}", quote_ident(&shadow_column(c))))
        .collect();
    for (column, column_policy) in &policy.columns {
        if column_policy.search == SearchMode::Equality {
            drops.push(format!(
                "DROP COLUMN IF EXISTS {}",
                quote_ident(&format!("{column}_bidx"))
            ));
        }
    }
    drops.push(format!(
        "DROP COLUMN IF EXISTS {}",
        quote_ident(&policy.edek_column)
    ));
    vec![
        format!("DROP VIEW {relation}"),
        format!("DROP FUNCTION {}()", rel(&names.function)),
        format!(
            "ALTER TABLE {} RENAME TO {}",
            rel(&names.base),
            quote_ident(name)
        ),
        format!("ALTER TABLE {relation} {}", drops.join(", ")),
        format!(
            "DELETE FROM cmk.adoptions WHERE table_name = {}",
            quote_literal(table)
        ),
        notify("cmk-proxy decrypt: finish"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_postgresql() {
        let names = Names::of(&"t".repeat(70));
        assert!(names.base.len() <= 63 && names.base.ends_with("__cmk_base"));
        assert_eq!(
            Names::of("patients").transition_view,
            "patients__cmk_transition"
        );
    }
}
