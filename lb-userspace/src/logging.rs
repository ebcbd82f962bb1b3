//! The agent's and CLI's logs: `tracing` events on stderr (stdout carries
//! `lb: ready` and command output), filtered with `RUST_LOG` (default
//! `info`), with `log` records of dependencies bridged. `--log-format`
//! picks human lines (the default; colours only on a terminal) or one JSON
//! object per line whose structured fields (`service`, `backend`,
//! `address`, `health`, `reason` on health transitions) are top-level keys.

use tracing::Subscriber;
use tracing_subscriber::{EnvFilter, fmt::MakeWriter, util::SubscriberInitExt};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event
    #[default]
    Human,
    /// One JSON object per line, for log collectors
    Json,
}

/// The subscriber for `format`, writing to `writer`.
pub fn subscriber<W>(format: LogFormat, writer: W, ansi: bool) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_target(false)
        .with_env_filter(filter);
    match format {
        LogFormat::Human => Box::new(builder.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .finish(),
        ),
    }
}

/// Installs the subscriber for the process (logs on stderr).
pub fn init(format: LogFormat) {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Also bridges `log` records (tracing-subscriber's `tracing-log`);
    // fails only if a subscriber is already set.
    let _ = subscriber(format, std::io::stderr, ansi).try_init();
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        sync::{Arc, Mutex, PoisonError},
    };

    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(format: LogFormat) -> String {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = subscriber(format, move || writer.clone(), false);
        tracing::subscriber::with_default(subscriber, || {
            // As the agent logs a health transition.
            tracing::warn!(
                service = "www",
                backend = "web2",
                address = "198.19.0.12:80",
                health = "down",
                reason = "2 consecutive failures: connection refused",
                "backend www/web2 (198.19.0.12:80) is DOWN: 2 consecutive failures: connection refused"
            );
            tracing::info!("reloaded lb.toml");
        });
        let bytes = capture
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    #[test]
    fn json_lines_parse_and_carry_the_fields() {
        let text = logged(LogFormat::Json);
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let down = &lines[0];
        for (key, want) in [
            ("level", "WARN"),
            ("service", "www"),
            ("backend", "web2"),
            ("address", "198.19.0.12:80"),
            ("health", "down"),
            ("reason", "2 consecutive failures: connection refused"),
        ] {
            assert_eq!(down[key], want, "{key} in {down}");
        }
        assert!(
            down["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("backend www/web2")),
            "{down}"
        );
        assert!(down["timestamp"].is_string(), "{down}");
        assert_eq!(lines[1]["message"], "reloaded lb.toml");
    }

    #[test]
    fn human_lines_are_plain_text() {
        let text = logged(LogFormat::Human);
        let first = text.lines().next().expect("a line");
        assert!(first.contains("WARN"), "{first}");
        assert!(first.contains("is DOWN"), "{first}");
        assert!(
            first.contains("service=\"www\"") || first.contains("service=www"),
            "{first}"
        );
        assert!(
            !text.contains('\u{1b}'),
            "no colours off a terminal: {text:?}"
        );
        assert!(serde_json::from_str::<serde_json::Value>(first).is_err());
    }
}
