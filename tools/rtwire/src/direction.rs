//! One direction of a wire: frames in from one interface, out of the other, shaped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::packet::PacketSocket;
use crate::{Shape, Stats};

/// Longest a direction sleeps with nothing queued, so it notices `stop` soon.
const IDLE_TICK: Duration = Duration::from_millis(50);
/// Frames read in one go before due frames are sent again.
const READ_BATCH: usize = 256;
/// Room for the largest frame a packet socket can hand over.
const FRAME_MAX: usize = 65_536;

/// Settings both directions read on every frame, and the switches.
pub struct Control {
    delay_ns: AtomicU64,
    rate_bps: AtomicU64,
    /// Loss as a share of `u32::MAX`.
    loss: AtomicU32,
    limit: AtomicU64,
    pub cut: AtomicBool,
    pub stop: AtomicBool,
}

impl Control {
    pub fn new(shape: Shape) -> Control {
        let c = Control {
            delay_ns: AtomicU64::new(0),
            rate_bps: AtomicU64::new(0),
            loss: AtomicU32::new(0),
            limit: AtomicU64::new(0),
            cut: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        };
        c.set(shape);
        c
    }

    pub fn set(&self, s: Shape) {
        self.delay_ns
            .store(s.delay.as_nanos() as u64, Ordering::Relaxed);
        self.rate_bps.store(s.rate_bps, Ordering::Relaxed);
        let loss = (s.loss.clamp(0.0, 1.0) * u32::MAX as f64) as u32;
        self.loss.store(loss, Ordering::Relaxed);
        self.limit.store(s.limit as u64, Ordering::Relaxed);
    }

    pub fn get(&self) -> Shape {
        Shape {
            delay: Duration::from_nanos(self.delay_ns.load(Ordering::Relaxed)),
            rate_bps: self.rate_bps.load(Ordering::Relaxed),
            loss: self.loss.load(Ordering::Relaxed) as f64 / u32::MAX as f64,
            limit: self.limit.load(Ordering::Relaxed) as usize,
        }
    }
}

/// Counters of one direction, read by [`crate::Wire::stats`].
#[derive(Default)]
pub struct Counts {
    forwarded: AtomicU64,
    lost: AtomicU64,
    cut: AtomicU64,
    overflow: AtomicU64,
}

impl Counts {
    pub fn get(&self) -> Stats {
        Stats {
            forwarded: self.forwarded.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            cut: self.cut.load(Ordering::Relaxed),
            overflow: self.overflow.load(Ordering::Relaxed),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A frame on the wire and when it reaches the far end.
struct Held {
    due: Instant,
    frame: Vec<u8>,
}

/// One direction's thread state.
pub struct Direction {
    rx: Arc<PacketSocket>,
    tx: Arc<PacketSocket>,
    control: Arc<Control>,
    counts: Arc<Counts>,
    queue: VecDeque<Held>,
    /// When the frame being serialised leaves (the rate's clock).
    free_at: Instant,
    rng: u64,
    spare: Vec<Vec<u8>>,
}

impl Direction {
    pub fn new(
        rx: Arc<PacketSocket>,
        tx: Arc<PacketSocket>,
        control: Arc<Control>,
        counts: Arc<Counts>,
        seed: u64,
    ) -> Direction {
        Direction {
            rx,
            tx,
            control,
            counts,
            queue: VecDeque::new(),
            free_at: Instant::now(),
            rng: 0x9E37_79B9_7F4A_7C15 ^ (seed + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9),
            spare: Vec::new(),
        }
    }

    /// Forwards until the control says stop. A socket error other than a full queue ends
    /// the direction (the interface went away).
    pub fn run(mut self) {
        let mut buf = vec![0u8; FRAME_MAX];
        while !self.control.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let wait = match self.queue.front() {
                Some(h) => h.due.saturating_duration_since(now).min(IDLE_TICK),
                None => IDLE_TICK,
            };
            if !wait.is_zero() {
                poll_in(self.rx.raw(), wait);
            }
            if self.control.cut.load(Ordering::Relaxed) && !self.queue.is_empty() {
                Counts::add(&self.counts.cut, self.queue.len() as u64);
                let dropped: Vec<Held> = self.queue.drain(..).collect();
                self.spare.extend(dropped.into_iter().map(|h| h.frame));
            }
            for _ in 0..READ_BATCH {
                match self.rx.recv(&mut buf) {
                    Ok(Some(n)) => self.admit(&buf[..n]),
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
            if self.send_due().is_err() {
                return;
            }
        }
    }

    /// Puts a received frame on the wire, or drops it.
    fn admit(&mut self, frame: &[u8]) {
        let draw = self.next_random() as u32;
        let c = &*self.control;
        if c.cut.load(Ordering::Relaxed) {
            Counts::add(&self.counts.cut, 1);
            return;
        }
        let loss = c.loss.load(Ordering::Relaxed);
        if loss > 0 && draw < loss {
            Counts::add(&self.counts.lost, 1);
            return;
        }
        if self.queue.len() as u64 >= c.limit.load(Ordering::Relaxed) {
            Counts::add(&self.counts.overflow, 1);
            return;
        }
        let now = Instant::now();
        let rate = c.rate_bps.load(Ordering::Relaxed);
        let start = self.free_at.max(now);
        // Rate 0 is unlimited: no serialisation time.
        let serialise = (frame.len() as u64 * 8 * 1_000_000_000)
            .checked_div(rate)
            .unwrap_or(0);
        self.free_at = start + Duration::from_nanos(serialise);
        let due = self.free_at + Duration::from_nanos(c.delay_ns.load(Ordering::Relaxed));
        let mut copy = self.spare.pop().unwrap_or_default();
        copy.clear();
        copy.extend_from_slice(frame);
        self.queue.push_back(Held { due, frame: copy });
    }

    /// Sends every frame whose time has come, in order.
    fn send_due(&mut self) -> std::io::Result<()> {
        let now = Instant::now();
        while self.queue.front().is_some_and(|h| h.due <= now) {
            let held = self.queue.pop_front().expect("checked");
            if self.tx.send(&held.frame)? {
                Counts::add(&self.counts.forwarded, 1);
            } else {
                Counts::add(&self.counts.overflow, 1);
            }
            if self.spare.len() < 1024 {
                self.spare.push(held.frame);
            }
        }
        Ok(())
    }

    /// xorshift64*: fast, and plenty for deciding which frames to drop.
    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32
    }
}

/// Waits up to `wait` for `fd` to become readable (with sub-millisecond precision).
fn poll_in(fd: std::os::fd::RawFd, wait: Duration) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: wait.as_secs() as libc::time_t,
        tv_nsec: wait.subsec_nanos() as libc::c_long,
    };
    // SAFETY: one valid pollfd, a valid timespec, no signal mask.
    unsafe { libc::ppoll(&mut p, 1, &ts, std::ptr::null()) };
}
