//! Where a resumable run stopped (`cmk.positions`, migration 3): the
//! primary key of the last row a `decrypt` or `reencrypt` run committed,
//! written in the same transaction as the batch, so a run killed at any
//! moment goes on after it when started again.

use tokio_postgres::GenericClient;

use super::AdoptError;

/// The task name of a run: `decrypt public.t`, `reencrypt public.t tenant acme`.
pub fn task(command: &str, table: &str, tenant: Option<&str>) -> String {
    match tenant {
        Some(tenant) => format!("{command} {table} tenant {tenant}"),
        None => format!("{command} {table}"),
    }
}

/// The key to resume after, if the task stopped before its end.
pub async fn load(
    client: &impl GenericClient,
    task: &str,
) -> Result<Option<Vec<String>>, AdoptError> {
    Ok(client
        .query_opt(
            "SELECT resume_after FROM cmk.positions WHERE task = $1",
            &[&task],
        )
        .await?
        .map(|row| row.get(0)))
}

/// Records `after` as the task's position (call it in the batch's transaction).
pub async fn save(
    client: &impl GenericClient,
    task: &str,
    after: &[String],
) -> Result<(), AdoptError> {
    client
        .execute(
            "INSERT INTO cmk.positions (task, resume_after) VALUES ($1, $2) \
             ON CONFLICT (task) DO UPDATE SET resume_after = EXCLUDED.resume_after, updated_at = now()",
            &[&task, &after],
        )
        .await?;
    Ok(())
}

/// Forgets the task's position (a pass reached the end of the table).
pub async fn clear(client: &impl GenericClient, task: &str) -> Result<(), AdoptError> {
    client
        .execute("DELETE FROM cmk.positions WHERE task = $1", &[&task])
        .await?;
    Ok(())
}

/// Forgets every position of `table`'s tasks of `command`.
pub async fn clear_table(
    client: &impl GenericClient,
    command: &str,
    table: &str,
) -> Result<(), AdoptError> {
    let whole = task(command, table, None);
    let prefix = format!("{whole} tenant ");
    client
        .execute(
            "DELETE FROM cmk.positions WHERE task = $1 OR starts_with(task, $2)",
            &[&whole, &prefix],
        )
        .await?;
    Ok(())
}
