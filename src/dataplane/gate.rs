//! Admission for one service's visitors: who may visit ([`Access`]: address lists, basic
//! auth), the per-service limits (visitors at once, new connections per second per visitor
//! IP, idle timeout) and the PROXY header the service wants. Every listener asks its service's [`Gate`] before a visitor goes anywhere near a
//! tunnel connection, whichever backend and whichever port (own, shared HTTP, shared TLS).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::access::Access;
use crate::admin::{Metrics, ServiceStats};
use crate::config::Limits;
use crate::net::cap::AddrKey;
use crate::protocol::proxy::ProxyVersion;

/// Visitor IPs tracked for rate limiting before stale entries are swept; past twice this,
/// new IPs are let through untracked rather than grow the table without bound.
const RATE_TABLE_SWEEP: usize = 4096;

/// Why a visitor was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The service already has its maximum of visitors connected.
    #[error("service has its maximum of {0} visitors connected")]
    Full(usize),
    /// This address (an IPv6 /64) opens connections faster than its rate.
    #[error("more than {0} new connections per second from this address")]
    RateLimited(u32),
    /// The operator is draining the service: visitors in flight finish, no new ones come in.
    #[error("service is draining: no new visitors")]
    Draining,
    /// The service's address lists (`[access]`) do not let this address in.
    #[error("this address may not visit the service")]
    Denied,
}

/// How a visitor's visit ended, as its access line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum End {
    /// Both directions ended (or the visitor was closed by its own side).
    Done = 0,
    /// Reset: its tunnel failed mid-stream.
    Cut = 1,
    /// Reset by the service's idle timeout.
    IdleTimeout = 2,
    /// The agent could not reach its local service.
    OriginUnreachable = 3,
    /// No data connection took it (agent offline past the wait, queue full).
    Unserved = 4,
    /// The visitor's own connection failed (reset, broken pipe).
    VisitorError = 5,
}

impl End {
    const ALL: [End; 6] = [
        End::Done,
        End::Cut,
        End::IdleTimeout,
        End::OriginUnreachable,
        End::Unserved,
        End::VisitorError,
    ];

    /// The name in access lines.
    pub fn name(self) -> &'static str {
        match self {
            End::Done => "done",
            End::Cut => "cut",
            End::IdleTimeout => "idle_timeout",
            End::OriginUnreachable => "origin_unreachable",
            End::Unserved => "unserved",
            End::VisitorError => "visitor_error",
        }
    }
}

/// What a visitor's access line reports, kept while access lines are on.
#[derive(Debug)]
struct Visit {
    visitor: SocketAddr,
    since: Instant,
    end: AtomicU8,
    /// Bytes toward the service and back.
    bytes: [AtomicU64; 2],
}

/// A visitor let in: keeps its place counted, knows the service's idle timeout, and, while
/// access lines are on, writes the visitor's access line when it is dropped (the visit is
/// over).
#[derive(Debug)]
pub struct Admission {
    /// The gate that let the visitor in; the visitor's place in it is given back when the
    /// admission is dropped.
    pub gate: Arc<Gate>,
    /// Boxed, and only while access lines are on: nothing is kept or counted per visitor
    /// otherwise.
    visit: Option<Box<Visit>>,
    /// The count of visitors of the agent carrying this one (see [`Self::count_in`]).
    carried: Option<Carried>,
}

/// One place in a count of visitors in flight, given back when dropped.
#[derive(Debug)]
struct Carried(Arc<AtomicUsize>);

impl Drop for Carried {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    /// Counts this visitor in `count` until the visit ends (or [`Self::uncount`]): the
    /// visitors each agent of a group carries, which a pool spreads new ones by.
    pub fn count_in(&mut self, count: &Arc<AtomicUsize>) {
        count.fetch_add(1, Ordering::Relaxed);
        self.carried = Some(Carried(count.clone()));
    }

    /// Takes this visitor out of the count [`Self::count_in`] put it in (it was not carried
    /// after all).
    pub fn uncount(&mut self) {
        self.carried = None;
    }

