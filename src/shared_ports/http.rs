//! The shared HTTP port: read the first request head (bounded in size and time), find the
//! service by host and longest path prefix, apply its access rules (address lists: 403;
//! basic auth: 401, the password checked off this thread), write the visitor's address into
//! the head, and hand the connection on with a [`Requests`] reader that does the same to
//! every later request head on its way up the tunnel (and ends the connection at one without
//! credentials that passed). Bodies, and a WebSocket after its upgrade, pass through
//! untouched.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::conn::{read_head, Head, VisitorConn};
use super::reply::Page;
use super::route::Router;
use super::route::{Decision, Routed, Unserved};
use crate::access::login::{challenge, Check, Login, Pending, Verdict};
use crate::control::service::Service;
use crate::dataplane::gate::Refusal;
use crate::protocol::http::requests::Requests;
use crate::protocol::http::{self, HeadError, HeadScanner, Trust};

/// How the visitor reached the HTTP routing: the shared HTTP port, or HTTPS terminated on
/// the shared TLS port for the server name `sni`.
#[derive(Debug, Clone, Copy)]
pub enum Scheme<'a> {
    /// Plain HTTP.
    Http,
    /// HTTPS, terminated by the relay.
    Https {
        /// The ClientHello's server name: the request's `Host` must be the same.
        sni: &'a str,
    },
}

impl Scheme<'_> {
    fn proto(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https { .. } => "https",
        }
    }
}

/// Reads a visitor's request head from `conn` (bounded by the port's size limit, and in time
/// by `deadline`), then decides what happens to it, checking a password off this thread if
/// the service wants one.
pub(crate) async fn read_and_decide(
    router: &Router,
    conn: &mut impl VisitorConn,
    addr: SocketAddr,
    deadline: impl Future<Output = ()>,
    scheme: Scheme<'_>,
) -> Decision {
    let mut scanner = HeadScanner::new(router.cfg.max_head);
    let read = read_head(conn, deadline, |b| scanner.feed(b)).await;
    match decide(router, read, addr, scheme) {
        Step::Done(decision) => decision,
        Step::Login(pending, wait) => {
            let verdict = pending.verify().await;
            after_login(router, *wait, verdict, addr, scheme)
        }
    }
}

/// What the shared HTTP port does with a visitor, given how reading its head ended: decided
/// at once, or once a password is checked (off this thread).
pub enum Step {
    /// Decided.
    Done(Decision),
    /// The service wants a password and this one is new: check it, then [`after_login`]
    /// with what routing found.
    Login(Pending, Box<LoginWait>),
}

/// What routing found for a visitor whose password is being checked.
pub struct LoginWait {
    svc: Arc<Service>,
    head: http::Head,
    bytes: Vec<u8>,
}

