//! `cmk-proxy dev`: a throwaway local PostgreSQL with the proxy in front of it,
//! so cmk-proxy can be tried with one command. Owns only the wiring; the
//! cluster is `localpg`, the relay is `proxy::run_server`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::{LogFormat, Policy};
use crate::kms::local::Keyring;
use crate::localpg::{LocalPostgres, LocalPostgresOptions};

/// Start a local PostgreSQL and the proxy in front of it.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address the proxy listens on.
    #[arg(long, default_value = "127.0.0.1:6432")]
    pub listen: SocketAddr,
    /// Keep the cluster in this directory (reused on the next run) instead of
    /// a temp dir removed on exit.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Exit after the demo (encrypt, decrypt, revoke) instead of serving on.
    #[arg(long)]
    pub exit_after_demo: bool,
    /// Once the demo is done, write `DATABASE_URL` (through the proxy),
    /// `DIRECT_URL` (PostgreSQL itself) and `KEYRING` to this file as shell
    /// assignments, for the README's tutorial (`. ./FILE`).
    #[arg(long)]
    pub env_file: Option<PathBuf>,
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<i32> {
    super::logging::init(
        LogFormat::Human,
        super::logging::filter(None).unwrap_or_default(),
    );
    // Ctrl-C is handled from the start, so it always stops both cleanly
    // (a signal during start-up makes the proxy stop at once).
    let shutdown = CancellationToken::new();
    super::serve::spawn_signal_handler(shutdown.clone())?;
    let opts = LocalPostgresOptions {
        data_dir: args.data_dir.clone(),
        ..LocalPostgresOptions::default()
    };
    let pg = tokio::task::spawn_blocking(move || LocalPostgres::start(opts))
        .await
        .context("PostgreSQL start-up task failed")?
        .context("cannot start a local PostgreSQL")?;
    let result = serve(&pg, &args, shutdown).await;
    // Stopping the cluster blocks on pg_ctl; keep it off the runtime threads.
    tokio::task::spawn_blocking(move || drop(pg))
        .await
        .context("PostgreSQL shutdown task failed")?;
    result.map(|()| 0)
}

const DEMO_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS patients (\
    id serial PRIMARY KEY, tenant_id text NOT NULL, ssn bytea, ssn_bidx bytea, \
    birth_date bytea, notes bytea, cmk_edek jsonb, \
    CONSTRAINT cmk_envelope_ssn CHECK (substr(ssn, 1, 4) = '\\x434d4b01'::bytea), \
    CONSTRAINT cmk_envelope_birth_date CHECK (substr(birth_date, 1, 4) = '\\x434d4b01'::bytea), \
    CONSTRAINT cmk_envelope_notes CHECK (substr(notes, 1, 4) = '\\x434d4b01'::bytea), \
    CONSTRAINT cmk_bidx_ssn CHECK ((ssn IS NULL) = (ssn_bidx IS NULL))); \
    CREATE INDEX IF NOT EXISTS patients_ssn_bidx_lookup ON patients (tenant_id, ssn_bidx); \
    TRUNCATE patients RESTART IDENTITY; \
    GRANT ALL ON patients TO PUBLIC; GRANT ALL ON SEQUENCE patients_id_seq TO PUBLIC";

/// The embedded demo policy: local keyring, two tenants, one protected table.
fn demo_policy(
    pg: &LocalPostgres,
    addr: SocketAddr,
    dir: &std::path::Path,
) -> anyhow::Result<Policy> {
    let text = format!(
        "upstream: {upstream}\n\
         tls: {{upstream: {{mode: verify-full, ca: {ca}}}}}\n\
         keys:\n  approval_ttl: {ttl}s\n  providers:\n    local: {{kind: local, path: {ring}}}\n\
         audit: {{sink: {{kind: file, path: {audit}}}}}\n\
         tenants:\n  acme: {{provider: local, key: acme}}\n  globex: {{provider: local, key: globex}}\n\
         tables:\n  public.patients:\n    tenant_column: tenant_id\n    columns:\n\
         \x20     ssn: {{type: text, search: equality}}\n      birth_date: {{type: date}}\n      notes: {{type: text}}\n",
        upstream = pg.admin_url("app"),
        ca = pg.ca_cert_path().map(|p| p.display().to_string()).unwrap_or_default(),
        ttl = DEMO_APPROVAL_TTL.as_secs(),
        ring = dir.join("keyring.json").display(),
        audit = dir.join("audit.jsonl").display(),
    );
    let mut policy = crate::config::parse_policy(&text, "embedded demo policy")?;
    policy.listen = addr;
    Ok(policy)
}