    /// Says how the visit ended (the access line's `end`; `done` unless said otherwise).
    pub fn end_as(&self, end: End) {
        if let Some(v) = &self.visit {
            v.end.store(end as u8, Ordering::Relaxed);
        }
    }

    /// Counts `n` bytes moved toward the service (`up`) or back: into the service's counters
    /// and, while access lines are on, the visitor's own.
    #[inline]
    pub fn count_bytes(&self, up: bool, n: u64) {
        let stats = self.gate.stats();
        match up {
            true => stats.bytes_in.add(n),
            false => stats.bytes_out.add(n),
        }
        if let Some(v) = &self.visit {
            v.bytes[usize::from(!up)].fetch_add(n, Ordering::Relaxed);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.gate.active.fetch_sub(1, Ordering::AcqRel);
        let Some(v) = self.visit.take() else {
            return;
        };
        let end = End::ALL[usize::from(v.end.load(Ordering::Relaxed)).min(End::ALL.len() - 1)];
        tracing::info!(
            target: crate::logging::ACCESS,
            service = %self.gate.service,
            visitor = %v.visitor,
            up = v.bytes[0].load(Ordering::Relaxed),
            down = v.bytes[1].load(Ordering::Relaxed),
            ms = v.since.elapsed().as_millis() as u64,
            end = end.name(),
            "visitor"
        );
    }
}

/// A visitor was reset because its tunnel failed mid-stream: counted relay-wide and for its
/// service.
pub fn count_cut(metrics: &Metrics, admission: &Option<Admission>) {
    metrics.visitors_cut.inc();
    if let Some(a) = admission {
        a.gate.stats.cut.inc();
        a.end_as(End::Cut);
    }
}

/// The limits a gate enforces, as [`Limits`] resolves them.
#[derive(Debug, Clone, Copy)]
struct GateLimits {
    max_visitors: Option<usize>,
    rate_per_ip: Option<u32>,
    idle: Option<Duration>,
}

impl GateLimits {
    fn of(limits: &Limits) -> Self {
        Self {
            max_visitors: limits.visitor_cap(),
            rate_per_ip: limits.rate_cap(),
            idle: limits.idle_timeout(),
        }
    }
}

/// One service's admission rules and counters.
#[derive(Debug)]
pub struct Gate {
    service: String,
    /// The limits in force; a reload replaces them (visitors already in keep their place).
    limits: Mutex<GateLimits>,
    /// Who may visit; a reload replaces it.
    access: Mutex<Arc<Access>>,
    /// No address lists: the common case skips the lock above for every visitor.
    no_lists: AtomicBool,
    proxy: AtomicU8,
    forwarded: AtomicBool,
    /// Set by the operator (`POST /api/services/NAME/drain`): every new visitor is refused.
    draining: AtomicBool,
    active: Arc<AtomicUsize>,
    /// Per address: a token bucket (tokens left, when it was last filled).
    rates: Mutex<HashMap<AddrKey, (f64, Instant)>>,
    epoch: Instant,
    last_warned: AtomicU64,
    metrics: Arc<Metrics>,
    stats: ServiceStats,
}

impl Gate {
    /// A gate for `service` enforcing `limits`, counting into `metrics`.
    pub fn new(service: &str, limits: &Limits, metrics: Arc<Metrics>) -> Arc<Gate> {
        Arc::new(Gate {
            service: service.to_string(),
            limits: Mutex::new(GateLimits::of(limits)),
            access: Mutex::new(Arc::new(Access::default())),
            no_lists: AtomicBool::new(true),
            proxy: AtomicU8::new(ProxyVersion::Off.to_u8()),
            forwarded: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            active: Arc::new(AtomicUsize::new(0)),
            rates: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            last_warned: AtomicU64::new(u64::MAX),
            metrics,
            stats: ServiceStats::default(),
        })
    }

    /// The service's name, for logs.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Relay counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// This service's own counts (the relay-wide ones are in [`Self::metrics`]).
    pub fn stats(&self) -> &ServiceStats {
        &self.stats
    }

