//! The test client: a WebSocket connection holding a real yrs document and answering the server
//! like y-websocket does.

use super::*;

/// What a client saw of its connection.
#[derive(Default)]
pub struct Seen {
    pub frames: Vec<Vec<u8>>,
    /// Number of y-protocols messages in each received binary frame.
    pub messages_per_frame: Vec<usize>,
    pub synced: bool,
    pub close_code: Option<u16>,
    pub closed: bool,
    pub updates_received: usize,
}

/// A WebSocket client holding a real yrs document, answering the server like y-websocket does.
pub struct Client {
    pub doc: Doc,
    /// Every insertion and deletion the server sent (sync answers and relayed updates, own edits
    /// echoed back): what this client has seen acknowledged.
    pub echoed: Arc<Mutex<Echoed>>,
    pub awareness: Arc<Mutex<Awareness>>,
    pub seen: Arc<Mutex<Seen>>,
    out: mpsc::UnboundedSender<WsMessage>,
    awareness_clock: u32,
}

/// Ids of content received from the server, recorded as sent rather than through a yrs
/// document: a document sets aside (as pending) what it cannot integrate yet, and a client
/// never receives its own edits back when the server stored them but died before echoing them.
#[derive(Default)]
pub struct Echoed {
    pub inserted: IdSet,
    pub deleted: IdSet,
}

impl Echoed {
    fn add(&mut self, update: &[u8]) {
        let u = Update::decode_v1(update).expect("server sent a valid update");
        for (set, from) in [
            (&mut self.inserted, &u.insertions(true)),
            (&mut self.deleted, u.delete_set()),
        ] {
            for (client, ranges) in from.iter() {
                for r in ranges.iter() {
                    set.insert(ID::new(*client, r.start), r.end - r.start);
                }
            }
        }
    }
}

fn apply(doc: &Doc, update: &[u8]) {
    let u = Update::decode_v1(update).expect("server sent a valid update");
    doc.transact_mut().apply_update(u).expect("update applies");
}

impl Client {
    /// Connects and sends SyncStep1, as WebsocketProvider does on open.
    pub async fn connect(url: &str) -> Client {
        Self::connect_with(url, Doc::new()).await
    }

    pub async fn connect_with(url: &str, doc: Doc) -> Client {
        Self::connect_resuming(url, doc, Arc::default()).await
    }

