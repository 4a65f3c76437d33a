//! A light y-websocket client: connect, handshake like WebsocketProvider, then read raw frames.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::proto::{self, Framing, Msg};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
pub type Sink = SplitSink<Ws, Message>;
pub type Stream = SplitStream<Ws>;

pub struct Synced {
    pub sink: Sink,
    pub stream: Stream,
    /// From before the TCP connect to the SyncStep2 frame read.
    pub sync_time: Duration,
    /// Size of the SyncStep2 payload (the update).
    pub step2_bytes: usize,
    /// The SyncStep2 payload itself, when asked for (`keep_step2`).
    pub step2: Option<Vec<u8>>,
}

/// Connection problems seen during a run: unexpected closes and errors, with a few examples.
#[derive(Default)]
pub struct Trouble {
    pub disconnects: AtomicUsize,
    pub connect_errors: AtomicUsize,
    pub unparsed_frames: AtomicUsize,
    examples: Mutex<Vec<String>>,
}

impl Trouble {
    pub fn note(&self, what: String) {
        let mut e = self.examples.lock().unwrap();
        if e.len() < 5 {
            e.push(what);
        }
    }
    pub fn examples(&self) -> Vec<String> {
        self.examples.lock().unwrap().clone()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "disconnects": self.disconnects.load(Ordering::Relaxed),
            "connect_errors": self.connect_errors.load(Ordering::Relaxed),
            "unparsed_frames": self.unparsed_frames.load(Ordering::Relaxed),
            "examples": self.examples(),
        })
    }
}

/// Opens `url` (TCP_NODELAY, small read buffer), sends SyncStep1 (empty state vector) and, if
/// given, an awareness message; answers the server's SyncStep1 with an empty SyncStep2 and
/// returns once the server's SyncStep2 has arrived. `awareness` is an unframed message.
pub async fn connect_synced(
    url: &str,
    fr: &Framing,
    awareness: Option<Vec<u8>>,
    timeout: Duration,
) -> anyhow::Result<Synced> {
    connect_synced_opts(url, fr, awareness, timeout, false).await
}

/// `connect_synced`, optionally keeping the SyncStep2 payload (the whole document).
pub async fn connect_synced_opts(
    url: &str,
    fr: &Framing,
    awareness: Option<Vec<u8>>,
    timeout: Duration,
    keep_step2: bool,
) -> anyhow::Result<Synced> {
    let t0 = Instant::now();
    let config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(1 << 30))
        .max_frame_size(Some(1 << 30));
    let fut = async {
        if fr.protocol == proto::Protocol::YSweet {
            ysweet_create(url, &fr.doc).await?;
        }
        let ws = open(url, config)
            .await
            .with_context(|| format!("connect {url}"))?;
        let (mut sink, mut stream) = ws.split();
        if let Some(h) = fr.hello() {
            sink.send(Message::binary(h)).await?;
        }
        sink.send(Message::binary(fr.frame(&proto::SYNC_STEP1_EMPTY)))
            .await?;
        if let Some(a) = awareness {
            sink.send(Message::binary(fr.frame(&a))).await?;
        }
        loop {
            let m = stream
                .next()
                .await
                .ok_or_else(|| anyhow!("closed before SyncStep2"))??;
            match m {
                Message::Binary(b) => {
                    let mut answer = false;
                    let mut step2 = None;
                    fr.messages(&b, |m| match m {
                        Msg::SyncStep1 => answer = true,
                        Msg::SyncStep2(p) => step2 = Some(p),
                        _ => {}
                    });
                    if answer {
                        sink.send(Message::binary(fr.frame(&proto::SYNC_STEP2_EMPTY)))
                            .await?;
                    }
                    if let Some(p) = step2 {
                        return Ok(Synced {
                            sync_time: t0.elapsed(),
                            step2_bytes: p.len(),
                            step2: keep_step2.then(|| p.to_vec()),
                            sink,
                            stream,
                        });
                    }
                }
                Message::Close(c) => bail!("closed before SyncStep2: {c:?}"),
                _ => {}
            }
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("no SyncStep2 within {timeout:?} from {url}"))?
}

