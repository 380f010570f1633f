//! Several replicas (issue 17, test 5): three proxies on one database and
//! one keyring behind HAProxy (TCP, round robin), as users deploy them. The
//! first writes of a new tenant through all three at once create one DEK;
//! rows written through one replica read back through the others; `keys
//! rotate`, a revoked KMS key and `tenants disable` reach every replica
//! within the approval bound (approval_ttl 1 s here; the polls only guard
//! against a hang), and re-enabling reaches them all again.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{self, Proxy};

use common::encryption::{count, keyring, poll_until, EncryptedSetup};

const SCHEMA: &str = "CREATE TABLE patients (id int PRIMARY KEY, tenant_id text NOT NULL, \
    ssn bytea, notes bytea, cmk_edek jsonb)";

const COLUMNS: &[&str] = &["ssn: {type: text}", "notes: {type: text}"];

/// HAProxy in TCP mode, round robin over `backends`, in the foreground.
struct HaProxy {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl HaProxy {
    fn start(backends: &[u16]) -> HaProxy {
        let bin = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("haproxy is missing: run scripts/install-deps.sh");
        let dir = tempfile::tempdir().expect("temp dir");
        let port = common::free_port();
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, p)| format!("    server cmk{i} 127.0.0.1:{p} check inter 500ms\n"))
            .collect();
        let config = format!(
            "global\n    maxconn 1000\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\
             frontend postgres\n    bind 127.0.0.1:{port}\n    default_backend proxies\n\
             backend proxies\n    balance roundrobin\n{servers}"
        );
        let file = dir.path().join("haproxy.cfg");
        std::fs::write(&file, config).expect("write haproxy.cfg");
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy");
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        HaProxy {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two more proxies with the first one's configuration.
fn replicas(setup: &EncryptedSetup) -> Vec<Proxy> {
    let config = std::fs::read_to_string(setup.proxy.config_path()).expect("read config");
    let shared: String = config
        .lines()
        .filter(|l| !l.starts_with("listen:"))
        .map(|l| format!("{l}\n"))
        .collect();
    (0..2).map(|_| Proxy::start(&shared, &[])).collect()
}

async fn client(port: u16) -> tokio_postgres::Client {
    let (client, conn) =
        common::connect(&format!("postgres://postgres@127.0.0.1:{port}/app")).await;
    std::mem::forget(conn);
    client
}

fn cli(setup: &EncryptedSetup, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
        .args(args)
        .arg("--config")
        .arg(setup.proxy.config_path())
        .output()
        .expect("run cmk-proxy");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{args:?}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_behind_haproxy_share_one_dek_and_follow_rotation_revocation_and_disable() {
    let setup = EncryptedSetup::start(SCHEMA, "public.patients", COLUMNS).await;
    let others = replicas(&setup);
    let ports: Vec<u16> = std::iter::once(setup.proxy.port())
        .chain(others.iter().map(Proxy::port))
        .collect();
    let haproxy = HaProxy::start(&ports);

    // First writes of a new tenant through all three at once (three clients
    // on each replica directly, six through HAProxy): one DEK.
    let mut clients = Vec::new();
    for port in &ports {
        clients.push(client(*port).await);
    }
    for _ in 0..6 {
        clients.push(client(haproxy.port).await);
    }
    let writes = clients.iter().enumerate().map(|(i, c)| async move {
        c.execute(
            "INSERT INTO patients (id, tenant_id, ssn, notes) VALUES ($1, 'acme', $2, 'first')",
            &[&i32::try_from(i).unwrap_or(0), &format!("ssn-{i}")],
        )
        .await
    });
    for result in futures_util::future::join_all(writes).await {
        result.expect("a first write");
    }
    assert_eq!(
        count(
            &setup.direct,
            "SELECT count(*) FROM cmk.data_keys WHERE tenant_id = 'acme'"
        )
        .await,
        1,
        "one DEK for the tenant, whatever replica wrote first"
    );
    // Rows written through any replica read back through every other.
    for port in &ports {
        let c = client(*port).await;
        let rows = c
            .query("SELECT id, ssn FROM patients ORDER BY id", &[])
            .await
            .unwrap();
        assert_eq!(rows.len(), clients.len());
        for row in rows {
            let id: i32 = row.get(0);
            assert_eq!(row.get::<_, String>(1), format!("ssn-{id}"), "via {port}");
        }
    }

    // keys rotate on the registry: every replica writes under the new DEK.
    cli(&setup, &["keys", "rotate", "--tenant", "acme"]);
    let current: String = setup
        .direct
        .query_one(
            "SELECT dek_id::text FROM cmk.data_keys WHERE tenant_id = 'acme' AND retired_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for (n, port) in ports.iter().enumerate() {
        let c = client(*port).await;
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut id = 1000 * (i32::try_from(n).unwrap_or(0) + 1);
        loop {
            id += 1;
            c.execute(
                "INSERT INTO patients (id, tenant_id, ssn) VALUES ($1, 'acme', 'rotated')",
                &[&id],
            )
            .await
            .unwrap();
            let edek: String = setup
                .direct
                .query_one("SELECT cmk_edek::text FROM patients WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get(0);
            if edek.contains(&current) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica on {port} still writes under the retired DEK"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // A revoked KMS key stops every replica; restoring it restarts them all.
    keyring(&setup.ring(), "disable", "acme");
    for port in &ports {
        let c = client(*port).await;
        let err = poll_until(true, || {
            c.query("SELECT ssn FROM patients WHERE id = 0", &[])
        })
        .await
        .expect("refused");
        assert_eq!(
            common::sqlstate(&err).as_deref(),
            Some("KM001"),
            "{port}: {err}"
        );
    }
    keyring(&setup.ring(), "enable", "acme");
    for port in &ports {
        let c = client(*port).await;
        poll_until(false, || {
            c.query("SELECT ssn FROM patients WHERE id = 0", &[])
        })
        .await;
    }

    // tenants disable, then enable: the same on every replica.
    cli(&setup, &["tenants", "disable", "acme"]);
    for port in &ports {
        let c = client(*port).await;
        let err = poll_until(true, || {
            c.query("SELECT ssn FROM patients WHERE id = 0", &[])
        })
        .await
        .expect("refused");
        assert_eq!(
            common::sqlstate(&err).as_deref(),
            Some("KM001"),
            "{port}: {err}"
        );
    }
    cli(&setup, &["tenants", "enable", "acme"]);
    for port in &ports {
        let c = client(*port).await;
        poll_until(false, || {
            c.query("SELECT ssn FROM patients WHERE id = 0", &[])
        })
        .await;
    }
    // Still one DEK before the rotation and one after.
    assert_eq!(
        count(
            &setup.direct,
            "SELECT count(*) FROM cmk.data_keys WHERE tenant_id = 'acme'"
        )
        .await,
        2
    );
}