    /// Reconnects with a document and the record of what the server already acknowledged, as a
    /// client that lost its connection does.
    pub async fn connect_resuming(url: &str, doc: Doc, echoed: Arc<Mutex<Echoed>>) -> Client {
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => Self::over_resuming(ws, doc, echoed),
            Err(e) => panic!("connect {url}: {}", Refused::from(e)),
        }
    }

    /// Connects with a request of the caller's (headers such as Origin or Authorization);
    /// a refused upgrade comes back as its status and body.
    pub async fn try_connect(req: ClientRequest, doc: Doc) -> Result<Client, Refused> {
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Ok(Self::over(ws, doc)),
            Err(e) => Err(Refused::from(e)),
        }
    }

    /// A client over an already-open WebSocket (TLS, or any other stream).
    pub fn over<S>(ws: WebSocketStream<S>, doc: Doc) -> Client
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        Self::over_resuming(ws, doc, Arc::default())
    }

    fn over_resuming<S>(ws: WebSocketStream<S>, doc: Doc, echoed: Arc<Mutex<Echoed>>) -> Client
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<WsMessage>();
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let seen = Arc::new(Mutex::new(Seen::default()));
        let awareness = Arc::new(Mutex::new(Awareness::new(doc.clone())));
        {
            let (seen, doc, echoed, awareness, out) = (
                seen.clone(),
                doc.clone(),
                echoed.clone(),
                awareness.clone(),
                out.clone(),
            );
            tokio::spawn(async move {
                while let Some(msg) = stream.next().await {
                    match msg {
                        Ok(WsMessage::Binary(frame)) => {
                            let mut decoder = DecoderV1::new(Cursor::new(&frame));
                            let msgs: Vec<Message> = MessageReader::new(&mut decoder)
                                .collect::<Result<_, _>>()
                                .expect("server frame decodes");
                            let mut s = seen.lock().unwrap();
                            s.frames.push(frame.to_vec());
                            s.messages_per_frame.push(msgs.len());
                            for m in msgs {
                                match m {
                                    Message::Sync(SyncMessage::SyncStep1(sv)) => {
                                        let diff = doc.transact().encode_diff_v1(&sv);
                                        let reply =
                                            Message::Sync(SyncMessage::SyncStep2(diff)).encode_v1();
                                        let _ = out.send(WsMessage::Binary(reply.into()));
                                    }
                                    Message::Sync(SyncMessage::SyncStep2(u)) => {
                                        apply(&doc, &u);
                                        echoed.lock().unwrap().add(&u);
                                        s.synced = true;
                                    }
                                    Message::Sync(SyncMessage::Update(u)) => {
                                        apply(&doc, &u);
                                        echoed.lock().unwrap().add(&u);
                                        s.updates_received += 1;
                                    }
                                    Message::Awareness(u) => {
                                        awareness.lock().unwrap().apply_update(u).unwrap();
                                    }
                                    _ => {}
                                }
                            }
                        }
                        Ok(WsMessage::Close(frame)) => {
                            let mut s = seen.lock().unwrap();
                            s.close_code = frame.map(|f| u16::from(f.code));
                            s.closed = true;
                            break;
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                seen.lock().unwrap().closed = true;
            });
        }
        let client = Client {
            doc,
            echoed,
            awareness,
            seen,
            out,
            awareness_clock: 0,
        };
        let sv = client.doc.transact().state_vector();
        client.send_raw(Message::Sync(SyncMessage::SyncStep1(sv)).encode_v1());
        client
    }

    pub fn send_raw(&self, bytes: Vec<u8>) {
        let _ = self.out.send(WsMessage::Binary(bytes.into()));
    }

    pub fn send_text(&self, text: &str) {
        let _ = self.out.send(WsMessage::Text(text.into()));
    }

    pub fn close(&self) {
        let _ = self.out.send(WsMessage::Close(None));
    }

    /// Edits the local document and sends the update, like a Yjs binding would.
    pub fn insert(&self, index: u32, s: &str) -> Vec<u8> {
        let text = self.doc.get_or_insert_text("t");
        let mut txn = self.doc.transact_mut();
        text.insert(&mut txn, index, s);
        let update = txn.encode_update_v1();
        drop(txn);
        self.send_raw(Message::Sync(SyncMessage::Update(update.clone())).encode_v1());
        update
    }

    pub fn remove(&self, index: u32, len: u32) {
        let text = self.doc.get_or_insert_text("t");
        let mut txn = self.doc.transact_mut();
        text.remove_range(&mut txn, index, len);
        let update = txn.encode_update_v1();
        drop(txn);
        self.send_raw(Message::Sync(SyncMessage::Update(update)).encode_v1());
    }

    pub fn len(&self) -> u32 {
        let text = self.doc.get_or_insert_text("t");
        text.len(&self.doc.transact())
    }

    pub fn text(&self) -> String {
        let text = self.doc.get_or_insert_text("t");
        text.get_string(&self.doc.transact())
    }

    pub fn client_id(&self) -> u64 {
        self.doc.client_id().get()
    }

    pub fn awareness_message(&mut self, json: &str) -> Vec<u8> {
        self.awareness_clock += 1;
        let mut update = AwarenessUpdate {
            clients: HashMap::new(),
        };
        update.clients.insert(
            self.doc.client_id(),
            AwarenessUpdateEntry {
                clock: self.awareness_clock,
                json: json.into(),
            },
        );
        Message::Awareness(update).encode_v1()
    }

    pub fn set_awareness(&mut self, json: &str) {
        let m = self.awareness_message(json);
        self.send_raw(m);
    }

    /// Awareness states this client currently knows (removed ones excluded).
    pub fn awareness_states(&self) -> HashMap<u64, String> {
        self.awareness
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(id, s)| s.data.map(|d| (id.get(), d.to_string())))
            .collect()
    }

    pub async fn wait_synced(&self) {
        self.wait_for("synced", |c| c.seen.lock().unwrap().synced)
            .await;
    }

    pub async fn wait_text(&self, expected: &str) {
        let what = format!("text {expected:?}");
        if !wait_until(WAIT, || self.text() == expected).await {
            panic!("timed out waiting for {what}; have {:?}", self.text());
        }
    }

    pub async fn wait_closed(&self) -> Option<u16> {
        self.wait_for("close", |c| c.seen.lock().unwrap().closed)
            .await;
        self.seen.lock().unwrap().close_code
    }

    pub async fn wait_for(&self, what: &str, cond: impl Fn(&Client) -> bool) {
        if !wait_until(WAIT, || cond(self)).await {
            panic!("timed out waiting for {what}");
        }
    }

    pub fn is_closed(&self) -> bool {
        self.seen.lock().unwrap().closed
    }
}
