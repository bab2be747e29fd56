//! The broker's log lines on stderr: the human format (the default), or one
//! JSON object per event (`--log-format json`) with the same fields, for a
//! log collector. `RUST_LOG` filters both, in its usual directive syntax
//! without regular expressions: a default level and levels per module, e.g.
//! `warn,keyferry_broker::session=info`.

use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// `TIME LEVEL message key=value …`, for people.
    #[default]
    Human,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message`
    /// and the event's fields.
    Json,
}

/// The filter `RUST_LOG` asks for (info and above when unset or empty).
pub fn filter(rust_log: Option<&str>) -> Result<Targets, String> {
    match rust_log.map(str::trim) {
        None | Some("") => Ok(Targets::new().with_default(Level::INFO)),
        Some(directives) => directives.parse::<Targets>().map_err(|e| {
            format!(
                "RUST_LOG={directives:?}: {e} (directives are LEVEL or MODULE=LEVEL, \
                 separated by commas)"
            )
        }),
    }
}

/// Installs the process's log output: `format` on stderr, filtered by the
/// directives in `rust_log`.
pub fn init(format: LogFormat, rust_log: Option<&str>) -> Result<(), String> {
    let filter = filter(rust_log)?;
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Human => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    installed.map_err(|e| format!("cannot install the log output: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_directives_are_read_and_nonsense_is_refused() {
        assert!(
            filter(None)
                .unwrap()
                .would_enable("keyferry_broker", &Level::INFO)
        );
        let f = filter(Some("warn,keyferry_broker::session=debug")).unwrap();
        assert!(f.would_enable("keyferry_broker::session::auth", &Level::DEBUG));
        assert!(!f.would_enable("keyferry_broker::server", &Level::INFO));
        assert!(filter(Some("keyferry_broker=loud")).is_err());
    }
}
