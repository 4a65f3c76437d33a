//! Webhooks against the real binary and a real HTTP receiver: signed, debounced, retried.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One webhook request as the receiver saw it.
#[derive(Debug, Clone)]
struct Hook {
    headers: HashMap<String, String>,
    body: Vec<u8>,
    at: Instant,
}

/// A real HTTP receiver: answers the first `failures` requests with 500, then 200.
async fn receiver(failures: usize) -> (SocketAddr, Arc<Mutex<Vec<Hook>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let s = s.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head_end, headers) = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..p]).into_owned();
                        let headers: HashMap<String, String> = head
                            .lines()
                            .skip(1)
                            .filter_map(|l| l.split_once(':'))
                            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                            .collect();
                        break (p + 4, headers);
                    }
                };
                let len: usize = headers
                    .get("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = buf[head_end..head_end + len].to_vec();
                let n = {
                    let mut seen = s.lock().unwrap();
                    seen.push(Hook {
                        headers,
                        body,
                        at: Instant::now(),
                    });
                    seen.len()
                };
                let status = if n <= failures {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                let res =
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                let _ = sock.write_all(res.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (addr, seen)
}

fn verify(secret: &str, hook: &Hook) -> bool {
    let Some(sig) = hook.headers.get("x-collab-signature") else {
        return false;
    };
    let Some(hex) = sig.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(bytes) = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(&hook.body);
    mac.verify_slice(&bytes).is_ok()
}

#[tokio::test]
async fn webhooks_are_signed_debounced_and_retried() {
    let (addr, seen) = receiver(2).await;
    let url = format!("http://{addr}/hook");
    let secret = "webhook-secret-for-tests";
    let server = Server::start(&[
        "--webhook-url",
        &url,
        "--webhook-secret",
        secret,
        "--webhook-debounce-ms",
        "300",
    ]);
    let a = synced_client(&server.url("hooked")).await;
    // A burst of edits is one notice.
    for i in 0..10u32 {
        a.insert(i, "x");
    }
    a.wait_text(&"x".repeat(10)).await;
    let started = Instant::now();
    // Two 500s, then a 200: three attempts of the same delivery, 0.5 s then 1 s apart.
    let delivered = wait_until(Duration::from_secs(8), || seen.lock().unwrap().len() >= 3).await;
    assert!(
        delivered,
        "webhook attempts seen: {}",
        seen.lock().unwrap().len()
    );
    let hooks = seen.lock().unwrap().clone();
    for h in &hooks {
        assert!(verify(secret, h), "signature does not verify: {h:?}");
        assert_eq!(h.headers["content-type"], "application/json");
    }
    let body: Value = serde_json::from_slice(&hooks[0].body).unwrap();
    assert_eq!(body["event"], "document.updated");
    assert_eq!(body["doc"], "hooked");
    assert!(body["size"].as_u64().unwrap() > 0 && body["time"].is_string());
    let ids: Vec<&String> = hooks
        .iter()
        .map(|h| &h.headers["x-collab-delivery"])
        .collect();
    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "retries are the same delivery"
    );
    assert!(hooks[1].at - hooks[0].at >= Duration::from_millis(450));
    assert!(hooks[2].at - hooks[1].at >= Duration::from_millis(900));
    // A tampered body does not verify.
    let mut forged = hooks[0].clone();
    forged.body = br#"{"event":"document.deleted","doc":"hooked"}"#.to_vec();
    assert!(!verify(secret, &forged));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(seen.lock().unwrap().len(), 3, "one notice for the burst");
    assert!(started.elapsed() < Duration::from_secs(8));

    assert_eq!(
        http(server.addr, "DELETE", "/api/docs/hooked", &[], b"").0,
        204
    );
    let deleted = wait_until(WAIT, || seen.lock().unwrap().len() >= 4).await;
    assert!(deleted);
    let hook = seen.lock().unwrap()[3].clone();
    assert!(verify(secret, &hook));
    let body: Value = serde_json::from_slice(&hook.body).unwrap();
    assert_eq!(
        (body["event"].as_str(), body["doc"].as_str()),
        (Some("document.deleted"), Some("hooked"))
    );
    assert!(server.log().contains("webhook delivery failed, retrying"));
}
