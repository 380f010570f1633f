//! The live schema behind the policy: which (table OID, attribute number)
//! pairs are protected columns, EDEK columns or blind indexes, and what is
//! wrong with the schema for the policy, with the DDL that fixes it.
//! Reads the catalog through a tokio-postgres client; knows no sockets of
//! sessions and no keys.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::config::{split_table_name, DeclaredType, Policy, SearchMode, TablePolicy};
use crate::rewrite::SchemaFacts;

pub mod adoption;
mod citus;
pub mod envelope;
mod problems;
pub mod schema_notify;
pub mod search_index;

use adoption::{Adoption, Phase};
use citus::{refuse_citus_shards, warn_of_citus_router_results};
use problems::schema_problems;
pub use problems::{check_schema, SchemaProblem};

/// What a protected table column is for the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnRole {
    /// An encrypted column with its declared plaintext type.
    Protected(DeclaredType),
    /// The row's EDEK column.
    Edek,
    /// The blind index of a searchable column.
    BlindIndex,
    /// The row's tenant column.
    Tenant,
}

/// A column of a policy table, as found in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnRef {
    /// `schema.table` as written in the policy.
    pub table: Arc<str>,
    /// Column name.
    pub column: Arc<str>,
    /// Its role.
    pub role: ColumnRole,
}

/// (table OID, attnum) → policy column, for RowDescription lookups. Views
/// (and materialized views) whose columns PostgreSQL traces back to a
/// protected column are mapped to that column too.
#[derive(Debug, Clone, Default)]
pub struct CatalogMap {
    by_attr: HashMap<(u32, i16), ColumnRef>,
    table_oids: BTreeMap<Arc<str>, u32>,
    facts: SchemaFacts,
    /// Policy tables that still hold legacy plaintext (not yet swapped to
    /// their transition view): passed through untouched.
    legacy: BTreeSet<String>,
    /// Policy tables in transition: their cells may be legacy plaintext.
    transition: BTreeSet<String>,
    /// The policy without the legacy tables, when there are any.
    analysis_policy: Option<AnalysisPolicy>,
    /// A table's transition view is about to take its name.
    awaiting_swap: bool,
    /// The database is a Citus coordinator: the RowDescription of an
    /// execution may name no column origins (see `traces_by_statement`).
    citus: bool,
}

/// Two maps are equal when statements planned with one plan alike with the
/// other (the analysis policy follows from the policy and `legacy`).
impl PartialEq for CatalogMap {
    fn eq(&self, other: &Self) -> bool {
        self.by_attr == other.by_attr
            && self.table_oids == other.table_oids
            && self.facts == other.facts
            && self.legacy == other.legacy
            && self.transition == other.transition
            && self.awaiting_swap == other.awaiting_swap
            && self.citus == other.citus
    }
}

impl CatalogMap {
    /// The policy column behind a result field, if any.
    pub fn lookup(&self, table_oid: u32, attnum: i16) -> Option<&ColumnRef> {
        if table_oid == 0 {
            return None;
        }
        self.by_attr.get(&(table_oid, attnum))
    }

    /// OID of a policy table (`schema.table`).
    pub fn table_oid(&self, table: &str) -> Option<u32> {
        self.table_oids.get(table).copied()
    }

    /// What statement analysis must know of the live schema: views over
    /// protected columns, and policy tables that must not be written.
    pub fn schema_facts(&self) -> &SchemaFacts {
        &self.facts
    }

    /// True for a policy table in transition from legacy plaintext, whose
    /// non-envelope cells are its legacy values (docs/ADOPTING.md).
    pub fn in_transition(&self, table: &str) -> bool {
        self.transition.contains(table)
    }

    /// True for a policy table that still holds legacy plaintext: its
    /// statements pass through untouched until `cmk-proxy encrypt` swaps it.
    pub fn is_legacy(&self, table: &str) -> bool {
        self.legacy.contains(table)
    }

    /// True while a table's transition view is about to take its name: the
    /// proxy then reloads the catalog often, so it plans statements on the
    /// table as the view's soon after the swap.
    pub fn awaiting_swap(&self) -> bool {
        self.awaiting_swap
    }

    /// Results must be traced through a Describe of their statement:
    /// Citus answers a router (single-shard) execution with a
    /// RowDescription whose columns name no table (its planner rebuilds the
    /// target list), while the statement's own description, made from the
    /// analysed query before planning, names them.
    pub fn traces_by_statement(&self) -> bool {
        self.citus
    }

