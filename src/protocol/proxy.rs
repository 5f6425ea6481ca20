//! The PROXY protocol (HAProxy's, versions 1 and 2), sans-IO: the header the relay puts in
//! front of a visitor's bytes so the origin learns who connected, and a parser for origins
//! (and tests) that read it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte signature that opens every version 2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Longest version 1 header, CRLF included (from the specification).
const V1_MAX: usize = 107;

/// Which PROXY header a service wants in front of each visitor connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    /// No header: the origin sees only the agent's address.
    #[default]
    Off,
    /// Human-readable version 1 (`PROXY TCP4 ...\r\n`).
    V1,
    /// Binary version 2.
    V2,
}

impl ProxyVersion {
    /// Wire value.
    pub fn to_u8(self) -> u8 {
        self as u8
    }

    /// From the wire value; `None` for values this version does not know.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => ProxyVersion::Off,
            1 => ProxyVersion::V1,
            2 => ProxyVersion::V2,
            _ => return None,
        })
    }

    /// The header announcing a connection from `src` to `dst`; empty for [`ProxyVersion::Off`].
    pub fn header(self, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        match self {
            ProxyVersion::Off => Vec::new(),
            ProxyVersion::V1 => encode_v1(src, dst),
            ProxyVersion::V2 => encode_v2(src, dst),
        }
    }
}

/// Both addresses in one family: IPv4-mapped IPv6 addresses become IPv4 when the other side
/// is IPv4 too, and IPv4 becomes mapped IPv6 when the other side is a real IPv6 address.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let unmap = |a: SocketAddr| match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    };
    let (s, d) = (unmap(src), unmap(dst));
    let map = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if s.is_ipv4() == d.is_ipv4() {
        (s, d)
    } else {
        (map(s), map(d))
    }
}

/// `PROXY TCP4 src dst sport dport\r\n` (or `TCP6`).
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (s, d) = same_family(src, dst);
    let fam = if s.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {fam} {} {} {} {}\r\n",
        s.ip(),
        d.ip(),
        s.port(),
        d.port()
    )
    .into_bytes()
}

/// The binary version 2 header for a proxied TCP connection.
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (s, d) = same_family(src, dst);
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, PROXY command
    match (s.ip(), d.ip()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            out.push(0x11); // AF_INET, STREAM
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&a.octets());
            out.extend_from_slice(&b.octets());
        }
        (a, b) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V6(v) => v,
                IpAddr::V4(v) => v.to_ipv6_mapped(),
            };
            out.push(0x21); // AF_INET6, STREAM
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(a).octets());
            out.extend_from_slice(&v6(b).octets());
        }
    }
    out.extend_from_slice(&s.port().to_be_bytes());
    out.extend_from_slice(&d.port().to_be_bytes());
    out
}

/// A parsed PROXY header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    /// Bytes the header takes at the start of the stream.
    pub len: usize,
    /// Source (visitor) and destination (public) addresses; `None` for `UNKNOWN`/`LOCAL`.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
}

/// Why bytes are not a PROXY header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid PROXY header: {0}")]
pub struct ProxyError(&'static str);

/// Parses a version 1 or 2 header at the start of `buf`; `Ok(None)`: need more bytes.
pub fn parse(buf: &[u8]) -> Result<Option<ProxyHeader>, ProxyError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() {
            Ok(None)
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(6);
    if buf[..n] != b"PROXY "[..n] {
        return Err(ProxyError("no PROXY signature"));
    }
    parse_v1(buf)
}

fn parse_v1(buf: &[u8]) -> Result<Option<ProxyHeader>, ProxyError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError("v1 line too long"))
        } else {
            Ok(None)
        };
    };
    if end + 2 > V1_MAX {
        return Err(ProxyError("v1 line too long"));
    }
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProxyError("v1 not ASCII"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    let addrs = match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => None,
        ["PROXY", fam @ ("TCP4" | "TCP6"), s, d, sp, dp] => {
            let ip = |t: &str| -> Result<IpAddr, ProxyError> {
                let ip: IpAddr = if *fam == "TCP4" {
                    IpAddr::V4(
                        t.parse::<Ipv4Addr>()
                            .map_err(|_| ProxyError("v1 address"))?,
                    )
                } else {
                    IpAddr::V6(
                        t.parse::<Ipv6Addr>()
                            .map_err(|_| ProxyError("v1 address"))?,
                    )
                };
                Ok(ip)
            };
            let port = |t: &str| -> Result<u16, ProxyError> {
                if t.is_empty() || t.len() > 5 || !t.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(ProxyError("v1 port"));
                }
                t.parse().map_err(|_| ProxyError("v1 port"))
            };
            Some((
                SocketAddr::new(ip(s)?, port(sp)?),
                SocketAddr::new(ip(d)?, port(dp)?),
            ))
        }
        _ => return Err(ProxyError("v1 fields")),
    };
    Ok(Some(ProxyHeader {
        len: end + 2,
        addrs,
    }))
}

