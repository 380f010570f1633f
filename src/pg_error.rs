//! PostgreSQL's own words for a failed statement: tokio-postgres displays a
//! server error as just "db error", which tells an operator nothing.

/// The server's message (severity, message, detail, hint) when `e` is an
/// error PostgreSQL sent, else `e`'s own text.
pub fn text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.to_string().replace('\n', " "),
        None => e.to_string(),
    }
}
