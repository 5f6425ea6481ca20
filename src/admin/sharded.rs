//! A counter that many threads add to without sharing a cache line: each thread adds to its
//! own shard, and reading sums the shards. For counts bumped on the hot path (bytes as they
//! move), where one shared atomic would bounce its cache line between the cores.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Shards per counter: past this many threads, threads share shards (still correct, just
/// contended). The relay runs one data-plane thread per core.
const SHARDS: usize = 8;

/// One shard on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Shard(AtomicU64);

/// A monotonically increasing counter sharded by thread (see the module doc).
#[derive(Debug, Default)]
pub struct Sharded {
    shards: [Shard; SHARDS],
}

/// This thread's shard.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

impl Sharded {
    /// Adds `n` to this thread's shard.
    pub fn add(&self, n: u64) {
        self.shards[shard()].0.fetch_add(n, Ordering::Relaxed);
    }

    /// The sum of every shard: every add that happened before the call, and maybe some during it.
    pub fn get(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_from_many_threads_sum_up() {
        let c = Sharded::default();
        std::thread::scope(|s| {
            for _ in 0..(2 * SHARDS + 3) {
                s.spawn(|| (0..1000).for_each(|_| c.add(3)));
            }
        });
        assert_eq!(c.get(), (2 * SHARDS as u64 + 3) * 3000);
        assert_eq!(std::mem::align_of::<Shard>(), 64);
    }
}