    /// The policy statements are analysed against: `full` without the
    /// legacy tables.
    pub fn analysis_policy<'a>(&'a self, full: &'a Policy) -> &'a Policy {
        self.analysis_policy.as_ref().map_or(full, |p| &p.0)
    }

    /// Number of mapped columns.
    pub fn len(&self) -> usize {
        self.by_attr.len()
    }

    /// True when no column is mapped (no policy tables).
    pub fn is_empty(&self) -> bool {
        self.by_attr.is_empty()
    }
}

/// The policy without the legacy tables. Equal to any other: it follows
/// from the policy and `CatalogMap::legacy`, which is compared.
#[derive(Debug, Clone)]
struct AnalysisPolicy(Arc<Policy>);

impl PartialEq for AnalysisPolicy {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for AnalysisPolicy {}

/// Reading the catalog failed.
#[derive(Debug, thiserror::Error)]
#[error("reading the schema of the policy tables: {}", crate::pg_error::text(.0))]
pub struct CatalogError(#[from] tokio_postgres::Error);

/// One attribute of a policy table.
struct Attr {
    attnum: i16,
    type_name: String,
    has_default: bool,
    /// Its type reads an untyped literal otherwise than a parameter (see
    /// `SchemaFacts::literal_sensitive`).
    literal_sensitive: bool,
}

struct TableInfo {
    oid: u32,
    /// `pg_class.relkind`: `r`, `p` or `v` (a transition view).
    kind: String,
    attrs: HashMap<String, Attr>,
}

/// Where a policy table stands between legacy plaintext and its format.
enum TableState<'a> {
    /// In the policy's format (or wrong in ways `schema_problems` reports).
    Normal,
    /// Legacy plaintext, possibly with an adoption prepared.
    Legacy(Option<&'a Adoption>),
    /// In the policy's format, with the transition view of `decrypt` made
    /// beside it (not swapped in yet).
    Leaving(&'a Adoption),
    /// Its name is the transition view's.
    Transition(&'a Adoption),
}

/// A legacy table: no protected column is bytea and there is no EDEK column.
fn holds_legacy_plaintext(info: &TableInfo, table_policy: &TablePolicy) -> bool {
    !info.attrs.contains_key(&table_policy.edek_column)
        && table_policy.columns.keys().all(|column| {
            info.attrs
                .get(column)
                .is_some_and(|attr| attr.type_name != "bytea")
        })
}

fn table_state<'a>(
    name: &str,
    info: &TableInfo,
    table_policy: &TablePolicy,
    adoptions: &'a HashMap<String, Adoption>,
) -> TableState<'a> {
    match adoptions.get(name) {
        Some(adoption) if info.oid == adoption.view_oid => TableState::Transition(adoption),
        Some(adoption) if adoption.phase == Phase::Leaving => TableState::Leaving(adoption),
        Some(adoption) if adoption.phase == Phase::Prepared => TableState::Legacy(Some(adoption)),
        _ if holds_legacy_plaintext(info, table_policy) => TableState::Legacy(None),
        _ => TableState::Normal,
    }
}

/// Searchable columns (`schema.table.column`) with a validated blind-index
/// CHECK (`envelope::CheckKind::BlindIndex`): every value has its index.
async fn indexed_columns(
    client: &tokio_postgres::Client,
    policy: &Policy,
) -> Result<std::collections::HashSet<String>, CatalogError> {
    use envelope::{blind_index_constraint_name, check_clause, CheckKind};
    let rows = client
        .query(
            "SELECT n.nspname || '.' || c.relname, k.conname::text, pg_catalog.pg_get_constraintdef(k.oid) \
             FROM pg_catalog.pg_constraint k \
             JOIN pg_catalog.pg_class c ON c.oid = k.conrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE k.contype = 'c' AND k.convalidated AND k.conname LIKE 'cmk\\_bidx\\_%'",
            &[],
        )
        .await?;
    let found: BTreeSet<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let mut out = std::collections::HashSet::new();
    for (table, table_policy) in &policy.tables {
        for (column, column_policy) in &table_policy.columns {
            let wanted = (
                table.clone(),
                blind_index_constraint_name(column),
                check_clause(CheckKind::BlindIndex, column),
            );
            if column_policy.search == SearchMode::Equality && found.contains(&wanted) {
                out.insert(format!("{table}.{column}"));
            }
        }
    }
    Ok(out)
}

pub(crate) fn quote_ident(name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if plain {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

pub(crate) fn qualified(table: &str) -> String {
    match split_table_name(table) {
        Some((schema, name)) => format!("{}.{}", quote_ident(schema), quote_ident(name)),
        None => quote_ident(table),
    }
}

/// The policy tables by name (a transition view counts for its table when
/// `views` names its OID), and the relations of `oids` by OID.
async fn read_tables(
    client: &tokio_postgres::Client,
    policy: &Policy,
    views: &[u32],
    oids: &[u32],
) -> Result<(HashMap<String, TableInfo>, HashMap<u32, TableInfo>), CatalogError> {
    let names: Vec<String> = policy.tables.keys().cloned().collect();
    let rows = client
        .query(
            "SELECT n.nspname || '.' || c.relname, c.oid, a.attnum, a.attname::text, \
                    format_type(a.atttypid, NULL), a.atthasdef, \
                    (a.atttypmod <> -1 AND coalesce(nullif(t.typelem, 0), t.oid) = 'pg_catalog.interval'::regtype) \
                      OR t.typtype = 'd' OR coalesce(e.typtype = 'd', false), \
                    c.relkind::text, \
                    n.nspname || '.' || c.relname = ANY($1::text[]) \
                      AND (c.relkind IN ('r', 'p') OR c.oid = ANY($2::oid[])) \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_catalog.pg_type e ON e.oid = t.typelem AND t.typelem <> 0 \
             WHERE (n.nspname || '.' || c.relname = ANY($1::text[]) \
                    AND (c.relkind IN ('r', 'p') OR c.oid = ANY($2::oid[]))) \
                OR c.oid = ANY($3::oid[])",
            &[&names, &views, &oids],
        )
        .await?;
    let mut tables: HashMap<String, TableInfo> = HashMap::new();
    let mut by_oid: HashMap<u32, TableInfo> = HashMap::new();
    for row in rows {
        let table: String = row.get(0);
        let oid: u32 = row.get(1);
        let kind: String = row.get(7);
        let by_name: bool = row.get(8);
        let attr = || Attr {
            attnum: row.get(2),
            type_name: row.get(4),
            has_default: row.get(5),
            literal_sensitive: row.get(6),
        };
        let new = || TableInfo {
            oid,
            kind: kind.clone(),
            attrs: HashMap::new(),
        };
        if by_name {
            tables
                .entry(table)
                .or_insert_with(new)
                .attrs
                .insert(row.get(3), attr());
        }
        if oids.contains(&oid) {
            by_oid
                .entry(oid)
                .or_insert_with(new)
                .attrs
                .insert(row.get(3), attr());
        }
    }
    Ok((tables, by_oid))
}

/// The policy tables with their state: the adoptions, the tables by name,
/// the relations of adoptions by OID.
async fn read_policy_tables(
    client: &tokio_postgres::Client,
    policy: &Policy,
) -> Result<
    (
        HashMap<String, Adoption>,
        HashMap<String, TableInfo>,
        HashMap<u32, TableInfo>,
    ),
    CatalogError,
> {
    let adoptions: HashMap<String, Adoption> = adoption::adoptions(client)
        .await?
        .into_iter()
        .filter(|(name, _)| policy.tables.contains_key(name))
        .collect();
    let views: Vec<u32> = adoptions.values().map(|a| a.view_oid).collect();
    let oids: Vec<u32> = adoptions
        .values()
        .flat_map(|a| [a.view_oid, a.base_oid])
        .collect();
    let (tables, by_oid) = read_tables(client, policy, &views, &oids).await?;
    Ok((adoptions, tables, by_oid))
}

/// Maps the columns of `relation` (a transition view or the real table of a
/// table in transition) for the policy table `table`: protected columns by
/// their name or their shadow's, the EDEK column and blind indexes.
fn map_relation(
    map: &mut CatalogMap,
    table: &Arc<str>,
    table_policy: &TablePolicy,
    relation: &TableInfo,
) {
    let mut add = |column: &str, role: ColumnRole, key: &str| {
        if let Some(attr) = relation.attrs.get(key) {
            map.by_attr.insert(
                (relation.oid, attr.attnum),
                ColumnRef {
                    table: table.clone(),
                    column: Arc::from(column),
                    role,
                },
            );
        }
    };
    for (column, column_policy) in &table_policy.columns {
        let role = ColumnRole::Protected(column_policy.ty);
        if relation.kind == "v" {
            add(column, role, column);
        } else {
            add(column, role, &adoption::shadow_column(column));
        }
        if column_policy.search == SearchMode::Equality {
            let bidx = format!("{column}_bidx");
            add(&bidx, ColumnRole::BlindIndex, &bidx);
        }
    }
    add(
        &table_policy.edek_column,
        ColumnRole::Edek,
        &table_policy.edek_column,
    );
}

/// Builds the (OID, attnum) map for the policy tables that exist.
pub async fn load_map(
    client: &tokio_postgres::Client,
    policy_in: &Policy,
) -> Result<CatalogMap, CatalogError> {
    let policy = policy_in;
    let (adoptions, mut tables, by_oid) = read_policy_tables(client, policy).await?;
    let mut map = CatalogMap::default();
    for (name, table_policy) in &policy.tables {
        let Some(info) = tables.get(name) else {
            continue;
        };
        let table: Arc<str> = Arc::from(name.as_str());
        match table_state(name, info, table_policy, &adoptions) {
            TableState::Normal => continue,
            TableState::Legacy(adoption) => {
                tracing::warn!(
                    table = %name,
                    "policy table holds legacy plaintext: its statements pass through untouched until cmk-proxy encrypt converts it (docs/ADOPTING.md)"
                );
                map.legacy.insert(name.clone());
                // The transition view, known before it takes the table's
                // name, so its rows are opened (legacy values served) from
                // the first moment.
                if let Some(view) = adoption.and_then(|a| by_oid.get(&a.view_oid)) {
                    map_relation(&mut map, &table, table_policy, view);
                    map.transition.insert(name.clone());
                    map.facts.unindexed.insert(name.clone());
                    map.awaiting_swap = true;
                }
            }
            TableState::Leaving(adoption) => {
                tracing::warn!(
                    table = %name,
                    "policy table about to leave the policy's format (cmk-proxy decrypt): its transition view is mapped before it takes the table's name"
                );
                // Served as usual; the view is known before the swap, so its
                // rows are opened (and its legacy values served) from then.
                if let Some(view) = by_oid.get(&adoption.view_oid) {
                    map_relation(&mut map, &table, table_policy, view);
                    map.transition.insert(name.clone());
                    map.awaiting_swap = true;
                }
            }
            TableState::Transition(adoption) => {
                tracing::warn!(
                    table = %name,
                    base = %adoption.base_name,
                    "policy table in transition from legacy plaintext (cmk-proxy encrypt): legacy values are served until it finishes"
                );
                map.transition.insert(name.clone());
                map.facts.unindexed.insert(name.clone());
                // The real table, which takes the name back at the end.
                if let Some(base) = by_oid.get(&adoption.base_oid) {
                    map_relation(&mut map, &table, table_policy, base);
                }
            }
        }
    }
    tables.retain(|name, _| !map.legacy.contains(name));
    if !map.legacy.is_empty() {
        let mut analysed = policy.clone();
        analysed.tables.retain(|name, _| !map.legacy.contains(name));
        map.analysis_policy = Some(AnalysisPolicy(Arc::new(analysed)));
    }
    let policy = map.analysis_policy.clone();
    let policy = policy.as_ref().map_or(policy_in, |p| &p.0);
    for problem in schema_problems(policy, &tables) {
        tracing::error!(
            location = %problem.location,
            fix = problem.fix.as_deref().unwrap_or("-"),
            "the schema does not match the policy: {}; writes to this table are refused until it is fixed (cmk-proxy check-config --live)",
            problem.message
        );
        let table = policy
            .tables
            .keys()
            .find(|t| problem.location == **t || problem.location.starts_with(&format!("{t}.")))
            .cloned()
            .unwrap_or_else(|| problem.location.clone());
        map.facts
            .unwritable
            .entry(table)
            .or_insert_with(|| format!("{}: {}", problem.location, problem.message));
    }
    map.facts.indexed_columns = indexed_columns(client, policy).await?;
    for (name, table_policy) in &policy.tables {
        let Some(info) = tables.get(name) else {
            continue;
        };
        let table: Arc<str> = Arc::from(name.as_str());
        map.table_oids.insert(table.clone(), info.oid);
        if info.attrs.values().any(|a| a.literal_sensitive) {
            map.facts.literal_sensitive.insert(name.clone());
        }
        let mut add = |column: &str, role: ColumnRole| {
            if let Some(attr) = info.attrs.get(column) {
                map.by_attr.insert(
                    (info.oid, attr.attnum),
                    ColumnRef {
                        table: table.clone(),
                        column: Arc::from(column),
                        role,
                    },
                );
            }
        };
        for (column, column_policy) in &table_policy.columns {
            add(column, ColumnRole::Protected(column_policy.ty));
            if column_policy.search == SearchMode::Equality {
                add(&format!("{column}_bidx"), ColumnRole::BlindIndex);
            }
        }
        add(&table_policy.edek_column, ColumnRole::Edek);
        add(&table_policy.tenant_column, ColumnRole::Tenant);
    }
    let children = map_children(client, &mut map).await?;
    refuse_citus_shards(client, &mut map).await?;
    map_views(client, &mut map, &children).await?;
    warn_of_citus_router_results(client).await?;
    Ok(map)
}

/// Partitions and inheritance children of policy tables, at any depth:
/// statements naming a child directly are refused (its cells would be
/// written or read unseen). Their columns are mapped by name to the policy
/// table's, so views over a child are found and mapped like views over the
/// table. Returns the children's OIDs.
async fn map_children(
    client: &tokio_postgres::Client,
    map: &mut CatalogMap,
) -> Result<Vec<u32>, CatalogError> {
    let parents: Vec<u32> = map.table_oids.values().copied().collect();
    let rows = client
        .query(
            "WITH RECURSIVE kids(child, parent) AS ( \
                 SELECT inhrelid, inhparent FROM pg_catalog.pg_inherits WHERE inhparent = ANY($1::oid[]) \
                 UNION SELECT i.inhrelid, k.parent FROM pg_catalog.pg_inherits i JOIN kids k ON i.inhparent = k.child) \
             SELECT n.nspname || '.' || c.relname, p_n.nspname || '.' || p.relname, c.oid, p.oid \
             FROM kids \
             JOIN pg_catalog.pg_class c ON c.oid = kids.child \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_catalog.pg_class p ON p.oid = kids.parent \
             JOIN pg_catalog.pg_namespace p_n ON p_n.oid = p.relnamespace",
            &[&parents],
        )
        .await?;
    let mut children = Vec::new();
    let mut parent_of = HashMap::new();
    for row in rows {
        map.facts.children.insert(row.get(0), row.get(1));
        let child: u32 = row.get(2);
        children.push(child);
        parent_of.insert(child, row.get::<_, u32>(3));
    }
    if children.is_empty() {
        return Ok(children);
    }
    // Parent (OID, column name) → its policy column.
    let by_name: HashMap<(u32, Arc<str>), ColumnRef> = map
        .by_attr
        .iter()
        .map(|((oid, _), column)| ((*oid, column.column.clone()), column.clone()))
        .collect();
    let attrs = client
        .query(
            "SELECT attrelid, attnum, attname::text FROM pg_catalog.pg_attribute \
             WHERE attrelid = ANY($1::oid[]) AND attnum > 0 AND NOT attisdropped",
            &[&children],
        )
        .await?;
    for attr in attrs {
        let child: u32 = attr.get(0);
        let name: String = attr.get(2);
        let Some(parent) = parent_of.get(&child) else {
            continue;
        };
        if let Some(column) = by_name.get(&(*parent, Arc::from(name.as_str()))) {
            map.by_attr.insert((child, attr.get(1)), column.clone());
        }
    }
    Ok(children)
}

/// Views over policy tables (or their children) at any depth that
/// `map_views` did not map: nested too deep, or their definition could not
/// be described. Writes through them are refused.
async fn refuse_unmapped_views(
    client: &tokio_postgres::Client,
    map: &mut CatalogMap,
    bases: &[u32],
    mapped: &[u32],
) -> Result<(), CatalogError> {
    let rows = client
        .query(
            "WITH RECURSIVE deps(view) AS ( \
                 SELECT r.ev_class FROM pg_catalog.pg_depend d \
                 JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid \
                 WHERE d.classid = 'pg_catalog.pg_rewrite'::regclass \
                   AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid = ANY($1::oid[]) \
                 UNION SELECT r.ev_class FROM pg_catalog.pg_depend d \
                 JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid \
                 JOIN deps ON d.refobjid = deps.view \
                 WHERE d.classid = 'pg_catalog.pg_rewrite'::regclass \
                   AND d.refclassid = 'pg_catalog.pg_class'::regclass) \
             SELECT n.nspname || '.' || v.relname FROM deps \
             JOIN pg_catalog.pg_class v ON v.oid = deps.view \
             JOIN pg_catalog.pg_namespace n ON n.oid = v.relnamespace \
             WHERE v.relkind IN ('v', 'm') AND NOT v.oid = ANY($2::oid[])",
            &[&bases, &mapped],
        )
        .await?;
    for row in rows {
        let name: String = row.get(0);
        tracing::warn!(view = %name, "view over a policy table that cmk-proxy could not map: writes through it are refused");
        map.facts.views.entry(name).or_default();
    }
    Ok(())
}

/// Views nested deeper than this over a protected table are not mapped
/// (their envelopes are still refused, never shown as plaintext).
const MAX_VIEW_DEPTH: usize = 8;

/// Maps the columns of views over mapped relations, level by level. For each
/// view, PostgreSQL itself says which base column each output column comes
/// from: the view's definition is described as a subquery, whose result
/// columns carry the origin of plain column references.
async fn map_views(
    client: &tokio_postgres::Client,
    map: &mut CatalogMap,
    children: &[u32],
) -> Result<(), CatalogError> {
    let mut bases: Vec<u32> = map.table_oids.values().copied().collect();
    bases.extend_from_slice(children);
    let mut mapped = bases.clone();
    // Views whose definition could not be described stay unmapped.
    let mut described = mapped.clone();
    for _ in 0..MAX_VIEW_DEPTH {
        let views = client
            .query(
                "SELECT DISTINCT v.oid, n.nspname || '.' || v.relname, pg_get_viewdef(v.oid)                  FROM pg_catalog.pg_depend d                  JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid                  JOIN pg_catalog.pg_class v ON v.oid = r.ev_class                  JOIN pg_catalog.pg_namespace n ON n.oid = v.relnamespace                  WHERE d.classid = 'pg_catalog.pg_rewrite'::regclass                    AND d.refclassid = 'pg_catalog.pg_class'::regclass                    AND d.refobjid = ANY($1::oid[]) AND v.relkind IN ('v', 'm')                    AND NOT v.oid = ANY($1::oid[])",
                &[&mapped],
            )
            .await?;
        if views.is_empty() {
            break;
        }
        for view in views {
            let oid: u32 = view.get(0);
            let name: String = view.get(1);
            let definition: String = view.get(2);
            mapped.push(oid);
            let probe = format!(
                "SELECT * FROM ({}) AS cmk_view_probe",
                definition.trim().trim_end_matches(';')
            );
            let statement = match client.prepare(&probe).await {
                Ok(statement) => statement,
                Err(e) => {
                    tracing::warn!(view = %name, error = %e, "view over protected columns not mapped; its protected cells will be refused");
                    continue;
                }
            };
            described.push(oid);
            for (index, column) in statement.columns().iter().enumerate() {
                let origin = column.table_oid().zip(column.column_id());
                let Some(base) = origin.and_then(|key| map.by_attr.get(&key)).cloned() else {
                    continue;
                };
                match base.role {
                    ColumnRole::Protected(_) => map
                        .facts
                        .views
                        .entry(name.clone())
                        .or_default()
                        .push(column.name().to_owned()),
                    ColumnRole::Tenant => {
                        map.facts
                            .view_tenants
                            .entry(name.clone())
                            .or_insert_with(|| column.name().to_owned());
                    }
                    _ => {}
                }
                map.by_attr.insert((oid, index as i16 + 1), base);
            }
        }
    }
    refuse_unmapped_views(client, map, &bases, &described).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_only_when_needed() {
        assert_eq!(quote_ident("ssn"), "ssn");
        assert_eq!(quote_ident("Birth Date"), "\"Birth Date\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(qualified("public.patients"), "public.patients");
    }

    #[test]
    fn problems_print_their_fix() {
        let p = SchemaProblem {
            location: "public.t.ssn".into(),
            message: "stored as text, must be bytea".into(),
            fix: Some("ALTER TABLE ...".into()),
        };
        assert!(p.to_string().contains("fix: ALTER TABLE"));
    }
}
