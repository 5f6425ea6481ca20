//! What a wire does to frames: delay, rate, loss and a queue limit.

use std::time::Duration;

/// How one direction of a wire treats frames (both directions get the same shape).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// One-way delay added to every frame.
    pub delay: Duration,
    /// Serialisation rate in bits per second; 0 is unlimited.
    pub rate_bps: u64,
    /// Share of frames dropped at random, 0.0 to 1.0.
    pub loss: f64,
    /// Most frames held in one direction (queued for the rate and in flight for the delay);
    /// frames beyond it are tail-dropped. netem's default is 1000 as well.
    pub limit: usize,
}

impl Default for Shape {
    /// A perfect wire: no delay, no rate limit, no loss.
    fn default() -> Self {
        Shape {
            delay: Duration::ZERO,
            rate_bps: 0,
            loss: 0.0,
            limit: 1000,
        }
    }
}

/// Parses `25ms`, `1.5s`, `300us` or a bare number of milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1e-3)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (try 25ms)"))?;
    if !(0.0..=60.0).contains(&(v * scale)) {
        return Err(format!("duration out of range (0 to 60 s): {s:?}"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// Parses `200mbit`, `1gbit`, `500kbit`, a number of bits per second, or `0`/`off`
/// (unlimited).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim().to_ascii_lowercase();
    if s == "off" || s == "0" {
        return Ok(0);
    }
    let (num, scale) = if let Some(n) = s.strip_suffix("gbit") {
        (n, 1e9)
    } else if let Some(n) = s.strip_suffix("mbit") {
        (n, 1e6)
    } else if let Some(n) = s.strip_suffix("kbit") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix("bit") {
        (n, 1.0)
    } else {
        (s.as_str(), 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a rate: {s:?} (try 200mbit)"))?;
    let bps = v * scale;
    if !(1e3..=1e12).contains(&bps) {
        return Err(format!("rate out of range (1kbit to 1000gbit): {s:?}"));
    }
    Ok(bps as u64)
}

/// Parses `0.5%` or a share such as `0.005`.
pub fn parse_loss(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let v = if let Some(p) = s.strip_suffix('%') {
        p.trim().parse::<f64>().map(|v| v / 100.0)
    } else {
        s.parse::<f64>()
    }
    .map_err(|_| format!("not a loss: {s:?} (try 0.5%)"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("loss out of range (0 to 100 %): {s:?}"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("25ms"), Ok(Duration::from_millis(25)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("300us"), Ok(Duration::from_micros(300)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_millis(10)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1ms").is_err());
        assert!(parse_duration("2h").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("200mbit"), Ok(200_000_000));
        assert_eq!(parse_rate("1Gbit"), Ok(1_000_000_000));
        assert_eq!(parse_rate("off"), Ok(0));
        assert_eq!(parse_rate("64000"), Ok(64_000));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("1bit").is_err());
    }

    #[test]
    fn losses() {
        assert_eq!(parse_loss("0.5%"), Ok(0.005));
        assert_eq!(parse_loss("0.25"), Ok(0.25));
        assert!(parse_loss("150%").is_err());
        assert!(parse_loss("some").is_err());
    }
}