/// Decides on a visitor of the shared HTTP port: answers what cannot be routed, turns away
/// what the service's access rules refuse, and routes the rest.
pub fn decide(
    router: &Router,
    read: Result<Head<http::Head>, HeadError>,
    addr: SocketAddr,
    scheme: Scheme<'_>,
) -> Step {
    let front = &router.cfg;
    let metrics = &router.metrics;
    let (head, bytes) = match read {
        Ok(Head::Done(h, bytes)) => (h, bytes),
        Ok(Head::Closed) => return Step::Done(Decision::Close),
        Ok(Head::TimedOut) => {
            metrics.http_bad_requests.inc();
            tracing::info!(visitor = %addr, "HTTP visitor cut off: no complete request head within {:?}", front.head_timeout);
            return Step::Done(Decision::Answer(
                Page::Timeout.response("the request head did not arrive in time"),
            ));
        }
        Err(e) => {
            metrics.http_bad_requests.inc();
            tracing::info!(visitor = %addr, "HTTP visitor refused: {e}");
            return Step::Done(Decision::Answer(match e {
                HeadError::TooLarge(n) => {
                    Page::TooLarge.response(&format!("the request head is larger than {n} bytes"))
                }
                HeadError::Malformed(why) => Page::BadRequest.response(why),
            }));
        }
    };
    match scheme {
        Scheme::Http => {
            if let Some(answer) = acme_challenge(router, &head.path) {
                return Step::Done(Decision::Answer(answer));
            }
        }
        Scheme::Https { sni } if sni != head.host => {
            metrics.http_bad_requests.inc();
            tracing::info!(visitor = %addr, host = %head.host, %sni, "HTTPS visitor answered 421: Host is not the TLS server name");
            return Step::Done(Decision::Answer(
                Page::Misdirected
                    .response(&format!("this connection is for {sni}, not {}", head.host)),
            ));
        }
        Scheme::Https { .. } => {}
    }
    let routed = router
        .registry
        .route_http(&head.host, &head.path)
        .filter(|svc| router.may_serve(svc));
    let Some(svc) = routed else {
        if matches!(scheme, Scheme::Http) {
            if let Some(remote) = router.elsewhere(&head.host, Some(&head.path)) {
                return Step::Done(Decision::HandOver {
                    remote,
                    first: bytes,
                });
            }
        }
        metrics.http_unknown_host.inc();
        tracing::debug!(visitor = %addr, host = %head.host, "HTTP visitor for an unknown host");
        return Step::Done(Decision::Answer(
            Page::UnknownHost.response(&format!("no service is published for {}", head.host)),
        ));
    };
    // Addresses first: a denied one is never asked for a password.
    if let Err(refusal) = svc.gate.screen(addr) {
        return Step::Done(refused(refusal));
    }
    let access = svc.gate.access();
    // Before any password: one is never asked for over plain HTTP when HTTPS is there.
    if matches!(scheme, Scheme::Http) && router.https.is_some() && access.https_only() {
        return Step::Done(Decision::Answer(to_https(router, &head)));
    }
    let Some(login) = access.login() else {
        return Step::Done(admit(router, svc, None, head, bytes, addr, scheme));
    };
    match login.check(head.authorization.as_deref(), addr.ip(), Instant::now()) {
        Check::Pass => {
            let login = login.clone();
            Step::Done(admit(router, svc, Some(login), head, bytes, addr, scheme))
        }
        Check::Challenge => Step::Done(unauthorized(router, &svc, login, addr)),
        Check::Throttled => Step::Done(login_refused(
            router,
            &svc,
            addr,
            Page::TooManyRequests,
            "too many failed passwords from this address; try again later",
        )),
        Check::Verify(pending) => Step::Login(pending, Box::new(LoginWait { svc, head, bytes })),
    }
}

/// Decides on a visitor whose password was checked ([`Step::Login`]).
pub fn after_login(
    router: &Router,
    wait: LoginWait,
    verdict: Verdict,
    addr: SocketAddr,
    scheme: Scheme<'_>,
) -> Decision {
    let LoginWait { svc, head, bytes } = wait;
    let access = svc.gate.access();
    let Some(login) = access.login().cloned() else {
        // A reload took the password away meanwhile.
        return admit(router, svc, None, head, bytes, addr, scheme);
    };
    match verdict {
        Verdict::Passed => admit(router, svc, Some(login), head, bytes, addr, scheme),
        Verdict::Failed => unauthorized(router, &svc, &login, addr),
        Verdict::Busy => login_refused(
            router,
            &svc,
            addr,
            Page::OverLimit,
            "too many passwords are being checked; try again",
        ),
    }
}

/// The page for a visitor the gate refused: 403 for an address the lists turn away, 503
/// for the limits and a drain.
fn refused(refusal: Refusal) -> Decision {
    let page = match refusal {
        Refusal::Denied => Page::Forbidden,
        Refusal::Full(_) | Refusal::RateLimited(_) | Refusal::Draining => Page::OverLimit,
    };
    Decision::Answer(page.response(&refusal.to_string()))
}

