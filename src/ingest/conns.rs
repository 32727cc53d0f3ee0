//! Connection slots for the local API: at most a cap of connections are
//! served, and a connection that does nothing useful cannot keep a writer
//! out.
//!
//! Past the cap the server stops accepting: connections wait in the
//! kernel's listen backlog and cost the agent no descriptor. Answering them
//! 503 instead would mean accepting each one and holding a descriptor until
//! it was answered, and 600 idle clients that reconnect would still keep
//! every legitimate writer out. So when the cap is reached and someone is
//! waiting, one idle connection is closed to make room: first one that has
//! never made an authorised request (a flood, a slowloris, a probe), oldest
//! first; then an authorised writer's idle keep-alive connection, least
//! recently used first. A connection in the middle of a request is never
//! closed; when every slot is busy the next connection waits for one to
//! finish (bounded by the header and body timeouts).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::sync::Locked;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The connections being served, and the permits that cap them.
pub struct Slots {
    permits: Arc<Semaphore>,
    cap: usize,
    open: Mutex<Vec<Arc<Conn>>>,
    /// A clock of events: acceptances and request ends.
    tick: AtomicU64,
}

/// One served connection, as eviction sees it.
pub struct Conn {
    /// Has made at least one authorised request.
    authorised: AtomicBool,
    /// Requests in progress.
    busy: AtomicUsize,
    /// The tick of its acceptance or of its last request's end.
    last_active: AtomicU64,
    evicted: AtomicBool,
    wake: Notify,
}

/// A slot held by one connection; dropping it frees the slot.
pub struct Held {
    slots: Arc<Slots>,
    pub conn: Arc<Conn>,
    _permit: OwnedSemaphorePermit,
}

/// A request in progress on a connection; dropping it ends the request.
pub struct Busy<'a> {
    slots: &'a Slots,
    conn: &'a Conn,
}

impl Slots {
    pub fn new(cap: usize) -> Arc<Slots> {
        Arc::new(Slots {
            permits: Arc::new(Semaphore::new(cap)),
            cap,
            open: Mutex::new(Vec::with_capacity(cap)),
            tick: AtomicU64::new(0),
        })
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// A slot, if one is free now.
    pub fn try_take(self: &Arc<Self>) -> Option<Held> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        Some(self.held(permit))
    }

    /// A slot, once one is free.
    pub async fn take(self: &Arc<Self>) -> Held {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the slots' semaphore is never closed");
        self.held(permit)
    }

    fn held(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Held {
        let conn = Arc::new(Conn {
            authorised: AtomicBool::new(false),
            busy: AtomicUsize::new(0),
            last_active: AtomicU64::new(self.tick.fetch_add(1, Ordering::Relaxed)),
            evicted: AtomicBool::new(false),
            wake: Notify::new(),
        });
        self.lock().push(conn.clone());
        Held {
            slots: self.clone(),
            conn,
            _permit: permit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Conn>>> {
        self.open.locked()
    }

    /// Closes the least useful idle connection (see the module doc) to make
    /// room; false when every connection is in the middle of a request.
    pub fn evict_one(&self) -> bool {
        let open = self.lock();
        let idle = open
            .iter()
            .filter(|c| c.busy.load(Ordering::Acquire) == 0 && !c.evicted.load(Ordering::Relaxed));
        let victim = idle.min_by_key(|c| {
            (
                c.authorised.load(Ordering::Relaxed),
                c.last_active.load(Ordering::Relaxed),
            )
        });
        match victim {
            Some(c) => {
                c.evicted.store(true, Ordering::Relaxed);
                // Stores a permit: the connection sees it even if it is not
                // waiting yet.
                c.wake.notify_one();
                true
            }
            None => false,
        }
    }

    /// Connections being served now.
    pub fn open(&self) -> usize {
        self.lock().len()
    }
}

impl Conn {
    /// Marks a request as started (authorised or not); it ends when the
    /// returned guard is dropped.
    pub fn request<'a>(&'a self, slots: &'a Slots, authorised: bool) -> Busy<'a> {
        self.busy.fetch_add(1, Ordering::AcqRel);
        if authorised {
            self.authorised.store(true, Ordering::Relaxed);
        }
        Busy { slots, conn: self }
    }

    /// Resolves once this connection was chosen to be closed.
    pub async fn evicted(&self) {
        self.wake.notified().await;
    }

    pub fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Whether an eviction can go ahead: true when no request is in
    /// progress. A request may have started between the choice and now;
    /// then the connection is spared (and may be chosen again later).
    pub fn still_idle(&self) -> bool {
        if self.busy.load(Ordering::Acquire) == 0 {
            return true;
        }
        self.evicted.store(false, Ordering::Relaxed);
        false
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.conn.last_active.store(
            self.slots.tick.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.conn.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Held {
    pub fn slots(&self) -> &Slots {
        &self.slots
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.slots.lock().retain(|c| !Arc::ptr_eq(c, &self.conn));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_strangers_go_first_then_idle_writers_never_busy_ones() {
        let slots = Slots::new(4);
        let writer = slots.try_take().unwrap();
        drop(writer.conn.request(&slots, true));
        let stranger_old = slots.try_take().unwrap();
        let stranger_new = slots.try_take().unwrap();
        let busy = slots.try_take().unwrap();
        let _in_request = busy.conn.request(&slots, false);
        assert!(slots.try_take().is_none(), "the cap holds");
        assert_eq!(slots.open(), 4);

        assert!(slots.evict_one());
        assert!(stranger_old.conn.is_evicted(), "the oldest stranger first");
        drop(stranger_old);
        assert!(slots.evict_one());
        assert!(stranger_new.conn.is_evicted());
        drop(stranger_new);
        assert!(slots.evict_one());
        assert!(writer.conn.is_evicted(), "then the idle writer");
        drop(writer);
        assert!(!slots.evict_one(), "never one in a request");
        assert!(!busy.conn.is_evicted());
        assert_eq!(slots.open(), 1);
        assert!(slots.try_take().is_some(), "the freed slots are back");
    }

    #[test]
    fn the_least_recently_used_writer_goes_first() {
        let slots = Slots::new(2);
        let a = slots.try_take().unwrap();
        let b = slots.try_take().unwrap();
        drop(a.conn.request(&slots, true));
        drop(b.conn.request(&slots, true));
        drop(a.conn.request(&slots, true));
        assert!(slots.evict_one());
        assert!(b.conn.is_evicted() && !a.conn.is_evicted());
    }

    #[test]
    fn a_request_started_after_the_choice_spares_the_connection() {
        let slots = Slots::new(1);
        let held = slots.try_take().unwrap();
        assert!(slots.evict_one());
        let busy = held.conn.request(&slots, false);
        assert!(!held.conn.still_idle());
        assert!(!held.conn.is_evicted());
        drop(busy);
        assert!(slots.evict_one(), "chosen again once idle");
        assert!(held.conn.still_idle());
    }

    #[tokio::test]
    async fn an_evicted_connection_is_woken_and_its_slot_returns() {
        let slots = Slots::new(1);
        let held = slots.try_take().unwrap();
        assert!(slots.evict_one());
        // The eviction was signalled before anyone waited: it is not lost.
        held.conn.evicted().await;
        drop(held);
        let again = slots.take().await;
        assert_eq!(again.slots().cap(), 1);
    }
}
