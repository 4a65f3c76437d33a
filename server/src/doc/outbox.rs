//! The bounded queue from a document to one connection.
//!
//! One exists for every open connection, idle ones included, so its size is paid 10,000 times
//! over at 10,000 connections. tokio's `mpsc` cache-pads its shared state and allocates slots 32
//! at a time: about 800 bytes resident per channel (measured with heaptrack at 2,500 × 4
//! connections), against about 100 here. `futures-channel` allocates a node per message and an
//! `Arc` per sender; `async-channel` allocates its whole bound up front. The queue is a
//! `VecDeque` under a lock that is held only to push or pop, with the one waker of the one
//! receiver; a message costs no allocation once the deque has grown to the usual depth.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

struct State<T> {
    queue: VecDeque<T>,
    capacity: usize,
    senders: usize,
    receiver: bool,
    waker: Option<Waker>,
}

struct Shared<T> {
    state: Mutex<State<T>>,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing here can panic while holding the lock except an allocation failure; a
        // poisoned queue is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A queue of at most `capacity` messages (at least one).
pub fn outbox<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            capacity: capacity.max(1),
            senders: 1,
            receiver: true,
            waker: None,
        }),
    });
    (Sender(shared.clone()), Receiver(shared))
}

/// Why a message was not queued; it is given back.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// The receiver has not taken the messages before it: `capacity` are waiting.
    Full(T),
    /// The receiver is gone.
    Closed(T),
}

pub struct Sender<T>(Arc<Shared<T>>);

impl<T> Sender<T> {
    /// Queues `msg` without waiting, and wakes the receiver.
    pub fn try_send(&self, msg: T) -> Result<(), TrySendError<T>> {
        let mut s = self.0.lock();
        if !s.receiver {
            return Err(TrySendError::Closed(msg));
        }
        if s.queue.len() >= s.capacity {
            return Err(TrySendError::Full(msg));
        }
        s.queue.push_back(msg);
        let waker = s.waker.take();
        drop(s);
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Messages queued and not yet taken.
    pub fn queued(&self) -> usize {
        self.0.lock().queue.len()
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        Sender(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.senders -= 1;
        let waker = if s.senders == 0 { s.waker.take() } else { None };
        drop(s);
        // The receiver sees the end once it has taken what is queued.
        if let Some(w) = waker {
            w.wake();
        }
    }
}

pub struct Receiver<T>(Arc<Shared<T>>);

impl<T> Receiver<T> {
    /// The next message; `None` once every sender is gone and the queue is empty.
    /// Cancel-safe: a message is taken only when this returns it.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| {
            let mut s = self.0.lock();
            if let Some(msg) = s.queue.pop_front() {
                return Poll::Ready(Some(msg));
            }
            if s.senders == 0 {
                return Poll::Ready(None);
            }
            match &mut s.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                w => *w = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// The next message if one is queued.
    pub fn try_recv(&mut self) -> Option<T> {
        self.0.lock().queue.pop_front()
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.receiver = false;
        // Messages nobody will take are freed now, not when the last sender goes.
        let queued = std::mem::take(&mut s.queue);
        drop(s);
        drop(queued);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn messages_arrive_in_order_up_to_the_bound() {
        let (tx, mut rx) = outbox::<u32>(3);
        for i in 0..3 {
            tx.try_send(i).unwrap();
        }
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        assert_eq!(tx.queued(), 3);
        assert_eq!(rx.recv().await, Some(0));
        assert_eq!(rx.try_recv(), Some(1));
        tx.try_send(4).unwrap();
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(4));
        assert_eq!(rx.try_recv(), None);
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_send_and_by_the_last_sender_leaving() {
        let (tx, mut rx) = outbox::<u32>(8);
        let tx2 = tx.clone();
        let waiting = tokio::spawn(async move {
            let first = rx.recv().await;
            let second = rx.recv().await;
            let end = rx.recv().await;
            (first, second, end)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.try_send(1).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx2.try_send(2).unwrap();
        drop(tx);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "one sender is still there");
        drop(tx2);
        let got = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the receiver was never woken")
            .unwrap();
        assert_eq!(got, (Some(1), Some(2), None));
    }

    #[tokio::test]
    async fn a_cancelled_receive_loses_nothing() {
        let (tx, mut rx) = outbox::<u32>(8);
        let pending = tokio::time::timeout(Duration::from_millis(10), rx.recv()).await;
        assert!(pending.is_err());
        tx.try_send(7).unwrap();
        assert_eq!(rx.recv().await, Some(7));
    }

    #[test]
    fn sending_to_a_dropped_receiver_fails_and_frees_what_was_queued() {
        let (tx, rx) = outbox::<Arc<()>>(8);
        let msg = Arc::new(());
        tx.try_send(msg.clone()).unwrap();
        drop(rx);
        assert_eq!(Arc::strong_count(&msg), 1, "the queued copy was not freed");
        assert!(matches!(tx.try_send(msg), Err(TrySendError::Closed(_))));
    }

    #[test]
    fn the_shared_state_is_small() {
        // What every idle connection pays (tokio's channel: about 800 bytes).
        let size = std::mem::size_of::<Shared<crate::doc::messages::Outgoing>>();
        assert!(size <= 96, "{size} bytes");
    }
}