/// Source addresses for client sockets: loopback has about 28,000 ephemeral ports per (source
/// address, destination), so tens of thousands of connections to one server port need several
/// source addresses. Empty (the default): the kernel picks, as for any client.
static SOURCE_IPS: OnceLock<Vec<Ipv4Addr>> = OnceLock::new();
static NEXT_SOURCE: AtomicUsize = AtomicUsize::new(0);

/// Spreads later connections over 127.0.0.1 … 127.0.0.n (n ≤ 1: no binding).
pub fn set_source_ips(n: u8) {
    let ips = if n > 1 {
        (1..=n).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect()
    } else {
        Vec::new()
    };
    let _ = SOURCE_IPS.set(ips);
}

async fn open(url: &str, config: WebSocketConfig) -> anyhow::Result<Ws> {
    let ips = SOURCE_IPS.get().map(Vec::as_slice).unwrap_or_default();
    if ips.is_empty() {
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true).await?;
        return Ok(ws);
    }
    let src = ips[NEXT_SOURCE.fetch_add(1, Ordering::Relaxed) % ips.len()];
    let dst: SocketAddr = host_port(url)?.parse().context("server address")?;
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src.into(), 0))
        .with_context(|| format!("bind {src}"))?;
    let tcp = sock.connect(dst).await?;
    tcp.set_nodelay(true)?;
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(url, MaybeTlsStream::Plain(tcp), Some(config))
            .await?;
    Ok(ws)
}

/// `host:port` of a `ws://host:port/path` URL.
fn host_port(url: &str) -> anyhow::Result<&str> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| anyhow!("not a ws:// URL: {url}"))?;
    Ok(rest.split('/').next().unwrap_or(rest))
}

/// y-sweet serves a document once it exists: `POST /doc/new` once per server and document, as
/// an application backend would. Connections to the same document wait for the first one's
/// request: y-sweet answers 500 to concurrent creations of one document.
async fn ysweet_create(url: &str, doc: &str) -> anyhow::Result<()> {
    type Created = Arc<tokio::sync::Mutex<bool>>;
    static DOCS: OnceLock<Mutex<HashMap<String, Created>>> = OnceLock::new();
    let hp = host_port(url)?;
    let slot = DOCS
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(format!("{hp}/{doc}"))
        .or_default()
        .clone();
    let mut created = slot.lock().await;
    if *created {
        return Ok(());
    }
    let body = serde_json::json!({ "docId": doc }).to_string();
    let req = format!(
        "POST /doc/new HTTP/1.1\r\nHost: {hp}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut tcp = TcpStream::connect(hp).await.context("POST /doc/new")?;
    tcp.write_all(req.as_bytes()).await?;
    let mut resp = Vec::new();
    tcp.read_to_end(&mut resp).await?;
    let head = String::from_utf8_lossy(&resp[..resp.len().min(200)]).to_string();
    if !head.starts_with("HTTP/1.1 200") {
        bail!("POST /doc/new {doc}: {}", head.lines().next().unwrap_or(""));
    }
    *created = true;
    Ok(())
}

/// The whole document as a fresh client receives it (the SyncStep2 payload).
pub async fn fetch_document(url: &str, fr: &Framing) -> anyhow::Result<Vec<u8>> {
    let s = connect_synced_opts(url, fr, None, Duration::from_secs(60), true).await?;
    let doc = s.step2.clone().unwrap_or_default();
    close_gracefully(s.sink, s.stream).await;
    Ok(doc)
}

/// Sends a close frame and reads until the server's answer ends the stream (at most 2 s).
pub async fn close_gracefully(mut sink: Sink, mut stream: Stream) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async move {
        let _ = sink.close().await;
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}

/// Random-looking but deterministic 53-bit client ids (splitmix64).
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
    pub fn client_id(&mut self) -> u64 {
        (self.next_u64() & ((1 << 32) - 1)).max(1)
    }
}

/// Runs `f(i)` for i in 0..n with at most `limit` in flight; results in index order.
pub async fn bounded<T, F, Fut>(n: usize, limit: usize, f: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(limit.max(1)));
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let fut = f(i);
        handles.push(tokio::spawn(async move {
            let r = fut.await;
            drop(permit);
            r
        }));
    }
    let mut out = Vec::with_capacity(n);
    for h in handles {
        out.push(h.await.expect("task panicked"));
    }
    out
}
