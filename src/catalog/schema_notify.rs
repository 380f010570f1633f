//! Word of DDL run directly against PostgreSQL, without waiting for the
//! periodic catalog reload: an event trigger (installed by `migrate`, as
//! a superuser can) sends a NOTIFY on [`CHANNEL`] at the end of every DDL
//! command, delivered when its transaction commits; every proxy replica
//! LISTENs and reloads its catalog at once. Without the trigger (the role
//! may not create one), DDL run directly is seen within
//! `server.catalog_refresh`.

/// The NOTIFY channel.
pub const CHANNEL: &str = "cmk_schema_change";

/// The event trigger's name.
pub const TRIGGER: &str = "cmk_schema_change";

/// Installs the trigger function and the event trigger (idempotent).
pub const INSTALL_SQL: &str = "\
CREATE OR REPLACE FUNCTION cmk.notify_schema_change() RETURNS event_trigger
    LANGUAGE plpgsql AS $cmk$ BEGIN PERFORM pg_notify('cmk_schema_change', tg_tag); END $cmk$;
DO $cmk$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'cmk_schema_change') THEN
        CREATE EVENT TRIGGER cmk_schema_change ON ddl_command_end
            EXECUTE FUNCTION cmk.notify_schema_change();
    END IF;
END $cmk$;
";

/// True when the event trigger is installed and enabled.
pub async fn installed(client: &tokio_postgres::Client) -> Result<bool, super::CatalogError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = $1 AND evtenabled <> 'D')",
            &[&TRIGGER],
        )
        .await?;
    Ok(row.get(0))
}