    /// A visitor of this service got no data connection: counted relay-wide and here.
    pub fn count_unserved(&self) {
        self.metrics.visitors_unserved.inc();
        self.stats.unserved.inc();
    }

    /// Sets what the owning agent asked for: PROXY header, forwarded headers.
    pub fn configure(&self, proxy: ProxyVersion, forwarded_headers: bool) {
        self.proxy.store(proxy.to_u8(), Ordering::Relaxed);
        self.forwarded.store(forwarded_headers, Ordering::Relaxed);
    }

    /// Whether `http` visitors get `X-Forwarded-For` and friends.
    pub fn forwarded_headers(&self) -> bool {
        self.forwarded.load(Ordering::Relaxed)
    }

    /// Close a visitor after this long without a byte either way.
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.limits().idle
    }

    /// Puts new limits in force (a reload): for visitors admitted from now on, and the idle
    /// timeout for those whose forwarding starts from now on.
    pub fn set_limits(&self, limits: &Limits) {
        *self.limits.lock().unwrap_or_else(|e| e.into_inner()) = GateLimits::of(limits);
    }

    /// Puts new access rules in force, for visitors (and HTTP requests) from now on.
    pub fn set_access(&self, access: Access) {
        let no_lists = !access.has_lists();
        *self.access.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(access);
        self.no_lists.store(no_lists, Ordering::Release);
    }

    /// Whether the address lists let `ip` in.
    fn permits(&self, ip: std::net::IpAddr) -> bool {
        self.no_lists.load(Ordering::Acquire) || self.access().permits(ip)
    }

    /// The access rules in force.
    pub fn access(&self) -> Arc<Access> {
        self.access
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether `visitor` may come in by its address, as [`Self::admit`] asks first: a
    /// refusal is counted and logged as `admit` does. For the shared HTTP port to turn a
    /// denied address away before it asks for a password.
    pub fn screen(&self, visitor: SocketAddr) -> Result<(), Refusal> {
        let now = Instant::now();
        if self.permits(visitor.ip()) {
            return Ok(());
        }
        self.refused(&Refusal::Denied, visitor.ip(), now);
        Err(Refusal::Denied)
    }

    fn limits(&self) -> GateLimits {
        *self.limits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts (`true`) or ends a drain: while draining, every new visitor is refused with
    /// [`Refusal::Draining`] and those already in carry on. Survives the owning agent
    /// reconnecting; ends when the operator resumes the service or it closes.
    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Relaxed);
    }

    /// Whether the service is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Visitors connected right now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// The PROXY header for a visitor from `src` that connected to `dst` (empty when off).
    pub fn proxy_header(&self, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        ProxyVersion::from_u8(self.proxy.load(Ordering::Relaxed))
            .unwrap_or_default()
            .header(src, dst)
    }

    /// Whether the service wants a PROXY header at all (saves a `getsockname` when not).
    pub fn wants_proxy_header(&self) -> bool {
        self.proxy.load(Ordering::Relaxed) != ProxyVersion::Off.to_u8()
    }

    /// Lets `visitor` in, or says why not. A refusal is counted and logged (at most one log
    /// line per second per service, so a flood cannot flood the log too).
    pub fn admit(self: &Arc<Self>, visitor: SocketAddr) -> Result<Admission, Refusal> {
        self.admit_at(visitor, Instant::now())
    }

    fn admit_at(
        self: &Arc<Self>,
        visitor: impl Into<SocketAddr>,
        now: Instant,
    ) -> Result<Admission, Refusal> {
        let visitor = visitor.into();
        let ip = visitor.ip();
        let result = self.check(visitor, now);
        if let Err(refusal) = &result {
            self.refused(refusal, ip, now);
        }
        result
    }