/// Short, so the demo shows revocation within seconds.
const DEMO_APPROVAL_TTL: std::time::Duration = std::time::Duration::from_secs(2);

async fn serve(pg: &LocalPostgres, args: &Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    // Keyring and audit log live as long as this demo run.
    let demo_dir = tempfile::Builder::new().prefix("cmk-demo-").tempdir()?;
    let dir = demo_dir.path().to_owned();
    let keyring = dir.join("keyring.json");
    for tenant in ["acme", "globex"] {
        edit_keyring(&keyring, |ring| {
            if ring.get(tenant).is_none() {
                ring.create_key(tenant)?;
            }
            ring.set_enabled(tenant, true)
        })?;
    }
    let (admin, connection) = tokio_postgres::connect(&pg.admin_url("app"), tokio_postgres::NoTls)
        .await
        .context("cannot connect to the local PostgreSQL")?;
    let admin_task = tokio::spawn(connection);
    admin
        .batch_execute(DEMO_SCHEMA)
        .await
        .context("demo schema")?;
    let policy = demo_policy(pg, addr, &dir)?;
    let url = format!("postgres://scram_user:scram_pw@{addr}/app");
    println!(
        "PostgreSQL on 127.0.0.1:{} (data {}, log {})",
        pg.port(),
        pg.data_dir().display(),
        pg.log_path().display()
    );
    println!("cmk-proxy on {addr} (upstream TLS verify-full), protecting public.patients (ssn, birth_date, notes)");
    println!(
        "keyring {} (tenants acme, globex), audit log {}",
        keyring.display(),
        dir.join("audit.jsonl").display()
    );
    println!("DATABASE_URL={url}");

    let server = tokio::spawn(crate::proxy::run_server(
        Arc::new(policy),
        listener,
        shutdown.clone(),
    ));
    let demo_result = demo(&url, &admin, &keyring).await;
    drop(admin);
    let _ = admin_task.await;
    if shutdown.is_cancelled() {
        // Ctrl-C during the demo: stop quietly.
        server.await.context("proxy task failed")??;
        return Ok(());
    }
    if args.exit_after_demo || demo_result.is_err() {
        shutdown.cancel();
        server.await.context("proxy task failed")??;
        return demo_result;
    }
    if let Some(path) = &args.env_file {
        write_env_file(path, &url, &pg.admin_url("app"), &keyring)?;
        println!(
            "\nwrote {} (DATABASE_URL, DIRECT_URL, KEYRING)",
            path.display()
        );
    }
    println!();
    println!("the proxy keeps serving DATABASE_URL={url}");
    println!("try: psql \"{url}\" -c \"SELECT * FROM patients\"    (Ctrl-C to stop)");
    println!(
        "     cmk-proxy keyring disable globex --keyring {}   (play the tenant)",
        keyring.display()
    );
    server.await.context("proxy task failed")??;
    Ok(())
}

/// Writes the demo's addresses as shell assignments, atomically (temp file,
/// rename), so whoever waits for the file never reads half of it.
fn write_env_file(
    path: &std::path::Path,
    url: &str,
    direct_url: &str,
    keyring: &std::path::Path,
) -> anyhow::Result<()> {
    let text = format!(
        "DATABASE_URL='{url}'\nDIRECT_URL='{direct_url}'\nKEYRING='{}'\n",
        keyring.display()
    );
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => std::path::Path::new("."),
    };
    let mut file = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    file.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Loads (or starts) the demo keyring, changes it and saves it.
fn edit_keyring(
    path: &std::path::Path,
    change: impl FnOnce(&mut Keyring) -> Result<(), crate::kms::KmsError>,
) -> anyhow::Result<()> {
    let mut ring = Keyring::load_or_empty(path)?;
    change(&mut ring)?;
    ring.save()?;
    Ok(())
}

