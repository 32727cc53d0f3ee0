//! Locks, taken one way.
//!
//! No lock in the agent guards an invariant that a panic could leave half
//! done: each holds a status snapshot, counters, a handle or a routing table
//! replaced whole, or a flag. So a lock a panicking thread left poisoned is
//! taken as it is. The panic itself is what gets reported, where the thread
//! is joined (a shipping worker's at shutdown or reload; the queue writer's
//! by the queue answering `Closed`); the HTTP server, the status answer and
//! the shutdown do not each panic in turn over the poisoned lock.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// [`Mutex::lock`], taking a poisoned lock as it is.
pub trait Locked<T> {
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> Locked<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// [`RwLock::read`] and [`RwLock::write`], taking a poisoned lock as it is.
pub trait RwLocked<T> {
    fn read_locked(&self) -> RwLockReadGuard<'_, T>;
    fn write_locked(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T> RwLocked<T> for RwLock<T> {
    fn read_locked(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_locked(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(PoisonError::into_inner)
    }
}
