//! What `encrypt` must know of a legacy table before it touches it: its
//! columns in order (with defaults, identity and generated columns), its
//! primary key, the views that depend on it and its grants.

use crate::catalog::quote_ident;
use crate::config::{split_table_name, TablePolicy};

use super::AdoptError;

/// One column of the legacy table.
#[derive(Debug, Clone)]
pub struct Column {
    /// Name.
    pub name: String,
    /// Type with modifiers (`varchar(20)`).
    pub type_name: String,
    /// Default expression (an identity column's is its sequence's nextval).
    pub default: Option<String>,
    /// An identity column (inserted with OVERRIDING SYSTEM VALUE).
    pub identity: bool,
    /// A generated column (never written).
    pub generated: bool,
}

/// The legacy table.
#[derive(Debug, Clone)]
pub struct TableShape {
    /// Schema.
    pub schema: String,
    /// Table name (without schema).
    pub name: String,
    /// OID.
    pub oid: u32,
    /// Columns in attribute order.
    pub columns: Vec<Column>,
    /// Primary-key columns in key order.
    pub primary_key: Vec<String>,
    /// Views other than the transition view that depend on the table.
    pub dependent_views: Vec<String>,
    /// (grantee or PUBLIC, privilege) of the table's DML grants.
    pub grants: Vec<(String, String)>,
    /// A Citus distributed or reference table: DDL on it reaches every
    /// shard, and Citus refuses some of it on views (see `ddl`).
    pub distributed: bool,
}

impl TableShape {
    /// Reads the relation named `schema.table` (any relkind; the caller
    /// knows what it expects), ignoring view `except` among dependents.
    pub async fn read(
        client: &tokio_postgres::Client,
        table: &str,
        except: Option<u32>,
    ) -> Result<TableShape, AdoptError> {
        let (schema, name) = split_table_name(table)
            .ok_or_else(|| AdoptError::Refused(format!("{table}: not a schema.table name")))?;
        let row = client
            .query_opt(
                "SELECT c.oid FROM pg_catalog.pg_class c \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&schema, &name],
            )
            .await?
            .ok_or_else(|| AdoptError::Refused(format!("{table} does not exist")))?;
        let oid: u32 = row.get(0);
        Self::read_oid(client, schema, name, oid, except).await
    }

    /// Reads the relation `oid` (named `schema.name` for generated SQL).
    pub async fn read_oid(
        client: &tokio_postgres::Client,
        schema: &str,
        name: &str,
        oid: u32,
        except: Option<u32>,
    ) -> Result<TableShape, AdoptError> {
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), \
                        pg_get_expr(d.adbin, d.adrelid), a.attidentity <> '', a.attgenerated <> '', \
                        CASE WHEN a.attidentity <> '' THEN \
                          pg_get_serial_sequence(quote_ident(n.nspname) || '.' || quote_ident(c.relname), a.attname) END \
                 FROM pg_catalog.pg_attribute a \
                 JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                &[&oid],
            )
            .await?;
        let columns = rows
            .iter()
            .map(|row| {
                let identity: bool = row.get(3);
                let sequence: Option<String> = row.get(5);
                let default: Option<String> = match (identity, sequence) {
                    (true, Some(seq)) => Some(format!(
                        "nextval({}::regclass)",
                        crate::rewrite::quote_literal(&seq)
                    )),
                    _ => row.get(2),
                };
                Column {
                    name: row.get(0),
                    type_name: row.get(1),
                    default,
                    identity,
                    generated: row.get(4),
                }
            })
            .collect();
        let primary_key = client
            .query(
                "SELECT a.attname::text FROM pg_catalog.pg_index i \
                 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord",
                &[&oid],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let except = except.unwrap_or(0);
        let dependent_views = client
            .query(
                "SELECT DISTINCT v.oid::regclass::text FROM pg_catalog.pg_depend d \
                 JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid \
                 JOIN pg_catalog.pg_class v ON v.oid = r.ev_class \
                 WHERE d.classid = 'pg_catalog.pg_rewrite'::regclass \
                   AND d.refclassid = 'pg_catalog.pg_class'::regclass \
                   AND d.refobjid = $1 AND v.oid <> $1 AND v.oid <> $2",
                &[&oid, &except],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let grants = client
            .query(
                "SELECT coalesce(r.rolname::text, 'PUBLIC'), a.privilege_type \
                 FROM pg_catalog.pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a \
                 LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee \
                 WHERE c.oid = $1 AND a.privilege_type IN ('SELECT', 'INSERT', 'UPDATE', 'DELETE') \
                   AND a.grantee <> c.relowner",
                &[&oid],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let distributed = client
            .query_one(
                "SELECT to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL",
                &[],
            )
            .await?
            .get::<_, bool>(0)
            && client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition \
                     WHERE logicalrelid = $1::oid::regclass)",
                    &[&oid],
                )
                .await?
                .get::<_, bool>(0);
        Ok(TableShape {
            schema: schema.to_owned(),
            name: name.to_owned(),
            oid,
            columns,
            primary_key,
            dependent_views,
            grants,
            distributed,
        })
    }

    /// The column named `name`.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// `schema.name` quoted, for a relation of this schema named `name`.
    pub fn relation(&self, name: &str) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(name))
    }

    /// Refuses what `encrypt` cannot convert online: no primary key, a
    /// protected column missing, already bytea or part of the key, views
    /// over the table.
    pub fn check_legacy(&self, table: &str, policy: &TablePolicy) -> Result<(), AdoptError> {
        if self.primary_key.is_empty() {
            return Err(AdoptError::Refused(format!(
                "{table} has no primary key: encrypt converts rows in batches by primary key and needs one to resume and to compare-and-set (add one, e.g. ALTER TABLE … ADD PRIMARY KEY)"
            )));
        }
        if !self.dependent_views.is_empty() {
            return Err(AdoptError::Refused(format!(
                "views depend on {table} ({}): they would keep reading the legacy columns; drop them and create them again after encrypt",
                self.dependent_views.join(", ")
            )));
        }
        if self.column(&policy.tenant_column).is_none() {
            return Err(AdoptError::Refused(format!(
                "{table}: tenant column {} does not exist",
                policy.tenant_column
            )));
        }
        for column in policy.columns.keys() {
            let Some(found) = self.column(column) else {
                return Err(AdoptError::Refused(format!(
                    "{table}.{column}: the policy's protected column does not exist"
                )));
            };
            if found.type_name == "bytea" {
                return Err(AdoptError::Refused(format!(
                    "{table}.{column} is already bytea: encrypt converts legacy columns of their own types"
                )));
            }
            if self.primary_key.contains(column) || *column == policy.tenant_column {
                return Err(AdoptError::Refused(format!(
                    "{table}.{column} is part of the primary key or the tenant column: it cannot be encrypted"
                )));
            }
            if found.generated {
                return Err(AdoptError::Refused(format!(
                    "{table}.{column} is a generated column: it cannot be encrypted"
                )));
            }
            if crate::catalog::adoption::shadow_column(column).len() > 63 {
                return Err(AdoptError::Refused(format!(
                    "{table}.{column}: the name is too long for its shadow column"
                )));
            }
        }
        Ok(())
    }
}
