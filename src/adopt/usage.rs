//! How many cells each data key still seals, for `keys list`: the header of
//! every protected cell names its DEK (bytes 5..20 of the envelope), so one
//! scan per protected column counts them. Tables in transition are counted
//! in their real table's shadow columns.

use std::collections::HashMap;

use tokio_postgres::Client;
use uuid::Uuid;

use crate::catalog::adoption::{self, shadow_column};
use crate::catalog::envelope::ENVELOPE_PREFIX_HEX;
use crate::catalog::{qualified, quote_ident};
use crate::config::Policy;

use super::AdoptError;

/// Cells per DEK id over every protected column of the policy's tables
/// (tables that do not exist, or still hold legacy plaintext, count none).
pub async fn cells_per_dek(
    client: &Client,
    policy: &Policy,
) -> Result<HashMap<Uuid, i64>, AdoptError> {
    let adoptions = adoption::adoptions(client).await?;
    let mut counts: HashMap<Uuid, i64> = HashMap::new();
    for (table, table_policy) in &policy.tables {
        let (relation, shadow) = match adoptions.get(table) {
            Some(a) => (
                format!(
                    "{}::regclass",
                    crate::rewrite::quote_literal(&a.base_oid.to_string())
                ),
                true,
            ),
            None => (qualified(table), false),
        };
        for column in table_policy.columns.keys() {
            let column = if shadow {
                shadow_column(column)
            } else {
                column.clone()
            };
            let column = quote_ident(&column);
            let sql = format!(
                "SELECT substr({column}, 5, 16), count(*) FROM {relation} \
                 WHERE substr({column}, 1, 4) = '\\x{ENVELOPE_PREFIX_HEX}'::bytea GROUP BY 1"
            );
            let rows = match client.query(&sql, &[]).await {
                Ok(rows) => rows,
                // Missing table, or a legacy column that is not bytea.
                Err(e) if e.code().is_some() => continue,
                Err(e) => return Err(e.into()),
            };
            for row in rows {
                let id: Vec<u8> = row.get(0);
                if let Ok(id) = Uuid::from_slice(&id) {
                    *counts.entry(id).or_default() += row.get::<_, i64>(1);
                }
            }
        }
    }
    Ok(counts)
}