    /// Counts and (at most once a second) logs a refusal.
    fn refused(&self, refusal: &Refusal, ip: std::net::IpAddr, now: Instant) {
        let (relay, here) = match refusal {
            Refusal::Full(_) => (&self.metrics.visitors_over_limit, &self.stats.refused_full),
            Refusal::RateLimited(_) => (
                &self.metrics.visitors_rate_limited,
                &self.stats.refused_rate,
            ),
            Refusal::Draining => (
                &self.metrics.visitors_draining,
                &self.stats.refused_draining,
            ),
            Refusal::Denied => (&self.metrics.visitors_denied, &self.stats.refused_denied),
        };
        relay.inc();
        here.inc();
        if self.may_log(now) {
            tracing::warn!(service = %self.service, visitor = %ip, "visitor refused: {refusal}");
        }
    }

    /// Whether a per-visitor log line for this service may be written now: at most one per
    /// second, so a flood of refusals or idle closes cannot flood the log (counters still
    /// count every one).
    pub fn may_log(&self, now: Instant) -> bool {
        let second = now.saturating_duration_since(self.epoch).as_secs();
        self.last_warned.swap(second, Ordering::Relaxed) != second
    }

    fn check(self: &Arc<Self>, visitor: SocketAddr, now: Instant) -> Result<Admission, Refusal> {
        let ip = visitor.ip();
        if !self.permits(ip) {
            return Err(Refusal::Denied);
        }
        if self.is_draining() {
            return Err(Refusal::Draining);
        }
        let limits = self.limits();
        if let Some(rate) = limits.rate_per_ip {
            // A token bucket per address: a burst of up to `rate` connections, then `rate`
            // per second. (Counting per calendar second let 2 × rate through across a
            // second's edge.)
            let rate_f = f64::from(rate);
            let refill = |(tokens, at): (f64, Instant)| {
                let elapsed = now.saturating_duration_since(at).as_secs_f64();
                (tokens + elapsed * rate_f).min(rate_f)
            };
            let key = AddrKey::of(ip);
            let mut rates = self.rates.lock().unwrap_or_else(|e| e.into_inner());
            if rates.len() >= RATE_TABLE_SWEEP && !rates.contains_key(&key) {
                // A full bucket is the same as no entry.
                rates.retain(|_, b| refill(*b) < rate_f);
            }
            if rates.len() < 2 * RATE_TABLE_SWEEP || rates.contains_key(&key) {
                let bucket = rates.entry(key).or_insert((rate_f, now));
                let tokens = refill(*bucket);
                if tokens < 1.0 {
                    *bucket = (tokens, now);
                    return Err(Refusal::RateLimited(rate));
                }
                *bucket = (tokens - 1.0, now);
            }
        }
        let now_active = self.active.fetch_add(1, Ordering::AcqRel) + 1;
        if let Some(max) = limits.max_visitors {
            if now_active > max {
                self.active.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::Full(max));
            }
        }
        self.stats.visitors.inc();
        Ok(Admission {
            carried: None,
            gate: self.clone(),
            visit: tracing::enabled!(target: crate::logging::ACCESS, tracing::Level::INFO).then(
                || {
                    Box::new(Visit {
                        visitor,
                        since: now,
                        end: AtomicU8::new(End::Done as u8),
                        bytes: Default::default(),
                    })
                },
            ),
        })
    }
}

