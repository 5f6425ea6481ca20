//! The process's log: lines on stderr as text or JSON (`--log-format`), through a filter that
//! the command line sets (`--log`, `RINGTUNNEL_LOG`) or, when it does not, the relay's config
//! file (`log = "..."`), which a reload may change. Access lines (one per visitor, target
//! [`ACCESS`]) are off unless asked for: `--access-log`, `access_log = true`, or a filter that
//! names the target (`--log info,access=info`).

use std::str::FromStr;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{reload, Registry};

/// The target of access lines.
pub const ACCESS: &str = "access";

/// Filter used when nothing sets one.
const DEFAULT_FILTER: &str = "info";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `message`, and the fields).
    Json,
}

/// A log filter that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid log filter {filter:?}: {why} (e.g. `info` or `info,ringtunnel=debug`)")]
pub struct FilterError {
    filter: String,
    why: String,
}

/// The filter for `filter` (a `tracing` targets list), with access lines on when `access` or
/// when the filter names [`ACCESS`] itself, else off.
pub fn filter_for(filter: &str, access: bool) -> Result<Targets, FilterError> {
    let names_access = filter
        .split(',')
        .any(|d| d.trim().split('=').next() == Some(ACCESS));
    let full = match (names_access, access) {
        (true, _) => filter.to_string(),
        (false, true) => format!("{filter},{ACCESS}=info"),
        (false, false) => format!("{filter},{ACCESS}=off"),
    };
    Targets::from_str(&full).map_err(|e| FilterError {
        filter: filter.to_string(),
        why: e.to_string(),
    })
}

/// The installed filter: the handle that swaps it, whether the command line fixed it, and
/// what is in force (to tell whether a reload changes it).
struct Installed {
    handle: reload::Handle<Targets, Registry>,
    command_line: Option<String>,
    in_force: Mutex<(String, bool)>,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Installs the process's logger: `filter` from the command line (`None`: the default, until
/// [`configure`] sets the config file's), lines in `format`. An invalid filter is reported
/// on stderr and the default used. Only the first call installs anything.
pub fn init(filter: Option<&str>, format: LogFormat, ansi: bool) {
    let wanted = filter.unwrap_or(DEFAULT_FILTER);
    let targets = filter_for(wanted, false).unwrap_or_else(|e| {
        eprintln!("warning: {e}; using {DEFAULT_FILTER}");
        filter_for(DEFAULT_FILTER, false).expect("the default filter parses")
    });
    let (layer, handle) = reload::Layer::new(targets);
    let (text, json) = match format {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false)
                    .with_ansi(ansi),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            ),
        ),
    };
    if tracing_subscriber::registry()
        .with(layer)
        .with(text)
        .with(json)
        .try_init()
        .is_ok()
    {
        let _ = INSTALLED.set(Installed {
            handle,
            command_line: filter.map(str::to_string),
            in_force: Mutex::new((wanted.to_string(), false)),
        });
    }
}

/// Puts the config file's settings in force: its `filter` (unless the command line set one)
/// and whether access lines are written. Returns whether anything changed. Without an
/// installed logger (a library user, a test), does nothing.
pub fn configure(filter: Option<&str>, access: bool) -> Result<bool, FilterError> {
    let Some(installed) = INSTALLED.get() else {
        return Ok(false);
    };
    let wanted = installed
        .command_line
        .as_deref()
        .or(filter)
        .unwrap_or(DEFAULT_FILTER)
        .to_string();
    let mut in_force = installed.in_force.lock().unwrap_or_else(|e| e.into_inner());
    if *in_force == (wanted.clone(), access) {
        return Ok(false);
    }
    let targets = filter_for(&wanted, access)?;
    if installed.handle.reload(targets).is_ok() {
        *in_force = (wanted, access);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn access_lines_are_off_unless_asked_for() {
        let off = filter_for("info", false).unwrap();
        assert!(off.would_enable("ringtunnel::relay", &Level::INFO));
        assert!(!off.would_enable(ACCESS, &Level::INFO));
        let on = filter_for("warn", true).unwrap();
        assert!(on.would_enable(ACCESS, &Level::INFO));
        assert!(!on.would_enable("ringtunnel::relay", &Level::INFO));
        let named = filter_for("warn,access=info", false).unwrap();
        assert!(named.would_enable(ACCESS, &Level::INFO));
        assert!(filter_for("info,ringtunnel=notalevel", false)
            .unwrap_err()
            .to_string()
            .contains("invalid log filter"));
    }
}
