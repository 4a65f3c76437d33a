//! Limits on connections decided at the upgrade: the open-file limit, connections per client
//! IP and per document, and which IP a request comes from behind trusted proxies.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use tracing::{info, warn};

use crate::doc::registry::shrink_if_sparse;

/// Descriptors kept free for storage, the listeners and connections that are being refused.
/// sled opens files as it grows; without headroom an idle-socket flood starves it (EMFILE).
fn fd_headroom(limit: u64) -> u64 {
    (limit / 10).max(64)
}

/// Raises the soft open-file limit to the hard one and returns how many WebSocket connections
/// the server can hold with headroom for storage: `configured`, or less if the descriptors
/// would run out first.
pub fn connection_cap(configured: usize) -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "cannot read or raise the open-file limit");
            return configured;
        }
    };
    let usable = limit.saturating_sub(fd_headroom(limit)).max(1);
    let cap = configured.min(usize::try_from(usable).unwrap_or(usize::MAX));
    if cap < configured {
        info!(
            open_file_limit = limit,
            max_connections = cap,
            configured,
            "the open-file limit caps WebSocket connections below --max-connections (raise `ulimit -n` to serve more)"
        );
    } else {
        info!(
            open_file_limit = limit,
            max_connections = cap,
            "connection cap"
        );
    }
    cap
}

/// The client's IP: the peer, or, when the peer is a trusted proxy, the right-most address in
/// `X-Forwarded-For` that is not itself a trusted proxy (the left part is whatever the client
/// chose to send).
pub fn client_ip(
    peer: Option<SocketAddr>,
    forwarded_for: Option<&str>,
    trusted: &[IpNet],
) -> Option<IpAddr> {
    let peer = peer?.ip();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let Some(header) = forwarded_for else {
        return Some(peer);
    };
    let mut client = peer;
    for hop in header.rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) if is_trusted(&ip) => client = ip,
            Ok(ip) => return Some(ip),
            // A malformed entry: trust nothing to its left.
            Err(_) => return Some(client),
        }
    }
    Some(client)
}

/// Why [`Slots::acquire`] refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SlotRefusal {
    PerIp(usize),
    PerDoc(usize),
}

/// Connections held per client IP and per document.
pub struct Slots {
    max_per_ip: usize,
    max_per_doc: usize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    per_doc: Mutex<HashMap<String, usize>>,
}

/// One connection's place in [`Slots`], given back when dropped (when its session ends).
pub struct SlotGuard {
    slots: Arc<Slots>,
    ip: Option<IpAddr>,
    /// `None` for a socket that is not one document's (a Hocuspocus socket, whose documents
    /// each take their own place).
    doc: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is one map update; a panic cannot leave it half done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
            shrink_if_sparse(map);
        }
    }
}

impl Slots {
    /// `max_per_ip` 0 means no per-IP limit.
    pub fn new(max_per_ip: usize, max_per_doc: usize) -> Arc<Slots> {
        Arc::new(Slots {
            max_per_ip,
            max_per_doc,
            per_ip: Mutex::new(HashMap::new()),
            per_doc: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a place in `ip`'s count (when it is counted); the IP that was counted.
    fn take_ip(&self, ip: Option<IpAddr>) -> Result<Option<IpAddr>, SlotRefusal> {
        let counted_ip = ip.filter(|_| self.max_per_ip > 0);
        if let Some(ip) = counted_ip {
            let mut per_ip = lock(&self.per_ip);
            let n = per_ip.entry(ip).or_default();
            if *n >= self.max_per_ip {
                return Err(SlotRefusal::PerIp(self.max_per_ip));
            }
            *n += 1;
        }
        Ok(counted_ip)
    }

    /// A place in `ip`'s and `doc`'s counts.
    pub fn acquire(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
        doc: &str,
    ) -> Result<SlotGuard, SlotRefusal> {
        let counted_ip = self.take_ip(ip)?;
        let mut per_doc = lock(&self.per_doc);
        let n = per_doc.entry(doc.to_owned()).or_default();
        if *n >= self.max_per_doc {
            if *n == 0 {
                per_doc.remove(doc);
            }
            drop(per_doc);
            if let Some(ip) = counted_ip {
                release(&mut lock(&self.per_ip), &ip);
            }
            return Err(SlotRefusal::PerDoc(self.max_per_doc));
        }
        *n += 1;
        Ok(SlotGuard {
            slots: self.clone(),
            ip: counted_ip,
            doc: Some(doc.to_owned()),
        })
    }

    /// A place for a socket in its IP's count only (a Hocuspocus socket, whose documents each
    /// take their own place).
    pub fn acquire_ip(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<SlotGuard, SlotRefusal> {
        Ok(SlotGuard {
            slots: self.clone(),
            ip: self.take_ip(ip)?,
            doc: None,
        })
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Some(doc) = &self.doc {
            release(&mut lock(&self.slots.per_doc), doc);
        }
        if let Some(ip) = self.ip {
            release(&mut lock(&self.slots.per_ip), &ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: &str) -> Option<SocketAddr> {
        Some(SocketAddr::new(ip.parse().unwrap(), 1234))
    }

    #[test]
    fn forwarded_for_counts_only_behind_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            client_ip(peer("1.2.3.4"), Some("9.9.9.9"), &trusted),
            Some(ip("1.2.3.4"))
        );
        assert_eq!(
            client_ip(peer("10.0.0.1"), Some("9.9.9.9"), &trusted),
            Some(ip("9.9.9.9"))
        );
        assert_eq!(
            client_ip(
                peer("10.0.0.1"),
                Some("6.6.6.6, 9.9.9.9, 10.0.0.2"),
                &trusted
            ),
            Some(ip("9.9.9.9"))
        );
        assert_eq!(
            client_ip(peer("10.0.0.1"), None, &trusted),
            Some(ip("10.0.0.1"))
        );
        assert_eq!(
            client_ip(peer("10.0.0.1"), Some("junk, 10.0.0.3"), &trusted),
            Some(ip("10.0.0.3"))
        );
    }

    #[test]
    fn slots_are_counted_and_given_back() {
        let slots = Slots::new(2, 3);
        let ip: IpAddr = "1.2.3.4".parse().unwrap();
        let a = slots.acquire(Some(ip), "d").unwrap();
        let _b = slots.acquire(Some(ip), "d").unwrap();
        assert_eq!(
            slots.acquire(Some(ip), "e").err(),
            Some(SlotRefusal::PerIp(2))
        );
        let _c = slots.acquire(None, "d").unwrap();
        assert_eq!(slots.acquire(None, "d").err(), Some(SlotRefusal::PerDoc(3)));
        drop(a);
        assert!(slots.acquire(Some(ip), "e").is_ok());
        assert!(lock(&slots.per_doc).get("e").is_none(), "released on drop");
    }

    #[test]
    fn the_counts_give_their_memory_back_after_a_burst() {
        let slots = Slots::new(100_000, 4);
        let guards: Vec<SlotGuard> = (0..10_000u32)
            .map(|i| {
                let ip = IpAddr::from(i.to_be_bytes());
                slots.acquire(Some(ip), &format!("doc-{i}")).unwrap()
            })
            .collect();
        assert!(lock(&slots.per_doc).capacity() >= 10_000);
        drop(guards);
        assert!(lock(&slots.per_doc).is_empty());
        assert!(lock(&slots.per_doc).capacity() <= 64);
        assert!(lock(&slots.per_ip).capacity() <= 64);
    }
}