/// 401 with the service's challenge, counted.
fn unauthorized(router: &Router, svc: &Service, login: &Login, addr: SocketAddr) -> Decision {
    count_login_refusal(router, svc, addr, 401);
    let challenge = challenge(login.realm());
    Decision::Answer(Page::Unauthorized.response_with(
        "this service needs a user name and password",
        &[("WWW-Authenticate", &challenge)],
    ))
}

/// Another basic-auth refusal (429, 503), counted.
fn login_refused(
    router: &Router,
    svc: &Service,
    addr: SocketAddr,
    page: Page,
    why: &str,
) -> Decision {
    count_login_refusal(router, svc, addr, page.code());
    Decision::Answer(page.response(why))
}

fn count_login_refusal(router: &Router, svc: &Service, addr: SocketAddr, code: u16) {
    router.metrics.http_unauthorized.inc();
    svc.gate.stats().refused_login.inc();
    if svc.gate.may_log(Instant::now()) {
        tracing::info!(service = %svc.name, visitor = %addr, "HTTP visitor answered {code} by basic auth");
    }
}

/// Admits a routed visitor (limits) and prepares what goes up the tunnel first.
fn admit(
    router: &Router,
    svc: Arc<Service>,
    login: Option<Arc<Login>>,
    head: http::Head,
    bytes: Vec<u8>,
    addr: SocketAddr,
    scheme: Scheme<'_>,
) -> Decision {
    let front = &router.cfg;
    let metrics = &router.metrics;
    let admission = match svc.gate.admit(addr) {
        Ok(a) => a,
        Err(refusal) => return refused(refusal),
    };
    // Every request head on the connection is read (and rewritten, with forwarding headers),
    // this first one here; the reader goes with the visitor for the rest. Without forwarding
    // headers or a password the rest is spliced untouched.
    let forwarded = svc.gate.forwarded_headers();
    let (prefix, requests) = if forwarded || login.is_some() {
        let trust = match front.trusts(addr.ip()) {
            true => Trust::Proxy,
            false => Trust::None,
        };
        let mut requests = Requests::new(addr, trust, front.max_head).with_proto(scheme.proto());
        if !forwarded {
            requests = requests.without_forwarded();
        }
        if let Some(login) = login {
            requests = requests.with_login(login);
        }
        let mut requests = Box::new(requests);
        let mut p = Vec::with_capacity(bytes.len() + 192);
        if let Err(e) = requests.feed(&bytes, &mut p) {
            metrics.http_bad_requests.inc();
            tracing::info!(visitor = %addr, "HTTP visitor refused: {e}");
            return Decision::Answer(Page::BadRequest.response(&e.to_string()));
        }
        (p, Some(requests))
    } else {
        (bytes, None)
    };
    Decision::Dispatch(Routed {
        svc,
        prefix,
        admission,
        requests,
        unserved: Unserved::HttpPage { host: head.host },
    })
}

/// The answer to an ACME CA's HTTP-01 validation request for a token being validated now
/// (with `--https`); `None` for every other request, which is routed as usual.
fn acme_challenge(router: &Router, path: &str) -> Option<Vec<u8>> {
    let key_auth = router.https.as_ref()?.challenge(path)?;
    Some(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\nServer: ringtunnel\r\n\r\n{key_auth}",
            key_auth.len()
        )
        .into_bytes(),
    )
}

/// A permanent redirect of `head`'s request to the same host and target over HTTPS (the
/// shared TLS port; its number only when not 443).
fn to_https(router: &Router, head: &http::Head) -> Vec<u8> {
    let port = match router.cfg.tls.map(|a| a.port()) {
        Some(443) | None => String::new(),
        Some(p) => format!(":{p}"),
    };
    let location = format!("https://{}{port}{}", head.host, head.path);
    format!(
        "HTTP/1.1 308 Permanent Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\nServer: ringtunnel\r\n\r\n"
    )
    .into_bytes()
}
