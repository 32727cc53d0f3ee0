//! One memory budget for every request being processed
//! (`listen.max_request_memory`). Each request charges the bytes it holds
//! as it comes to hold them: the raw body as it arrives (by the capacity of
//! its buffer), the inflated body as it is inflated, and the normalised
//! lines before they are made. A charge that does not fit waits for others
//! to finish, briefly (see [`WAIT`]); then the request is answered 503 with
//! `Retry-After`, and everything it held is released. Bounding each body
//! alone is not enough: sixteen concurrent 30 MB writes once held 2.3 GB.
//!
//! The oldest request holding memory is never refused, whatever it needs (up
//! to `max_body_size` per stage). Requests charge as their bodies arrive,
//! so without this, requests that each hold part of their body could fill
//! the budget and all wait for each other; with it the oldest always
//! finishes and frees its share, and a budget smaller than one largest
//! request slows writes down instead of refusing them all. Memory is then
//! bounded by the limit plus what one request holds. Waiting stops reading
//! the client's socket, so TCP holds the rest of its body back.
//!
//! Charges are taken from async handlers and from the blocking threads that
//! inflate bodies, so the budget is a mutex with both a [`Notify`] and a
//! [`Condvar`] for waiters.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::sync::Locked;
use tokio::sync::Notify;

/// Longest a request waits for memory, at each charge, before its 503.
pub const WAIT: Duration = Duration::from_secs(5);

/// The bytes held by requests in progress, against a limit.
#[derive(Default)]
pub struct Budget {
    state: Mutex<State>,
    async_waiters: Notify,
    blocking_waiters: Condvar,
    /// Tickets of charges, in the order requests came.
    next_ticket: AtomicU64,
}

#[derive(Default)]
struct State {
    used: u64,
    /// Tickets of the charges holding something: the first is the oldest.
    holders: BTreeSet<u64>,
}

/// What one request holds; released when dropped.
pub struct Charge {
    budget: Arc<Budget>,
    ticket: u64,
    held: u64,
}

/// The request did not get the memory it needed within [`WAIT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted;

impl Budget {
    pub fn new() -> Arc<Budget> {
        Arc::new(Budget::default())
    }

    /// A request's charge, holding nothing yet.
    pub fn charge(self: &Arc<Self>) -> Charge {
        Charge {
            budget: self.clone(),
            ticket: self.next_ticket.fetch_add(1, Ordering::Relaxed),
            held: 0,
        }
    }

    /// Bytes held by all requests now.
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.locked()
    }

    /// Charges `n` to `ticket` if it fits under `limit`, or if `ticket` is
    /// the oldest holder (or nobody holds anything).
    fn try_add(state: &mut State, ticket: u64, n: u64, limit: u64) -> bool {
        let oldest = state.holders.first().is_none_or(|&t| t == ticket);
        if state.used.saturating_add(n) <= limit || oldest {
            state.used += n;
            state.holders.insert(ticket);
            true
        } else {
            false
        }
    }

    /// Releases `n` bytes of `ticket`'s, which then holds `left`.
    fn release(&self, ticket: u64, n: u64, left: u64) {
        if n == 0 {
            return;
        }
        let mut state = self.lock();
        state.used = state.used.saturating_sub(n);
        if left == 0 {
            state.holders.remove(&ticket);
        }
        drop(state);
        self.async_waiters.notify_waiters();
        self.blocking_waiters.notify_all();
    }
}

impl Charge {
    /// Charges `n` more bytes under `limit`, waiting up to [`WAIT`].
    pub async fn grow(&mut self, n: u64, limit: u64) -> Result<(), Exhausted> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            // Registered before the check, so a release between the check
            // and the wait is not missed.
            let freed = self.budget.async_waiters.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if Budget::try_add(&mut self.budget.lock(), self.ticket, n, limit) {
                self.held += n;
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(Exhausted);
            }
        }
    }

    /// As [`Charge::grow`], from a blocking thread.
    pub fn grow_blocking(&mut self, n: u64, limit: u64) -> Result<(), Exhausted> {
        let deadline = Instant::now() + WAIT;
        let mut state = self.budget.lock();
        loop {
            if Budget::try_add(&mut state, self.ticket, n, limit) {
                self.held += n;
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Exhausted);
            }
            state = self
                .budget
                .blocking_waiters
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Releases `n` of the bytes held (a buffer was freed).
    pub fn shrink(&mut self, n: u64) {
        let n = n.min(self.held);
        self.held -= n;
        self.budget.release(self.ticket, n, self.held);
    }

    pub fn held(&self) -> u64 {
        self.held
    }

    /// A charge on the same budget holding nothing, to stand in for this
    /// one while it is moved to another thread.
    pub fn detached(&self) -> Charge {
        self.budget.charge()
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.release(self.ticket, self.held, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn charges_wait_for_room_then_give_up() {
        let budget = Budget::new();
        let mut a = budget.charge();
        a.grow(60, 100).await.unwrap();
        let mut b = budget.charge();
        b.grow(40, 100).await.unwrap();
        assert_eq!(budget.used(), 100);
        // Full: a third waits, and gets its room when `a` lets go.
        let mut c = budget.charge();
        let waiting = tokio::spawn(async move {
            let r = c.grow(50, 100).await;
            (r, c)
        });
        tokio::task::yield_now().await;
        drop(a);
        let (r, c) = waiting.await.unwrap();
        assert_eq!(r, Ok(()));
        assert_eq!(budget.used(), 90);
        // Nothing frees up: refused after the wait (time is paused, so the
        // wait passes at once).
        let mut d = budget.charge();
        assert_eq!(d.grow(20, 100).await, Err(Exhausted));
        assert_eq!(d.held(), 0);
        drop((b, c));
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_holder_always_proceeds() {
        let budget = Budget::new();
        let mut big = budget.charge();
        big.grow(500, 100).await.unwrap();
        big.grow(500, 100).await.unwrap();
        assert_eq!(budget.used(), 1000);
        big.shrink(400);
        assert_eq!(budget.used(), 600);
        let mut other = budget.charge();
        assert_eq!(other.grow(1, 100).await, Err(Exhausted));
        drop(big);
        assert_eq!(budget.used(), 0);

        // Two requests holding part of their bodies each, the budget full:
        // the older one is not stuck waiting for the younger.
        let mut older = budget.charge();
        let mut younger = budget.charge();
        older.grow(50, 100).await.unwrap();
        younger.grow(50, 100).await.unwrap();
        assert_eq!(younger.grow(10, 100).await, Err(Exhausted));
        assert_eq!(older.grow(10, 100).await, Ok(()));
        // Once it lets go entirely, the younger is the oldest holder.
        older.shrink(60);
        assert_eq!(younger.grow(100, 100).await, Ok(()));
    }

    #[test]
    fn blocking_charges_see_releases() {
        let budget = Budget::new();
        let mut a = budget.charge();
        a.grow_blocking(100, 100).unwrap();
        let b = budget.clone();
        let t = std::thread::spawn(move || {
            let mut c = b.charge();
            c.grow_blocking(50, 100).map(|()| c.held())
        });
        std::thread::sleep(Duration::from_millis(50));
        a.shrink(60);
        assert_eq!(t.join().unwrap(), Ok(50));
        assert_eq!(budget.used(), 40);
    }
}
