//! Authentication primitives: the agent proves it knows a service's secret by returning
//! HMAC-SHA256 over a fresh relay nonce; the secret itself never crosses the wire.
//! Data connections prove themselves with single-use [`Ticket`]s handed out over the
//! authenticated control connection.

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Length of a relay nonce, in bytes.
pub const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 tag, in bytes.
pub const MAC_LEN: usize = 32;
/// Length of a data-connection ticket, in bytes (128 random bits).
pub const TICKET_LEN: usize = 16;

/// A relay challenge nonce.
pub type Nonce = [u8; NONCE_LEN];
/// An HMAC-SHA256 tag.
pub type Mac = [u8; MAC_LEN];

/// Domain separation for the registration MAC, so a tag made here is useless anywhere else.
const REGISTER_CONTEXT: &[u8] = b"ringtunnel/1 register\0";
/// Domain separation for a relay handing a visitor to another relay of its fleet: a tag for
/// one purpose never verifies for the other.
const PEER_CONTEXT: &[u8] = b"ringtunnel/1 peer visit\0";

/// A single-use data-connection ticket. `Debug` shows only a prefix, enough to correlate logs.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket(pub [u8; TICKET_LEN]);

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ticket({:02x}{:02x}..)", self.0[0], self.0[1])
    }
}

/// Fills `out` from the operating system's CSPRNG.
pub fn random_bytes(out: &mut [u8]) {
    // The system RNG failing means the kernel cannot give randomness at all; nothing secure
    // can continue, so this is a panic rather than an error to handle.
    SystemRandom::new()
        .fill(out)
        .expect("operating system random number generator failed");
}

/// A fresh random nonce.
pub fn new_nonce() -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    random_bytes(&mut n);
    n
}

/// A fresh random ticket.
pub fn new_ticket() -> Ticket {
    let mut t = [0u8; TICKET_LEN];
    random_bytes(&mut t);
    Ticket(t)
}

fn register_message(nonce: &Nonce, service: &str) -> Vec<u8> {
    let mut msg = Vec::with_capacity(REGISTER_CONTEXT.len() + NONCE_LEN + service.len());
    msg.extend_from_slice(REGISTER_CONTEXT);
    msg.extend_from_slice(nonce);
    msg.extend_from_slice(service.as_bytes());
    msg
}

/// The tag an agent sends to register `service` against `nonce` with `secret`.
pub fn register_mac(secret: &[u8], nonce: &Nonce, service: &str) -> Mac {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let tag = hmac::sign(&key, &register_message(nonce, service));
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

fn peer_message(nonce: &Nonce, service: &str, visitor: &std::net::SocketAddr) -> Vec<u8> {
    let mut msg = PEER_CONTEXT.to_vec();
    msg.extend_from_slice(nonce);
    msg.extend_from_slice(visitor.to_string().as_bytes());
    msg.push(0);
    msg.extend_from_slice(service.as_bytes());
    msg
}

/// The tag a relay of a fleet sends to hand `visitor` of `service` to another relay, against
/// that relay's `nonce`, with the service's `secret`: only a holder of the secret can make
/// another relay serve a visitor to it.
pub fn peer_mac(
    secret: &[u8],
    nonce: &Nonce,
    service: &str,
    visitor: &std::net::SocketAddr,
) -> Mac {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let tag = hmac::sign(&key, &peer_message(nonce, service, visitor));
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Checks a hand-over tag in constant time.
pub fn verify_peer_mac(
    secret: &[u8],
    nonce: &Nonce,
    service: &str,
    visitor: &std::net::SocketAddr,
    mac: &Mac,
) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::verify(&key, &peer_message(nonce, service, visitor), mac).is_ok()
}

/// Checks a registration tag in constant time.
pub fn verify_register_mac(secret: &[u8], nonce: &Nonce, service: &str, mac: &Mac) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::verify(&key, &register_message(nonce, service), mac).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_tag_binds_its_visitor_and_is_no_registration_tag() {
        let nonce = new_nonce();
        let v: std::net::SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let mac = peer_mac(b"secret", &nonce, "web", &v);
        assert!(verify_peer_mac(b"secret", &nonce, "web", &v, &mac));
        let other: std::net::SocketAddr = "192.0.2.8:4000".parse().unwrap();
        assert!(!verify_peer_mac(b"secret", &nonce, "web", &other, &mac));
        assert!(!verify_peer_mac(b"other", &nonce, "web", &v, &mac));
        assert!(!verify_peer_mac(b"secret", &nonce, "web2", &v, &mac));
        assert!(!verify_register_mac(b"secret", &nonce, "web", &mac));
    }

    #[test]
    fn mac_binds_secret_nonce_and_service() {
        let nonce = new_nonce();
        let mac = register_mac(b"s3cret", &nonce, "web");
        assert!(verify_register_mac(b"s3cret", &nonce, "web", &mac));
        assert!(!verify_register_mac(b"wrong", &nonce, "web", &mac));
        assert!(!verify_register_mac(b"s3cret", &new_nonce(), "web", &mac));
        assert!(!verify_register_mac(b"s3cret", &nonce, "db", &mac));
    }

    #[test]
    fn nonces_and_tickets_are_fresh() {
        assert_ne!(new_nonce(), new_nonce());
        assert_ne!(new_ticket(), new_ticket());
    }
}