/// Runs one simple query through the proxy and prints its rows or error.
async fn show(client: &tokio_postgres::Client, sql: &str) -> anyhow::Result<Result<usize, String>> {
    println!("  proxy> {sql}");
    match client.simple_query(sql).await {
        Ok(messages) => {
            let mut count = 0;
            for message in messages {
                if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
                    let cells: Vec<&str> = (0..row.len())
                        .map(|i| row.get(i).unwrap_or("NULL"))
                        .collect();
                    println!("         {}", cells.join(" | "));
                    count += 1;
                }
            }
            Ok(Ok(count))
        }
        Err(e) => {
            let code = e
                .as_db_error()
                .map(|d| d.code().code().to_owned())
                .unwrap_or_default();
            let message = e
                .as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_else(|| e.to_string());
            println!("         ERROR {code}: {message}");
            Ok(Err(code))
        }
    }
}

/// Encrypt, decrypt, revoke: the whole story in a few statements.
async fn demo(
    url: &str,
    admin: &tokio_postgres::Client,
    keyring: &std::path::Path,
) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("demo: cannot connect through the proxy")?;
    let connection = tokio::spawn(connection);
    println!("\n1. The application writes patients of two tenants through the proxy:");
    show(
        &client,
        "INSERT INTO patients (tenant_id, ssn, birth_date, notes) VALUES \
        ('acme', '123-45-6789', '1980-01-02', 'allergic to penicillin'), \
        ('globex', '987-65-4321', '1975-06-30', 'no known allergies') RETURNING id, tenant_id",
    )
    .await?
    .map_err(anyhow::Error::msg)?;

    println!("\n2. What PostgreSQL stores (read directly, not through the proxy):");
    for row in admin
        .query("SELECT id, tenant_id, encode(substr(ssn, 1, 24), 'hex'), cmk_edek::text FROM patients ORDER BY id", &[])
        .await?
    {
        let id: i32 = row.get(0);
        let tenant: &str = row.get(1);
        let ssn: &str = row.get(2);
        let edek: &str = row.get(3);
        println!("  direct> {id} | {tenant} | ssn = \\x{ssn}... | cmk_edek = {}...", &edek[..edek.len().min(60)]);
    }

    println!("\n3. Through the proxy, after each tenant's key approves:");
    show(
        &client,
        "SELECT id, tenant_id, ssn, birth_date, notes FROM patients ORDER BY id",
    )
    .await?
    .map_err(anyhow::Error::msg)?;

    println!("\n4. Tenant globex revokes its key (cmk-proxy keyring disable globex):");
    edit_keyring(keyring, |ring| ring.set_enabled("globex", false))?;
    let deadline = std::time::Instant::now() + DEMO_APPROVAL_TTL * 5;
    loop {
        match client
            .simple_query("SELECT notes FROM patients WHERE tenant_id = 'globex'")
            .await
        {
            Err(_) => break,
            Ok(_) if std::time::Instant::now() > deadline => {
                anyhow::bail!("demo: revocation did not take effect")
            }
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
        }
    }
    if show(
        &client,
        "SELECT id, tenant_id, ssn FROM patients WHERE tenant_id = 'globex'",
    )
    .await?
    .is_ok()
    {
        anyhow::bail!("demo: a revoked tenant's data was readable");
    }
    show(
        &client,
        "SELECT id, tenant_id, ssn FROM patients WHERE tenant_id = 'acme'",
    )
    .await?
    .map_err(anyhow::Error::msg)?;

    println!("\n5. A query the proxy cannot run on ciphertext is refused, not guessed:");
    show(
        &client,
        "SELECT id FROM patients WHERE notes LIKE '%allerg%'",
    )
    .await?
    .ok();

    println!("\n6. Tenant globex re-enables its key:");
    edit_keyring(keyring, |ring| ring.set_enabled("globex", true))?;
    let deadline = std::time::Instant::now() + DEMO_APPROVAL_TTL * 5;
    while client
        .simple_query("SELECT notes FROM patients WHERE tenant_id = 'globex'")
        .await
        .is_err()
    {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("demo: re-enabling did not restore access");
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    show(
        &client,
        "SELECT id, tenant_id, ssn FROM patients WHERE tenant_id = 'globex'",
    )
    .await?
    .map_err(anyhow::Error::msg)?;
    println!("\ndemo complete.");
    drop(client);
    let _ = connection.await;
    Ok(())
}
