//! When a certificate is valid: `notBefore` and `notAfter` read from its DER, which is all
//! renewal needs (a full X.509 parser is not).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A certificate's validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Not valid before.
    pub not_before: SystemTime,
    /// Not valid after.
    pub not_after: SystemTime,
}

impl Validity {
    /// Reads the validity of a DER certificate; `None` if it does not parse.
    pub fn of(der: &[u8]) -> Option<Validity> {
        let (cert, _) = element(der, 0x30)?;
        let (mut tbs, _) = element(cert, 0x30)?;
        if tbs.first() == Some(&0xa0) {
            tbs = element(tbs, 0xa0)?.1; // the explicit version
        }
        let (_, rest) = element(tbs, 0x02)?; // serial number
        let (_, rest) = element(rest, 0x30)?; // signature algorithm
        let (_, rest) = element(rest, 0x30)?; // issuer
        let (validity, _) = element(rest, 0x30)?;
        let (not_before, rest) = time(validity)?;
        let (not_after, _) = time(rest)?;
        Some(Validity {
            not_before,
            not_after,
        })
    }

    /// When to renew: once two thirds of the lifetime have passed (30 days before expiry for
    /// a 90-day certificate).
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + life * 2 / 3
    }
}

/// The content of the DER element at the start of `der` if its tag is `tag`, and what
/// follows it.
fn element(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *der.first()? != tag {
        return None;
    }
    let first = *der.get(1)? as usize;
    let (len, at) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for b in der.get(2..2 + n)? {
            len = (len << 8) | *b as usize;
        }
        (len, 2 + n)
    };
    let end = at.checked_add(len)?;
    Some((der.get(at..end)?, der.get(end..)?))
}

/// A UTCTime or GeneralizedTime (UTC, whole seconds), and what follows it.
fn time(der: &[u8]) -> Option<(SystemTime, &[u8])> {
    let (digits, year) = match der.first()? {
        0x17 => {
            let (v, rest) = element(der, 0x17)?;
            let v = std::str::from_utf8(v).ok()?;
            let yy: i64 = v.get(0..2)?.parse().ok()?;
            // RFC 5280 4.1.2.5.1: two-digit years 50-99 are 19xx.
            let year = if yy >= 50 { 1900 + yy } else { 2000 + yy };
            ((v.get(2..)?, rest), year)
        }
        0x18 => {
            let (v, rest) = element(der, 0x18)?;
            let v = std::str::from_utf8(v).ok()?;
            ((v.get(4..)?, rest), v.get(0..4)?.parse().ok()?)
        }
        _ => return None,
    };
    let ((s, rest), year) = (digits, year);
    if s.len() != 11 || !s.ends_with('Z') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (month, day) = (num(0..2)?, num(2..4)?);
    let (h, m, sec) = (num(4..6)?, num(6..8)?, num(8..10)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec;
    let t = UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(secs).ok()?))?;
    Some((t, rest))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_validity_of_a_generated_certificate_is_read_back() {
        let mut params = rcgen::CertificateParams::new(vec!["a.example".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2026, 1, 31);
        params.not_after = rcgen::date_time_ymd(2051, 3, 1); // GeneralizedTime from 2050
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let v = Validity::of(cert.der()).unwrap();
        let day = |n: u64| UNIX_EPOCH + Duration::from_secs(n * 86_400);
        assert_eq!(v.not_before, day(20_484)); // 2026-01-31
        assert_eq!(v.not_after, day(29_644)); // 2051-03-01
        assert!(v.renew_at() > v.not_before && v.renew_at() < v.not_after);
    }

    #[test]
    fn garbage_has_no_validity() {
        assert_eq!(Validity::of(b""), None);
        assert_eq!(Validity::of(b"\x30\x84\xff\xff\xff\xff"), None);
        assert_eq!(Validity::of(b"\x30\x03\x30\x01\x00"), None);
    }
}
