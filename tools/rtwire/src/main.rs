//! rtwire: a link emulator between two interfaces, for kernels without `netem`.
//!
//! ```text
//! rtwire [--netns NS] --link IF_A,IF_B [--delay 25ms] [--rate 200mbit] [--loss 0.5%] [--limit 1000]
//! rtwire plain-frames IF...
//! ```
//!
//! The first form forwards frames between IF_A and IF_B (in namespace NS if given) until it
//! is killed, and reads commands from standard input, one per line: `cut`, `mend`,
//! `delay D`, `rate R`, `loss L`, `limit N`, `stats`. It answers each with one line on
//! standard output. The second turns segmentation and checksum offloads off on the
//! interfaces named (do it on the interfaces that send into the wire, before moving them
//! into their namespaces).

use std::io::BufRead;
use std::process::ExitCode;

use rtwire::{parse_duration, parse_loss, parse_rate, plain_frames, Shape, Wire};

const USAGE: &str = "usage: rtwire [--netns NS] --link IF_A,IF_B [--delay 25ms] [--rate 200mbit] \
[--loss 0.5%] [--limit 1000]\n       rtwire plain-frames IF...";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("plain-frames") if args.len() > 1 => args[1..]
            .iter()
            .try_for_each(|i| plain_frames(i).map_err(|e| e.to_string())),
        Some("-h") | Some("--help") | None => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rtwire: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let mut shape = Shape::default();
    let (mut netns, mut link) = (None, None);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--netns" => netns = Some(value()?),
            "--link" => link = Some(value()?),
            "--delay" => shape.delay = parse_duration(&value()?)?,
            "--rate" => shape.rate_bps = parse_rate(&value()?)?,
            "--loss" => shape.loss = parse_loss(&value()?)?,
            "--limit" => shape.limit = parse_limit(&value()?)?,
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let link = link.ok_or_else(|| format!("--link is required\n{USAGE}"))?;
    let (a, b) = link
        .split_once(',')
        .ok_or_else(|| format!("--link takes two interfaces, IF_A,IF_B: {link:?}"))?;
    let wire = match &netns {
        Some(ns) => Wire::start_in(ns, a, b, shape),
        None => Wire::start(a, b, shape),
    }
    .map_err(|e| format!("cannot start the wire {a},{b}: {e}"))?;
    println!("wire up {a}<->{b} {}", describe(&wire.shape()));
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        println!("{}", command(&wire, line.trim()));
    }
    // Standard input closed: keep forwarding until killed.
    loop {
        std::thread::park();
    }
}

/// Carries out one command line and says what it did (or why not).
fn command(wire: &Wire, line: &str) -> String {
    let mut shape = wire.shape();
    let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
    let set = match cmd {
        "cut" => {
            wire.cut();
            return "cut".into();
        }
        "mend" => {
            wire.mend();
            return "mended".into();
        }
        "stats" => {
            let [ab, ba] = wire.stats();
            return format!(
                "stats a>b forwarded={} lost={} cut={} overflow={} b>a forwarded={} lost={} cut={} overflow={}",
                ab.forwarded, ab.lost, ab.cut, ab.overflow, ba.forwarded, ba.lost, ba.cut, ba.overflow
            );
        }
        "delay" => parse_duration(arg).map(|d| shape.delay = d),
        "rate" => parse_rate(arg).map(|r| shape.rate_bps = r),
        "loss" => parse_loss(arg).map(|l| shape.loss = l),
        "limit" => parse_limit(arg).map(|l| shape.limit = l),
        "" => return "error: empty command".into(),
        other => Err(format!(
            "unknown command {other:?} (cut, mend, delay, rate, loss, limit, stats)"
        )),
    };
    match set {
        Ok(()) => {
            wire.set_shape(shape);
            format!("set {}", describe(&shape))
        }
        Err(e) => format!("error: {e}"),
    }
}

fn parse_limit(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
        _ => Err(format!("limit is a number of frames, 1 to 1000000: {s:?}")),
    }
}

fn describe(s: &Shape) -> String {
    let rate = match s.rate_bps {
        0 => "unlimited".to_string(),
        r => format!("{}mbit", r as f64 / 1e6),
    };
    format!(
        "delay={:?} rate={rate} loss={}% limit={}",
        s.delay,
        s.loss * 100.0,
        s.limit
    )
}
