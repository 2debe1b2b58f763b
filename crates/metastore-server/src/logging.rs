//! The server's log: etcd's `--log-outputs` (stderr by default, stdout, files, several at once),
//! `--log-format text|json`, colours only where a person reads a terminal.

use serde::{Deserialize, Serialize};
use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot open log output {0}: {1}")]
    Open(PathBuf, std::io::Error),
    #[error("invalid --log-level {0:?}: {1}")]
    Level(String, tracing_subscriber::filter::ParseError),
    #[error("--log-outputs {0:?} names no output")]
    NoOutput(String),
    #[error("a logger is already installed: {0}")]
    Installed(#[from] tracing_subscriber::util::TryInitError),
}

/// Line format of every output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event (etcd's `console`).
    #[default]
    #[value(alias = "console")]
    #[serde(alias = "console")]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Where log lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogOutput {
    Stderr,
    Stdout,
    File(PathBuf),
}

/// Parses etcd's `--log-outputs`: a comma-separated list of `default` (stderr), `stderr`,
/// `stdout` or file paths.
pub fn parse_outputs(list: &str) -> Result<Vec<LogOutput>, LogError> {
    let mut outputs = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let output = match part {
            "default" | "stderr" => LogOutput::Stderr,
            "stdout" => LogOutput::Stdout,
            path => LogOutput::File(PathBuf::from(path)),
        };
        if !outputs.contains(&output) {
            outputs.push(output);
        }
    }
    if outputs.is_empty() {
        return Err(LogError::NoOutput(list.to_string()));
    }
    Ok(outputs)
}

type Filtered = Layered<EnvFilter, Registry>;
type BoxedLayer = Box<dyn Layer<Filtered> + Send + Sync>;

/// Installs the process-wide logger. `METASTORE_LOG` (an `EnvFilter` directive) wins over
/// `level`, as before.
pub fn init(format: LogFormat, outputs: &str, level: &str) -> Result<(), LogError> {
    let filter = match EnvFilter::try_from_env("METASTORE_LOG") {
        Ok(filter) => filter,
        Err(_) => EnvFilter::try_new(level).map_err(|e| LogError::Level(level.to_string(), e))?,
    };
    // NO_COLOR (no-color.org) turns colours off even on a terminal.
    let colours_allowed = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let mut layers: Vec<BoxedLayer> = Vec::new();
    for output in parse_outputs(outputs)? {
        let layer = match output {
            LogOutput::Stderr => {
                let ansi = colours_allowed && std::io::stderr().is_terminal();
                fmt_layer(format, ansi, std::io::stderr)
            }
            LogOutput::Stdout => {
                let ansi = colours_allowed && std::io::stdout().is_terminal();
                fmt_layer(format, ansi, std::io::stdout)
            }
            LogOutput::File(path) => {
                // Appending, as etcd does: a restart adds to the log instead of wiping it.
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| LogError::Open(path.clone(), e))?;
                let ansi = colours_allowed && file.is_terminal();
                fmt_layer(format, ansi, Arc::new(file))
            }
        };
        layers.push(layer);
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(layers)
        .try_init()?;
    Ok(())
}

fn fmt_layer<W>(format: LogFormat, ansi: bool, writer: W) -> BoxedLayer
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(layer),
        LogFormat::Json => Box::new(layer.json().flatten_event(true)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_parse_as_etcd_names_them() {
        assert_eq!(
            parse_outputs("default").expect("parse"),
            [LogOutput::Stderr]
        );
        assert_eq!(
            parse_outputs("stderr, stdout,/var/log/ms.log,stderr").expect("parse"),
            [
                LogOutput::Stderr,
                LogOutput::Stdout,
                LogOutput::File("/var/log/ms.log".into())
            ]
        );
        assert!(matches!(parse_outputs(" , "), Err(LogError::NoOutput(_))));
    }
}