fn parse_v2(buf: &[u8]) -> Result<Option<ProxyHeader>, ProxyError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError("v2 version"));
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if buf.len() < 16 + len {
        return Ok(None);
    }
    let body = &buf[16..16 + len];
    let addrs = match (ver_cmd & 0x0f, buf[13]) {
        (0, _) => None, // LOCAL: health check from the proxy itself
        (1, 0x11) if len >= 12 => {
            let ip = |o: usize| Ipv4Addr::new(body[o], body[o + 1], body[o + 2], body[o + 3]);
            let sp = u16::from_be_bytes([body[8], body[9]]);
            let dp = u16::from_be_bytes([body[10], body[11]]);
            Some((
                SocketAddr::new(IpAddr::V4(ip(0)), sp),
                SocketAddr::new(IpAddr::V4(ip(4)), dp),
            ))
        }
        (1, 0x21) if len >= 36 => {
            let ip = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&body[o..o + 16]);
                Ipv6Addr::from(a)
            };
            let sp = u16::from_be_bytes([body[32], body[33]]);
            let dp = u16::from_be_bytes([body[34], body[35]]);
            Some((
                SocketAddr::new(IpAddr::V6(ip(0)), sp),
                SocketAddr::new(IpAddr::V6(ip(16)), dp),
            ))
        }
        (1, 0x00) => None, // UNSPEC
        (1, _) => return Err(ProxyError("v2 address family")),
        _ => return Err(ProxyError("v2 command")),
    };
    Ok(Some(ProxyHeader {
        len: 16 + len,
        addrs,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn v1_matches_the_specification_examples() {
        let h = encode_v1(
            "192.168.0.1:56324".parse().unwrap(),
            "192.168.0.11:443".parse().unwrap(),
        );
        assert_eq!(h, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
        let h = encode_v1("[::1]:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
        assert_eq!(h, b"PROXY TCP6 ::1 ::ffff:127.0.0.1 1 2\r\n");
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\nGET"),
            Ok(Some(ProxyHeader {
                len: 15,
                addrs: None
            }))
        );
    }

    #[test]
    fn bad_headers_are_errors() {
        assert!(parse(b"GET / HTTP/1.1\r\n").is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n").is_err());
        assert!(parse(b"PROXY TCP4 ::1 ::1 1 2\r\n").is_err());
        assert!(parse(&[b'P'; 200]).is_err());
        assert_eq!(parse(b"PROXY TCP4 1.2"), Ok(None));
        assert_eq!(parse(&V2_SIGNATURE[..5]), Ok(None));
    }

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::from((a, p))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::from((a, p))),
        ]
    }

    proptest! {
        #[test]
        fn both_versions_round_trip(src in addr(), dst in addr(), v2 in any::<bool>()) {
            let bytes = if v2 { encode_v2(src, dst) } else { encode_v1(src, dst) };
            let h = parse(&bytes).unwrap().unwrap();
            prop_assert_eq!(h.len, bytes.len());
            prop_assert_eq!(h.addrs, Some(same_family(src, dst)));
            for cut in 0..bytes.len() {
                prop_assert_eq!(parse(&bytes[..cut]), Ok(None));
            }
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&bytes);
            let mut v2 = V2_SIGNATURE.to_vec();
            v2.extend_from_slice(&bytes);
            let _ = parse(&v2);
        }
    }
}
