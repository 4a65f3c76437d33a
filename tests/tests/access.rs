//! Access control against the real binary: tokens at the upgrade, read-only connections,
//! expiry of live connections, the origin allow-list, the open-mode start-up rule, minting
//! (CLI and endpoint) and TLS.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use yrs::Doc;

const SECRET: &str = "integration-test-secret-0123456789abcdef";

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token as an application's backend would mint it, with its own JWT library.
fn mint_with(claims: serde_json::Value, alg: Algorithm, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn token(doc: &str, perm: &str, ttl_secs: u64) -> String {
    mint_with(
        json!({"doc": doc, "perm": perm, "exp": now_secs() + ttl_secs, "sub": "user-7"}),
        Algorithm::HS256,
        SECRET,
    )
}

fn secured(extra: &[&str]) -> Server {
    let mut args = vec!["--auth-secret", SECRET];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn with_token(server: &Server, doc: &str, token: &str) -> String {
    format!("{}?token={token}", server.url(doc))
}

async fn refused(url: &str, headers: &[(&str, &str)]) -> Refused {
    match Client::try_connect(request(url, headers), Doc::new()).await {
        Ok(_) => panic!("{url} was accepted"),
        Err(r) => r,
    }
}

#[tokio::test]
async fn upgrades_without_a_valid_token_get_401_or_403_and_load_nothing() {
    // The secret from a file, as operators are told to pass it.
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let server = Server::start(&["--auth-secret-file", secret_file.to_str().unwrap()]);
    let doc = "guarded-doc";
    let exp = now_secs() + 60;
    let cases: Vec<(&str, String, u16)> = vec![
        ("no token", server.url(doc), 401),
        ("malformed", with_token(&server, doc, "not.a.jwt"), 401),
        (
            "bad signature",
            with_token(
                &server,
                doc,
                &mint_with(
                    json!({"doc": doc, "perm": "read-write", "exp": exp}),
                    Algorithm::HS256,
                    "some-other-secret",
                ),
            ),
            401,
        ),
        (
            "expired",
            with_token(
                &server,
                doc,
                &mint_with(
                    json!({"doc": doc, "perm": "read-write", "exp": now_secs() - 1}),
                    Algorithm::HS256,
                    SECRET,
                ),
            ),
            401,
        ),
        (
            "not yet valid (beyond the 30 s skew)",
            with_token(
                &server,
                doc,
                &mint_with(
                    json!({"doc": doc, "perm": "read-write", "exp": exp, "nbf": now_secs() + 120}),
                    Algorithm::HS256,
                    SECRET,
                ),
            ),
            401,
        ),
        (
            "HS512",
            with_token(
                &server,
                doc,
                &mint_with(
                    json!({"doc": doc, "perm": "read-write", "exp": exp}),
                    Algorithm::HS512,
                    SECRET,
                ),
            ),
            401,
        ),
        (
            "alg none",
            with_token(
                &server,
                doc,
                &format!(
                    "{}.{}.",
                    b64(br#"{"alg":"none","typ":"JWT"}"#),
                    b64(json!({"doc": doc, "perm": "read-write", "exp": exp})
                        .to_string()
                        .as_bytes())
                ),
            ),
            401,
        ),
        (
            "missing perm",
            with_token(
                &server,
                doc,
                &mint_with(json!({"doc": doc, "exp": exp}), Algorithm::HS256, SECRET),
            ),
            401,
        ),
        (
            "another document",
            with_token(&server, doc, &token("other-doc", "read-write", 60)),
            403,
        ),
    ];
    for (what, url, status) in cases {
        let r = refused(&url, &[]).await;
        assert_eq!(r.status, status, "{what}: {r}");
        // The same request by hand, to read the whole plain-text reason.
        let path = url.split_once(&server.addr.to_string()).unwrap().1;
        let (raw_status, reason) = raw_upgrade(server.addr, path);
        assert_eq!(raw_status, status, "{what}: {reason}");
        assert!(!reason.trim().is_empty(), "{what}: no reason given");
    }
    // Nothing was loaded or joined for the guarded document.
    let log = server.log();
    assert!(!log.contains(&format!("doc={doc}")), "{log}");
    assert!(!log.contains(SECRET), "the secret was logged");
    // A valid token gets in.
    let c = synced_client(&with_token(&server, doc, &token(doc, "read-write", 60))).await;
    assert!(!c.is_closed());
    let log = server.log();
    assert!(log.contains("sub=user-7"), "sub is not in the spans: {log}");
}

fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, &b| acc << 8 | b as u32) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn prefix_tokens_and_bearer_headers() {
    let server = secured(&[]);
    let t = token("team-42/*", "read-write", 60);
    let a = synced_client(&with_token(&server, "team-42/a", &t)).await;
    a.insert(0, "in a");
    let bearer = format!("Bearer {t}");
    let b = Client::try_connect(
        request(&server.url("team-42/b"), &[("Authorization", &bearer)]),
        Doc::new(),
    )
    .await
    .unwrap_or_else(|r| panic!("bearer refused: {r}"));
    b.wait_synced().await;
    let r = refused(&with_token(&server, "team-43/a", &t), &[]).await;
    assert_eq!(r.status, 403, "{r}");
    let r = refused(&server.url("team-43/a"), &[("Authorization", &bearer)]).await;
    assert_eq!(r.status, 403, "{r}");
}

#[tokio::test]
async fn read_only_connections_receive_everything_and_change_nothing() {
    let server = secured(&[]);
    let doc = "ro-doc";
    let rw = synced_client(&with_token(&server, doc, &token(doc, "read-write", 60))).await;
    rw.insert(0, "hello");
    let mut ro = synced_client(&with_token(&server, doc, &token(doc, "read-only", 60))).await;
    ro.wait_text("hello").await;

    // Its edits stay local: never applied, stored or relayed, and it is not disconnected.
    ro.insert(0, "RO1 ");
    ro.insert(0, "RO2 ");
    ro.set_awareness(r#"{"user":"reader"}"#);
    let reader_id = ro.client_id();
    rw.wait_for("the reader's presence", |c| {
        c.awareness_states().contains_key(&reader_id)
    })
    .await;
    rw.insert(5, " world");
    ro.wait_for("the writer's later edit", |c| c.text().contains("world"))
        .await;
    assert_eq!(rw.text(), "hello world");
    assert!(!ro.is_closed(), "a read-only client was disconnected");
    let fresh = synced_client(&with_token(&server, doc, &token(doc, "read-only", 60))).await;
    assert_eq!(fresh.text(), "hello world");

    // The refusal is logged once, then counted.
    let log = server.log();
    assert_eq!(
        log.matches("refused a document change from a read-only connection")
            .count(),
        1,
        "{log}"
    );
    // After a restart the stored document has none of the refused edits either.
    drop((rw, ro, fresh));
    let mut server = server;
    server.kill9();
    server.restart();
    let after = synced_client(&with_token(&server, doc, &token(doc, "read-write", 60))).await;
    assert_eq!(after.text(), "hello world");
}

#[tokio::test]
async fn a_live_connection_is_closed_with_4401_when_its_token_expires() {
    let server = secured(&[]);
    let doc = "expiring";
    let exp = now_secs() + 2;
    let t = mint_with(
        json!({"doc": doc, "perm": "read-write", "exp": exp}),
        Algorithm::HS256,
        SECRET,
    );
    let c = synced_client(&with_token(&server, doc, &t)).await;
    let started = Instant::now();
    let code = c.wait_closed().await;
    let closed_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert_eq!(code, Some(4401));
    assert!(
        closed_at >= exp as f64 - 0.05,
        "closed {:.3} s before exp",
        exp as f64 - closed_at
    );
    assert!(
        closed_at <= exp as f64 + 1.0,
        "closed {:.3} s after exp",
        closed_at - exp as f64
    );
    assert!(started.elapsed() < Duration::from_secs(4));
    // The refresh: a new token gets a new connection.
    let again = synced_client(&with_token(&server, doc, &token(doc, "read-write", 60))).await;
    assert!(!again.is_closed());
}

#[tokio::test]
async fn anonymous_read_lets_token_less_clients_read_only() {
    let server = secured(&["--allow-anonymous-read"]);
    let doc = "public";
    let rw = synced_client(&with_token(&server, doc, &token(doc, "read-write", 60))).await;
    rw.insert(0, "public text");
    let anon = synced_client(&server.url(doc)).await;
    anon.wait_text("public text").await;
    anon.insert(0, "vandal ");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rw.text(), "public text");
    let r = refused(&with_token(&server, doc, "garbage"), &[]).await;
    assert_eq!(r.status, 401, "{r}");
}

#[tokio::test]
async fn the_origin_allow_list() {
    let server = Server::start(&[
        "--allowed-origins",
        "https://app.example.com,https://*.example.org",
    ]);
    let url = server.url("origins");
    for ok in ["https://app.example.com", "https://eu.example.org"] {
        let c = Client::try_connect(request(&url, &[("Origin", ok)]), Doc::new())
            .await
            .unwrap_or_else(|r| panic!("{ok} refused: {r}"));
        c.wait_synced().await;
    }
    for bad in [
        "https://evil.example.com",
        "http://app.example.com",
        "https://example.org",
    ] {
        let r = refused(&url, &[("Origin", bad)]).await;
        assert_eq!(r.status, 403, "{bad}: {r}");
    }
    // No Origin header: a non-browser client.
    synced_client(&url).await;
}

#[tokio::test]
async fn the_origin_check_comes_before_the_token_check() {
    let server = secured(&["--allowed-origins", "https://app.example.com"]);
    let r = refused(
        &server.url("doc"),
        &[("Origin", "https://evil.example.com")],
    )
    .await;
    assert_eq!(r.status, 403, "{r}");
}

/// Runs the binary to completion (it is expected to exit by itself).
fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let data = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(collab_bin());
    cmd.arg("--data-dir")
        .arg(data.path().join("db"))
        .args(args)
        .env_remove("COLLAB_AUTH_SECRET")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn open_mode_on_a_public_address_needs_allow_anonymous() {
    let out = run_to_exit(&["--addr", "0.0.0.0:0"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--allow-anonymous"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // With the flag (or with a secret) it starts.
    for extra in [vec!["--allow-anonymous"], vec!["--auth-secret", SECRET]] {
        let data = tempfile::tempdir().unwrap();
        let mut child = Command::new(collab_bin())
            .args(["--addr", "0.0.0.0:0", "--data-dir"])
            .arg(data.path().join("db"))
            .args(&extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("listening on"), "{extra:?}: {line}");
        child.kill().unwrap();
        child.wait().unwrap();
    }
    // Anonymous read needs a secret to mean anything.
    let out = run_to_exit(&["--allow-anonymous-read"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn tokens_from_the_cli_and_the_minting_endpoint_work() {
    // `collab token`, with the secret from the environment.
    let out = run_to_exit(
        &[
            "token",
            "--doc",
            "minted",
            "--perm",
            "read-only",
            "--ttl",
            "1h",
        ],
        &[("COLLAB_AUTH_SECRET", SECRET)],
    );
    assert!(out.status.success(), "{:?}", out);
    let cli_token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let out = run_to_exit(&["token", "--doc", "minted"], &[]);
    assert_eq!(out.status.code(), Some(2), "minting without a secret");

    let admin = "admin-key-for-tests";
    let server = secured(&["--admin-key", admin]);
    let rw = synced_client(&with_token(
        &server,
        "minted",
        &token("minted", "read-write", 60),
    ))
    .await;
    rw.insert(0, "abc");
    let ro = synced_client(&with_token(&server, "minted", &cli_token)).await;
    ro.wait_text("abc").await;
    ro.insert(0, "x");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rw.text(), "abc", "the CLI's read-only token could write");

    let body = json!({"doc": "minted", "perm": "read-write", "ttl_secs": 60}).to_string();
    let auth = format!("Bearer {admin}");
    let json_ct = ("Content-Type", "application/json");
    let (status, text) = http(
        server.addr,
        "POST",
        "/api/tokens",
        &[("Authorization", &auth), json_ct],
        body.as_bytes(),
    );
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let minted = v["token"].as_str().unwrap();
    let expires_at = v["expires_at"].as_u64().unwrap();
    assert!((now_secs() + 55..=now_secs() + 61).contains(&expires_at));
    let c = synced_client(&with_token(&server, "minted", minted)).await;
    c.wait_text("abc").await;
    c.insert(3, "d");
    rw.wait_text("abcd").await;

    let (status, _) = http(
        server.addr,
        "POST",
        "/api/tokens",
        &[("Authorization", "Bearer wrong"), json_ct],
        body.as_bytes(),
    );
    assert_eq!(status, 401);
    let (status, _) = http(
        server.addr,
        "POST",
        "/api/tokens",
        &[json_ct],
        body.as_bytes(),
    );
    assert_eq!(status, 401);
    let bad = json!({"doc": "minted", "perm": "admin", "ttl_secs": 60}).to_string();
    let (status, text) = http(
        server.addr,
        "POST",
        "/api/tokens",
        &[("Authorization", &auth), json_ct],
        bad.as_bytes(),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("\"error\""), "{text}");
    let zero = json!({"doc": "minted", "perm": "read-only", "ttl_secs": 0}).to_string();
    let (status, _) = http(
        server.addr,
        "POST",
        "/api/tokens",
        &[("Authorization", &auth), json_ct],
        zero.as_bytes(),
    );
    assert_eq!(status, 400);
    assert!(!server.log().contains(admin), "the admin key was logged");
    assert!(!server.log().contains(minted), "a token was logged");

    // Without an admin key the endpoint does not exist.
    let plain = secured(&[]);
    let (status, _) = http(
        plain.addr,
        "POST",
        "/api/tokens",
        &[("Authorization", &auth), json_ct],
        body.as_bytes(),
    );
    assert_eq!(status, 404);
}

mod tls {
    use super::*;
    use std::sync::Arc;
    use tokio_rustls::rustls::pki_types::ServerName;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};
    use tokio_rustls::TlsConnector;

    async fn wss_client(server: &Server, connector: &TlsConnector, doc: &str) -> Client {
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("TLS handshake");
        let url = format!("wss://localhost:{}/{doc}", server.addr.port());
        let (ws, _) = tokio_tungstenite::client_async(url, tls)
            .await
            .expect("wss upgrade");
        let c = Client::over(ws, Doc::new());
        c.wait_synced().await;
        c
    }

    #[tokio::test]
    async fn wss_with_a_self_signed_certificate() {
        let cert = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_path, cert.cert.pem()).unwrap();
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
        let server = Server::start(&[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ]);
        let mut roots = RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = TlsConnector::from(Arc::new(config));
        let a = wss_client(&server, &connector, "secure-doc").await;
        let b = wss_client(&server, &connector, "secure-doc").await;
        a.insert(0, "over tls");
        b.wait_text("over tls").await;
        // Plain WebSocket on the TLS port does not work.
        assert!(tokio_tungstenite::connect_async(server.url("secure-doc"))
            .await
            .is_err());
    }
}
