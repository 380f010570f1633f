//! Command-line flags of `serve` override the policy file (issue 3 CLI contract).

use crate::common;

use common::*;

#[tokio::test]
async fn upstream_and_listen_flags_override_the_file() {
    let pg = pg();
    let closed = free_port();
    // The file names a dead upstream; the flag names the real one.
    let yaml = format!(
        "upstream: postgres://postgres@127.0.0.1:{closed}/app\ntls:\n  upstream: {{mode: require}}\n"
    );
    let upstream = pg.admin_url("app");
    let proxy = Proxy::start(&yaml, &["--upstream", &upstream]);
    let (client, _h) = connect(&proxy.url("scram_user", "scram_pw", "app")).await;
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    assert!(
        proxy
            .log_text()
            .contains(&format!("127.0.0.1:{}", pg.port())),
        "the log does not show the flag's upstream:\n{}",
        proxy.log_text()
    );
}

#[tokio::test]
async fn listen_flag_overrides_the_file() {
    let pg = pg();
    let in_file = free_port();
    let port = free_port();
    let flag = format!("127.0.0.1:{port}");
    let text = format!("listen: 127.0.0.1:{in_file}\n{}", proxy_yaml(&pg, ""));
    let proxy = Proxy::start_listening_on(port, &text, &["--listen", &flag]);
    let (client, _h) = connect(&proxy.url("scram_user", "scram_pw", "app")).await;
    client.simple_query("SELECT 1").await.unwrap();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", in_file)).is_err(),
        "the proxy also listens on the file's address"
    );
}