/// The local address a visitor connected to, for PROXY headers (`0.0.0.0:0` if unknown).
/// Costs a `getsockname`, so callers ask only when a header wants it.
pub fn local_addr_of(socket: BorrowedFd<'_>) -> SocketAddr {
    rustix::net::getsockname(socket)
        .ok()
        .and_then(|a| SocketAddr::try_from(a).ok())
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn gate(limits: Limits) -> Arc<Gate> {
        Gate::new("t", &limits, Arc::new(Metrics::default()))
    }

    #[test]
    fn max_visitors_holds_and_is_released() {
        let g = gate(Limits {
            max_visitors: Some(2),
            ..Default::default()
        });
        let ip: IpAddr = [127, 0, 0, 1].into();
        let a = g.admit((ip, 0).into()).unwrap();
        let b = g.admit((ip, 0).into()).unwrap();
        assert_eq!(g.admit((ip, 0).into()).unwrap_err(), Refusal::Full(2));
        assert_eq!(g.active(), 2);
        drop(a);
        let c = g.admit((ip, 0).into()).unwrap();
        drop((b, c));
        assert_eq!(g.active(), 0);
        assert_eq!(g.metrics().visitors_over_limit.get(), 1);
    }

    #[test]
    fn address_lists_refuse_first_and_are_counted() {
        let g = gate(Limits::default());
        let file = crate::config::AccessFile {
            deny: vec!["10.0.0.0/8".parse().unwrap()],
            ..Default::default()
        };
        g.set_access(Access::new("t", &file).unwrap());
        let denied: IpAddr = [10, 1, 2, 3].into();
        assert_eq!(g.admit((denied, 0).into()).unwrap_err(), Refusal::Denied);
        assert_eq!(g.screen((denied, 0).into()), Err(Refusal::Denied));
        assert_eq!(g.active(), 0, "a denied visitor takes no place");
        assert_eq!(g.stats().refused_denied.get(), 2);
        assert_eq!(g.metrics().visitors_denied.get(), 2);
        let other: IpAddr = [192, 0, 2, 1].into();
        assert!(g.screen((other, 0).into()).is_ok());
        assert!(g.admit((other, 0).into()).is_ok());
    }

    #[test]
    fn a_draining_gate_refuses_new_visitors_and_keeps_those_in() {
        let g = gate(Limits::default());
        let ip: IpAddr = [127, 0, 0, 1].into();
        let inside = g.admit((ip, 0).into()).unwrap();
        g.set_draining(true);
        assert_eq!(g.admit((ip, 0).into()).unwrap_err(), Refusal::Draining);
        assert_eq!(g.active(), 1, "the visitor already in keeps its place");
        assert_eq!(g.stats().refused_draining.get(), 1);
        assert_eq!(g.metrics().visitors_draining.get(), 1);
        drop(inside);
        g.set_draining(false);
        assert!(g.admit((ip, 0).into()).is_ok(), "resumed");
    }

    #[test]
    fn rate_limit_is_per_address_and_holds_across_second_edges() {
        let g = gate(Limits {
            conn_rate_per_ip: Some(20),
            ..Default::default()
        });
        // Just before a second's edge: the burst...
        let t0 = g.epoch + Duration::from_millis(990);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let served = |from: Instant, ms: u64| {
            (0..ms)
                .flat_map(|m| [m; 4])
                .filter(|m| g.admit_at((a, 0), from + Duration::from_millis(*m)).is_ok())
                .count()
        };
        // ...then 4 attempts a millisecond for 113 ms across the edge: 20 + 113 ms of refill.
        assert_eq!(served(t0, 113), 22);
        assert!(
            g.admit_at((b, 0), t0).is_ok(),
            "another address has its own bucket"
        );
        // Refilled at the configured rate, not all at once.
        let later = t0 + Duration::from_millis(113 + 500);
        let burst = (0..15)
            .filter(|_| g.admit_at((a, 0), later).is_ok())
            .count();
        assert_eq!(burst, 10);
        // An IPv6 /64 is one address.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        for _ in 0..20 {
            g.admit_at((v6("2001:db8::1"), 0), t0).unwrap();
        }
        assert!(g.admit_at((v6("2001:db8::2"), 0), t0).is_err());
    }

    #[test]
    fn rate_table_stays_bounded() {
        let g = gate(Limits {
            conn_rate_per_ip: Some(1),
            ..Default::default()
        });
        let t0 = g.epoch;
        for i in 0..(3 * RATE_TABLE_SWEEP as u32) {
            let ip: IpAddr = std::net::Ipv4Addr::from(i).into();
            g.admit_at((ip, 0), t0).unwrap();
        }
        assert!(g.rates.lock().unwrap().len() <= 2 * RATE_TABLE_SWEEP);
        // A second later (every bucket full again) the stale entries are swept on the next
        // new address.
        g.admit_at(
            (std::net::Ipv4Addr::new(1, 1, 1, 1), 0),
            t0 + Duration::from_secs(1),
        )
        .unwrap();
        assert!(g.rates.lock().unwrap().len() <= 2);
    }
}
