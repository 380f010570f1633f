//! The btree index an equality lookup needs: `(tenant column, <col>_bidx)`
//! for every `search: equality` column (docs/SEARCH.md). A lookup is
//! rewritten to `col_bidx = $i AND tenant = $t`, which that index answers;
//! its unique form makes the protected column unique within each tenant.
//! `check-config --live` prints both, and says which exist.

use crate::config::{split_table_name, Policy, SearchMode};

use super::{qualified, quote_ident, CatalogError};

/// A searchable column and the lookup index it has, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchIndex {
    /// `schema.table`.
    pub table: String,
    /// The table's tenant column.
    pub tenant_column: String,
    /// The searchable protected column.
    pub column: String,
    /// An existing index whose leading columns are (tenant, blind index).
    pub existing: Option<String>,
}

impl SearchIndex {
    fn name(&self, suffix: &str) -> String {
        let table = self.table.rsplit('.').next().unwrap_or(&self.table);
        let mut name = format!("{table}_{}_bidx_{suffix}", self.column);
        while name.len() > 63 {
            name.remove(0);
        }
        name
    }

    fn ddl(&self, unique: bool, suffix: &str) -> String {
        format!(
            "CREATE {}INDEX CONCURRENTLY IF NOT EXISTS {} ON {} ({}, {});",
            if unique { "UNIQUE " } else { "" },
            quote_ident(&self.name(suffix)),
            qualified(&self.table),
            quote_ident(&self.tenant_column),
            quote_ident(&format!("{}_bidx", self.column)),
        )
    }

    /// The plain lookup index (built without blocking writes).
    pub fn create_sql(&self) -> String {
        self.ddl(false, "lookup")
    }

    /// The per-tenant unique form, instead of the plain one.
    pub fn unique_sql(&self) -> String {
        self.ddl(true, "unique")
    }
}

/// Every searchable column of the policy's existing tables.
pub async fn search_indexes(
    client: &tokio_postgres::Client,
    policy: &Policy,
) -> Result<Vec<SearchIndex>, CatalogError> {
    let mut out = Vec::new();
    for (table, table_policy) in &policy.tables {
        let Some((schema, name)) = split_table_name(table) else {
            continue;
        };
        for (column, column_policy) in &table_policy.columns {
            if column_policy.search != SearchMode::Equality {
                continue;
            }
            let row = client
                .query_opt(
                    "SELECT (SELECT i.indexrelid::regclass::text FROM pg_catalog.pg_index i \
                             WHERE i.indrelid = c.oid AND i.indnkeyatts >= 2 \
                               AND i.indkey[0] = t.attnum AND i.indkey[1] = b.attnum \
                               AND i.indpred IS NULL \
                             ORDER BY i.indisunique DESC LIMIT 1) \
                     FROM pg_catalog.pg_class c \
                     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                     JOIN pg_catalog.pg_attribute t ON t.attrelid = c.oid AND t.attname = $3 \
                     JOIN pg_catalog.pg_attribute b ON b.attrelid = c.oid AND b.attname = $4 \
                     WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                    &[
                        &schema,
                        &name,
                        &table_policy.tenant_column,
                        &format!("{column}_bidx"),
                    ],
                )
                .await?;
            // No such table or column: the schema check reports it.
            let Some(row) = row else { continue };
            out.push(SearchIndex {
                table: table.clone(),
                tenant_column: table_policy.tenant_column.clone(),
                column: column.clone(),
                existing: row.get(0),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_ddl_names_tenant_then_blind_index() {
        let index = SearchIndex {
            table: "public.patients".into(),
            tenant_column: "tenant_id".into(),
            column: "ssn".into(),
            existing: None,
        };
        assert_eq!(
            index.create_sql(),
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS patients_ssn_bidx_lookup ON public.patients (tenant_id, ssn_bidx);"
        );
        assert_eq!(
            index.unique_sql(),
            "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS patients_ssn_bidx_unique ON public.patients (tenant_id, ssn_bidx);"
        );
    }
}
