//! How many visitors each worker is encrypting itself right now (TLS without kTLS). A TLS data connection
//! without kTLS costs CPU on the worker that owns it, and neither `SO_REUSEPORT` nor the
//! pools nor the agent's round-robin dialling place visitors by load: four iperf3 streams
//! could all land on one worker of each side while the others idled (2.7 against 4.9 Gbit/s
//! on 2 cores). With these counts the relay's accepting worker hands a visitor to the pool of
//! the worker copying fewest ([`least_busy`]), and an agent worker moves a data connection
//! whose visitor is starting to a worker copying fewer ([`reserve_elsewhere`]).
//!
//! Each count sits on a cache line of its own. It is written by its own worker as visits
//! start and end there, and by a worker moving a visitor there. Spliced visitors (plain or
//! kTLS) are not counted: the kernel moves their bytes, and they stay where they are.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One worker's count on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Slot(AtomicUsize);

/// Every worker's count of visitors it encrypts itself, indexed by worker.
#[derive(Debug)]
pub struct Loads {
    slots: Box<[Slot]>,
}

impl Loads {
    /// Counts for `workers` workers, all zero.
    pub fn new(workers: usize) -> Arc<Loads> {
        Arc::new(Loads {
            slots: (0..workers.max(1)).map(|_| Slot::default()).collect(),
        })
    }

    /// The worker among the first `n` copying fewest visitors; `local` when it is among the
    /// fewest (a hand-off to another worker costs a wake-up there).
    pub fn least_busy(&self, local: usize, n: usize) -> usize {
        let mut best = (self.count(local), local);
        for i in 0..n {
            let c = self.count(i);
            if c < best.0 {
                best = (c, i);
            }
        }
        best.1
    }

    /// Worker `i`'s count now.
    pub fn count(&self, i: usize) -> usize {
        self.slots.get(i).map_or(0, |s| s.0.load(Ordering::Relaxed))
    }
}

thread_local! {
    /// This worker's index and the table it counts in (unset off the workers).
    static HERE: RefCell<Option<(usize, Arc<Loads>)>> = const { RefCell::new(None) };
}

/// Makes this thread worker `worker`, counting in `loads`. Called once, as a worker starts.
pub fn enter(worker: usize, loads: Arc<Loads>) {
    HERE.with(|h| *h.borrow_mut() = Some((worker, loads)));
}

/// The worker a visitor accepted by worker `local` should go to, among `n` workers: the one
/// encrypting fewest visitors (`local` off the workers, or on a tie).
pub fn least_busy(local: usize, n: usize) -> usize {
    HERE.with(|h| match &*h.borrow() {
        Some((_, loads)) => loads.least_busy(local, n),
        None => local,
    })
}

/// The worker copying fewer visitors than this one, to move a visitor that is about to start
/// here to; `None` when this one is among the least busy (or off the workers).
/// The visitor is counted there at once ([`Copying::adopt`] takes the count over), so visitors
/// starting in a burst see it; [`unreserve`] gives it back if the move fails.
pub fn reserve_elsewhere() -> Option<usize> {
    HERE.with(|h| {
        let here = h.borrow();
        let (here, loads) = here.as_ref()?;
        let target = loads.least_busy(*here, loads.slots.len());
        (target != *here).then(|| {
            loads.slots[target].0.fetch_add(1, Ordering::Relaxed);
            target
        })
    })
}

/// Gives back the count [`reserve_elsewhere`] took on `target` (the move did not happen).
pub fn unreserve(target: usize) {
    HERE.with(|h| {
        if let Some((_, loads)) = &*h.borrow() {
            loads.slots[target].0.fetch_sub(1, Ordering::Relaxed);
        }
    });
}

/// One visitor being encrypted on this worker, counted until dropped. It holds
/// nothing: the count is found through the thread, so it does not grow the connection task.
#[derive(Debug)]
pub struct Copying(());

impl Copying {
    /// Counts one more visitor on this worker (nothing off the workers).
    pub fn start() -> Copying {
        Self::here(|slot| {
            slot.fetch_add(1, Ordering::Relaxed);
        });
        Copying(())
    }

    /// Takes over the count another worker made here for a visitor it moved here
    /// ([`reserve_elsewhere`]); given back when dropped, like [`Self::start`]'s.
    pub fn adopt() -> Copying {
        Copying(())
    }

    /// This worker's slot, if this thread is a worker.
    fn here(f: impl FnOnce(&AtomicUsize)) {
        HERE.with(|h| {
            if let Some((i, loads)) = &*h.borrow() {
                f(&loads.slots[*i].0);
            }
        });
    }
}

impl Drop for Copying {
    fn drop(&mut self) {
        Self::here(|slot| {
            slot.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_visitor_goes_to_the_worker_copying_fewest_and_stays_local_on_a_tie() {
        let loads = Loads::new(3);
        let on = |worker: usize, f: &(dyn Fn() -> Vec<Copying> + Sync)| {
            let loads = loads.clone();
            std::thread::scope(|s| {
                s.spawn(move || {
                    enter(worker, loads);
                    std::mem::forget(f());
                });
            });
        };
        assert_eq!(loads.least_busy(1, 3), 1, "all idle: stay");
        on(1, &|| vec![Copying::start(), Copying::start()]);
        on(0, &|| vec![Copying::start()]);
        assert_eq!((loads.count(0), loads.count(1), loads.count(2)), (1, 2, 0));
        assert_eq!(loads.least_busy(1, 3), 2);
        assert_eq!(
            loads.least_busy(0, 2),
            0,
            "only the first two workers asked"
        );
        assert_eq!(loads.least_busy(1, 2), 0);
        // Out-of-range indexes read as idle rather than panic.
        assert_eq!(loads.count(7), 0);
    }

    #[test]
    fn a_visit_ending_gives_its_count_back_and_off_the_workers_nothing_counts() {
        let loads = Loads::new(2);
        let l = loads.clone();
        std::thread::spawn(move || {
            enter(1, l);
            let a = Copying::start();
            let b = Copying::start();
            drop(a);
            assert_eq!(least_busy(1, 2), 0, "worker 1 copies one, worker 0 none");
            std::mem::forget(b);
        })
        .join()
        .unwrap();
        assert_eq!((loads.count(0), loads.count(1)), (0, 1));
        // This thread never entered a worker: no table, no count, stay local.
        drop(Copying::start());
        assert_eq!(least_busy(1, 2), 1);
        assert_eq!((loads.count(0), loads.count(1)), (0, 1));
    }

    #[test]
    fn a_visitor_moved_elsewhere_is_counted_there_at_once_and_adopted() {
        let loads = Loads::new(2);
        let (l0, l1) = (loads.clone(), loads.clone());
        std::thread::spawn(move || {
            enter(0, l0);
            let here = Copying::start();
            // Worker 1 copies nothing: the next visitor moves there, counted there now.
            assert_eq!(reserve_elsewhere(), Some(1));
            // 1 against 1: the one after stays.
            assert_eq!(reserve_elsewhere(), None);
            let again = Copying::start();
            assert_eq!(reserve_elsewhere(), Some(1));
            unreserve(1); // that move failed
            std::mem::forget((here, again));
        })
        .join()
        .unwrap();
        assert_eq!((loads.count(0), loads.count(1)), (2, 1));
        std::thread::spawn(move || {
            enter(1, l1);
            drop(Copying::adopt());
        })
        .join()
        .unwrap();
        assert_eq!((loads.count(0), loads.count(1)), (2, 0));
    }
}
