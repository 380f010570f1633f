//! Tables in transition between legacy plaintext and the policy's format
//! (`cmk-proxy encrypt` and `decrypt`, docs/ADOPTING.md): the rows of `cmk.adoptions`, and the names the
//! transition gives to a table's columns and relations. Reads the catalog;
//! knows no keys and no sessions.

use std::collections::HashMap;

use super::CatalogError;

/// Suffix of the shadow column that holds a protected column's cells while
/// the legacy column still holds plaintext.
pub const SHADOW_SUFFIX: &str = "__cmk";

/// The shadow (cell) column of a protected column during the transition.
pub fn shadow_column(column: &str) -> String {
    format!("{column}{SHADOW_SUFFIX}")
}

/// How far a table's transition is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Shadow columns and the transition view exist; the table still has
    /// its name (the application writes plaintext to it).
    Prepared,
    /// `decrypt` made the transition view beside a table in the policy's
    /// format; the table still has its name (cells, served as usual).
    Leaving,
    /// The view has the table's name: writes are sealed, rows convert
    /// (legacy values to cells for `encrypt`, cells to legacy values for
    /// `decrypt`); a table may rest here mixed (`decrypt --tenant`).
    Converting,
}

/// One row of `cmk.adoptions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adoption {
    /// Policy name `schema.table`.
    pub table: String,
    /// Where it stands.
    pub phase: Phase,
    /// OID of the transition view.
    pub view_oid: u32,
    /// OID of the real table (the legacy table, renamed at the swap).
    pub base_oid: u32,
    /// Name of the real table while the view has the table's name.
    pub base_name: String,
    /// Primary key (text form) of the last row converted.
    pub resume_after: Option<Vec<String>>,
}

/// Every table in transition, by policy name (none when the `cmk` schema
/// predates migration 2).
pub async fn adoptions(
    client: &tokio_postgres::Client,
) -> Result<HashMap<String, Adoption>, CatalogError> {
    let present: bool = client
        .query_one("SELECT to_regclass('cmk.adoptions') IS NOT NULL", &[])
        .await?
        .get(0);
    if !present {
        return Ok(HashMap::new());
    }
    let rows = client
        .query(
            "SELECT table_name, phase, view_oid, base_oid, base_name, resume_after FROM cmk.adoptions",
            &[],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let table: String = row.get(0);
            let phase = match row.get::<_, String>(1).as_str() {
                "prepared" => Phase::Prepared,
                "leaving" => Phase::Leaving,
                _ => Phase::Converting,
            };
            let adoption = Adoption {
                table: table.clone(),
                phase,
                view_oid: row.get(2),
                base_oid: row.get(3),
                base_name: row.get(4),
                resume_after: row.get(5),
            };
            (table, adoption)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_columns_keep_the_column_name() {
        assert_eq!(shadow_column("ssn"), "ssn__cmk");
    }
}
