//! Sector-range locking: readers of a range share it, a writer holds it alone.
//!
//! The userspace data path reads, decrypts, merges, encrypts and writes whole sectors; two
//! requests that touch the same sector (even disjoint bytes of it) must not interleave, or
//! one read-modify-write would undo the other. Requests are few and short-lived, so the set
//! of held ranges is a small vector behind one mutex.

use std::sync::{Condvar, Mutex, MutexGuard};

/// Locks on half-open byte ranges `[start, end)` of the data segment.
#[derive(Default)]
pub(crate) struct RangeLock {
    held: Mutex<Vec<Held>>,
    released: Condvar,
    #[cfg(test)]
    waits: std::sync::atomic::AtomicUsize,
}

#[derive(Clone, Copy)]
struct Held {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

impl Held {
    fn conflicts(&self, start: u64, end: u64, exclusive: bool) -> bool {
        self.start < end && start < self.end && (self.exclusive || exclusive)
    }
}

/// A held range; released on drop.
pub(crate) struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl RangeLock {
    /// Blocks until `[start, end)` can be held (shared unless `exclusive`), then holds it.
    pub(crate) fn lock(&self, start: u64, end: u64, exclusive: bool) -> RangeGuard<'_> {
        let mut held = self.guard();
        while held.iter().any(|h| h.conflicts(start, end, exclusive)) {
            #[cfg(test)]
            self.waits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held = self
                .released
                .wait(held)
                .unwrap_or_else(|poison| poison.into_inner());
        }
        let id = held.iter().map(|h| h.id + 1).max().unwrap_or(0);
        held.push(Held {
            id,
            start,
            end,
            exclusive,
        });
        RangeGuard { lock: self, id }
    }

    fn guard(&self) -> MutexGuard<'_, Vec<Held>> {
        // A panic while holding the mutex cannot leave the vector inconsistent (push and
        // swap_remove are the only mutations), so a poisoned lock is still usable.
        self.held
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    #[cfg(test)]
    fn held_count(&self) -> usize {
        self.guard().len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.guard();
        if let Some(i) = held.iter().position(|h| h.id == self.id) {
            held.swap_remove(i);
        }
        drop(held);
        self.lock.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn shared_ranges_coexist_and_disjoint_writers_too() {
        let l = RangeLock::default();
        let a = l.lock(0, 4096, false);
        let b = l.lock(0, 4096, false);
        let c = l.lock(4096, 8192, true);
        assert_eq!(l.held_count(), 3);
        drop((a, b, c));
        assert_eq!(l.held_count(), 0);
    }

    #[test]
    fn a_writer_waits_for_an_overlapping_reader() {
        let l = Arc::new(RangeLock::default());
        let reader = l.lock(0, 8192, false);
        let acquired = Arc::new(AtomicBool::new(false));
        let t = {
            let (l, acquired) = (l.clone(), acquired.clone());
            std::thread::spawn(move || {
                let _w = l.lock(4095, 4097, true);
                acquired.store(true, Ordering::SeqCst);
            })
        };
        // Wait (with a deadline) until the writer has found the conflict and gone to sleep.
        let deadline = Instant::now() + Duration::from_secs(10);
        while l.waits.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the writer never blocked");
            std::thread::yield_now();
        }
        assert!(!acquired.load(Ordering::SeqCst));
        drop(reader);
        t.join().unwrap();
        assert!(acquired.load(Ordering::SeqCst));
        assert_eq!(l.held_count(), 0);
    }

    #[test]
    fn conflict_rules() {
        let h = Held {
            id: 0,
            start: 512,
            end: 1024,
            exclusive: false,
        };
        assert!(
            !h.conflicts(0, 512, true),
            "half-open: touching is not overlapping"
        );
        assert!(!h.conflicts(1024, 2048, true));
        assert!(!h.conflicts(0, 4096, false), "readers share");
        assert!(h.conflicts(1023, 1024, true));
        let w = Held {
            exclusive: true,
            ..h
        };
        assert!(w.conflicts(600, 700, false));
    }
}
