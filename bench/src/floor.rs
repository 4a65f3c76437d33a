//! `collab-bench floor`: the least work any server of this protocol can do, to read the other
//! servers' figures against. One thread, one epoll loop (mio), no CRDT, no storage, no queues:
//! each update or awareness frame a client sends is written as-is, in the same loop iteration,
//! to every other socket of the same URL path. A SyncStep1 is answered with an empty SyncStep2
//! (the bench clients count as synced on it); a client's SyncStep2 is dropped. A socket keeps
//! bytes of its own only when the kernel would not take them all (a slow reader).
//!
//! It knows no document, so a fresh client gets an empty one: "converged" is 0 for it.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;

use anyhow::Context;
use clap::Args;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

#[derive(Args, Debug)]
pub struct FloorArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:1234")]
    pub addr: SocketAddr,
}

const LISTENER: Token = Token(usize::MAX);
/// An empty SyncStep2 in a server (unmasked) binary frame.
const STEP2_EMPTY_FRAME: [u8; 7] = [0x82, 5, 0, 1, 2, 0, 0];

struct Conn {
    stream: TcpStream,
    inbuf: Vec<u8>,
    /// What the kernel did not take yet; written first when the socket becomes writable.
    out: Vec<u8>,
    /// The URL path's index in `Floor::docs`, once the handshake is done.
    doc: Option<usize>,
    dead: bool,
}

#[derive(Default)]
struct Floor {
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    doc_index: HashMap<String, usize>,
    /// Members (tokens) of each document.
    docs: Vec<Vec<usize>>,
}

pub fn run(a: &FloorArgs) -> anyhow::Result<()> {
    let mut poll = Poll::new()?;
    let mut listener = TcpListener::bind(a.addr).with_context(|| format!("bind {}", a.addr))?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut events = Events::with_capacity(1024);
    let mut f = Floor::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                f.accept(&listener, &poll)?;
                continue;
            }
            let t = ev.token().0;
            if ev.is_writable() {
                f.flush(t, &poll);
            }
            if ev.is_readable() || ev.is_read_closed() {
                f.read(t, &mut buf, &poll);
            }
            f.reap(t, &poll);
        }
    }
}

