//! collab mounted in an actix-web app (`server/examples/embed.rs`, actix-ws sockets): the same
//! protocol, documents and storage as the standalone binary, behind the app's middleware.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use common::*;

/// The example binary, built next to `collab` (`cargo build --examples`).
fn example_bin() -> std::path::PathBuf {
    let bin = collab_bin()
        .parent()
        .expect("target dir")
        .join("examples/embed");
    assert!(
        bin.exists(),
        "{} not found: build it with cargo build -p collab-server --example embed",
        bin.display()
    );
    bin
}

struct App {
    child: Child,
    addr: SocketAddr,
    _data: tempfile::TempDir,
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_app(env: &[(&str, &str)]) -> App {
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(example_bin())
        .env("COLLAB_ADDR", "127.0.0.1:0")
        .env("COLLAB_DATA_DIR", data.path().join("db"))
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    App {
        child,
        addr,
        _data: data,
    }
}

#[tokio::test]
async fn an_embedded_collab_syncs_behind_the_apps_middleware() {
    let app = start_app(&[]);
    let url = |doc: &str| format!("ws://{}/collab/{doc}", app.addr);
    let a = synced_client(&url("shared%20notes")).await;
    let b = synced_client(&url("shared%20notes")).await;
    a.insert(0, "from a");
    b.wait_text("from a").await;
    b.insert(6, " and b");
    a.wait_text("from a and b").await;
    let mut a = a;
    a.set_awareness(r#"{"user":"a"}"#);
    let id = a.client_id();
    b.wait_for("a's presence", |c| c.awareness_states().contains_key(&id))
        .await;
    // The app's own routes and middleware are there too.
    let (status, body) = http(app.addr, "GET", "/", &[], b"");
    assert_eq!(status, 200);
    assert!(body.contains("My app"));
    // A late joiner gets everything, from the shared storage and actors.
    let late = synced_client(&url("shared%20notes")).await;
    assert_eq!(late.text(), "from a and b");
    // Bad input is contained as in the standalone server.
    late.send_raw(vec![0xff, 0xff]);
    assert!(matches!(late.wait_closed().await, Some(1002) | Some(1003)));
    assert!(!a.is_closed() && !b.is_closed());
}

#[tokio::test]
async fn an_embedded_collab_checks_tokens_like_the_standalone_one() {
    let secret = "embedded-test-secret-0123456789abcdef";
    let app = start_app(&[("COLLAB_AUTH_SECRET", secret)]);
    let url = format!("ws://{}/collab/private", app.addr);
    let r = Client::try_connect(request(&url, &[]), yrs::Doc::new())
        .await
        .err()
        .expect("a token-less upgrade was accepted");
    assert_eq!(r.status, 401, "{r}");
    let out = Command::new(collab_bin())
        .args(["token", "--doc", "private", "--ttl", "5m"])
        .env("COLLAB_AUTH_SECRET", secret)
        .output()
        .unwrap();
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let c = synced_client(&format!("{url}?token={token}")).await;
    c.insert(0, "ok");
    c.wait_text("ok").await;
}
