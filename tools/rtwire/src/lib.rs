//! A link emulator for tests and load tests, for kernels without `netem`.
//!
//! A [`Wire`] forwards Ethernet frames between two interfaces (normally the ends of two veth
//! pairs, in a network namespace of their own) through AF_PACKET sockets, one thread per
//! direction. Each direction delays every frame by a one-way delay, serialises frames at a
//! rate, drops a share of them at random, tail-drops beyond a queue limit, and drops
//! everything while the wire is cut. Frames must stay MTU-sized: turn segmentation and
//! checksum offloads off on the interfaces that send into the wire ([`plain_frames`]).
//!
//! The wire touches nothing but the two interfaces it is given.

mod direction;
mod netns;
mod offload;
mod packet;
mod shape;

pub use netns::in_netns;
pub use offload::plain_frames;
pub use shape::{parse_duration, parse_loss, parse_rate, Shape};

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use direction::{Control, Counts, Direction};
use packet::PacketSocket;

/// A running wire between two interfaces. Dropping it stops both directions.
pub struct Wire {
    control: Arc<Control>,
    counts: [Arc<Counts>; 2],
    threads: Vec<JoinHandle<()>>,
}

/// Frames seen by one direction of a wire since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames delivered to the far interface.
    pub forwarded: u64,
    /// Frames dropped by the loss setting.
    pub lost: u64,
    /// Frames dropped (or thrown out of the queue) because the wire was cut.
    pub cut: u64,
    /// Frames dropped because the queue was full, or the far interface refused them.
    pub overflow: u64,
}

impl Wire {
    /// Starts forwarding between interfaces `a` and `b` of the calling thread's network
    /// namespace, shaped by `shape` in both directions.
    pub fn start(a: &str, b: &str, shape: Shape) -> io::Result<Wire> {
        let sa = Arc::new(PacketSocket::bind(a)?);
        let sb = Arc::new(PacketSocket::bind(b)?);
        let control = Arc::new(Control::new(shape));
        let counts = [Arc::new(Counts::default()), Arc::new(Counts::default())];
        let ends = [(sa.clone(), sb.clone(), a, b), (sb, sa, b, a)];
        let mut threads = Vec::new();
        for (i, (rx, tx, from, to)) in ends.into_iter().enumerate() {
            let dir = Direction::new(rx, tx, control.clone(), counts[i].clone(), i as u64);
            let handle = std::thread::Builder::new()
                .name(format!("wire {from}>{to}"))
                .spawn(move || dir.run())?;
            threads.push(handle);
        }
        Ok(Wire {
            control,
            counts,
            threads,
        })
    }

    /// Like [`Wire::start`], with the interfaces in the named network namespace
    /// (`/run/netns/NAME`, as `ip netns add` makes them).
    pub fn start_in(netns: &str, a: &str, b: &str, shape: Shape) -> io::Result<Wire> {
        in_netns(netns, || Wire::start(a, b, shape))
    }

    /// Drops every frame both ways, including those already on the wire, until [`Wire::mend`].
    /// Nothing is sent to either side: it looks like a pulled cable to both.
    pub fn cut(&self) {
        self.control.cut.store(true, Ordering::SeqCst);
    }

    /// Carries frames again after [`Wire::cut`].
    pub fn mend(&self) {
        self.control.cut.store(false, Ordering::SeqCst);
    }

    /// Changes the shape of both directions; frames already queued keep their times.
    pub fn set_shape(&self, shape: Shape) {
        self.control.set(shape);
    }

    /// The current shape.
    pub fn shape(&self) -> Shape {
        self.control.get()
    }

    /// Counts of the `a`→`b` direction and of the `b`→`a` direction.
    pub fn stats(&self) -> [Stats; 2] {
        [self.counts[0].get(), self.counts[1].get()]
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.control.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