/// Writes as much of `bytes` as the socket takes now: how much, or `None` if it failed.
fn write_some(stream: &mut TcpStream, bytes: &[u8]) -> Option<usize> {
    let mut done = 0;
    while done < bytes.len() {
        match stream.write(&bytes[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(done)
}

impl Floor {
    fn accept(&mut self, listener: &TcpListener, poll: &Poll) -> anyhow::Result<()> {
        loop {
            let (mut stream, _) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                // Out of descriptors or a reset before accept: the listener stays usable.
                Err(e) => {
                    eprintln!("floor: accept: {e}");
                    return Ok(());
                }
            };
            let _ = stream.set_nodelay(true);
            let t = self.free.pop().unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
            poll.registry()
                .register(&mut stream, Token(t), Interest::READABLE)?;
            self.conns[t] = Some(Conn {
                stream,
                inbuf: Vec::new(),
                out: Vec::new(),
                doc: None,
                dead: false,
            });
        }
    }

    fn read(&mut self, t: usize, buf: &mut [u8], poll: &Poll) {
        let Some(c) = self.conns[t].as_mut() else {
            return;
        };
        let mut inbuf = std::mem::take(&mut c.inbuf);
        loop {
            match c.stream.read(buf) {
                Ok(0) => {
                    c.dead = true;
                    break;
                }
                Ok(n) => inbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    c.dead = true;
                    break;
                }
            }
        }
        let mut pos = 0;
        if self.conns[t].as_ref().is_some_and(|c| c.doc.is_none()) {
            match self.handshake(t, &inbuf, poll) {
                Some(n) => pos = n,
                None => {
                    self.put_back(t, inbuf, 0);
                    return;
                }
            }
        }
        while let Some((used, opcode, payload)) = parse_frame(&inbuf[pos..]) {
            pos += used;
            self.on_frame(t, opcode, &payload, poll);
        }
        self.put_back(t, inbuf, pos);
    }

    fn put_back(&mut self, t: usize, mut inbuf: Vec<u8>, pos: usize) {
        if let Some(c) = self.conns[t].as_mut() {
            inbuf.drain(..pos);
            c.inbuf = inbuf;
        }
    }

    /// Answers the upgrade request once it is complete; returns the bytes it took.
    fn handshake(&mut self, t: usize, inbuf: &[u8], poll: &Poll) -> Option<usize> {
        let end = inbuf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&inbuf[..end]);
        let path = head
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("/")
            .to_string();
        let key = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_string())
        });
        let Some(key) = key else {
            self.conns[t].as_mut()?.dead = true;
            return None;
        };
        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        );
        let next = self.docs.len();
        let d = *self.doc_index.entry(path).or_insert(next);
        if d == next {
            self.docs.push(Vec::new());
        }
        self.docs[d].push(t);
        self.conns[t].as_mut()?.doc = Some(d);
        self.send(t, resp.as_bytes(), poll);
        Some(end)
    }

    fn on_frame(&mut self, t: usize, opcode: u8, payload: &[u8], poll: &Poll) {
        match opcode {
            0x2 => match payload {
                [0, 0, ..] => self.send(t, &STEP2_EMPTY_FRAME, poll),
                [0, 1, ..] => {}
                _ => {
                    let Some(d) = self.conns[t].as_ref().and_then(|c| c.doc) else {
                        return;
                    };
                    let frame = server_frame(0x2, payload);
                    let members = std::mem::take(&mut self.docs[d]);
                    for &m in &members {
                        if m != t {
                            self.send(m, &frame, poll);
                        }
                    }
                    self.docs[d] = members;
                }
            },
            0x8 => {
                let n = payload.len().min(125);
                self.send(t, &server_frame(0x8, &payload[..n]), poll);
                if let Some(c) = self.conns[t].as_mut() {
                    c.dead = true;
                }
            }
            0x9 => self.send(t, &server_frame(0xA, payload), poll),
            _ => {}
        }
    }

    /// Writes straight to the socket; keeps the rest only when the kernel would block.
    fn send(&mut self, t: usize, bytes: &[u8], poll: &Poll) {
        let Some(c) = self.conns[t].as_mut() else {
            return;
        };
        if c.dead {
            return;
        }
        if !c.out.is_empty() {
            c.out.extend_from_slice(bytes);
            return;
        }
        let Some(done) = write_some(&mut c.stream, bytes) else {
            c.dead = true;
            return;
        };
        if done < bytes.len() {
            c.out.extend_from_slice(&bytes[done..]);
            let _ = poll.registry().reregister(
                &mut c.stream,
                Token(t),
                Interest::READABLE | Interest::WRITABLE,
            );
        }
    }

    fn flush(&mut self, t: usize, poll: &Poll) {
        let Some(c) = self.conns[t].as_mut() else {
            return;
        };
        let Some(done) = write_some(&mut c.stream, &c.out) else {
            c.dead = true;
            return;
        };
        c.out.drain(..done);
        if c.out.is_empty() {
            let _ = poll
                .registry()
                .reregister(&mut c.stream, Token(t), Interest::READABLE);
        }
    }

    /// Drops a connection that closed, failed or was answered a close frame.
    fn reap(&mut self, t: usize, poll: &Poll) {
        if !self.conns[t].as_ref().is_some_and(|c| c.dead) {
            return;
        }
        let Some(mut c) = self.conns[t].take() else {
            return;
        };
        let _ = poll.registry().deregister(&mut c.stream);
        if let Some(d) = c.doc {
            self.docs[d].retain(|&m| m != t);
        }
        self.free.push(t);
    }
}

/// One complete client frame at the start of `b`: (bytes used, opcode, unmasked payload).
fn parse_frame(b: &[u8]) -> Option<(usize, u8, Vec<u8>)> {
    if b.len() < 2 {
        return None;
    }
    let opcode = b[0] & 0x0f;
    let masked = b[1] & 0x80 != 0;
    let (len, mut pos) = match b[1] & 0x7f {
        126 => (
            u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            usize::try_from(u64::from_be_bytes(b.get(2..10)?.try_into().ok()?)).ok()?,
            10,
        ),
        n => (n as usize, 2),
    };
    let mask = if masked {
        let m: [u8; 4] = b.get(pos..pos + 4)?.try_into().ok()?;
        pos += 4;
        Some(m)
    } else {
        None
    };
    let end = pos.checked_add(len)?;
    let mut payload = b.get(pos..end)?.to_vec();
    if let Some(m) = mask {
        for (i, x) in payload.iter_mut().enumerate() {
            *x ^= m[i % 4];
        }
    }
    Some((end, opcode, payload))
}

fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 10);
    f.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= 0xffff => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}
