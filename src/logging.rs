//! tracing-subscriber set-up with a reloadable filter, so SIGHUP can change the log level.

use svcd_config::{LogConfig, LogFormat};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

/// Changes the active filter after start-up.
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` wins over the config file, as users expect of a Rust program.
    env_override: bool,
}

impl LogControl {
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        if self.env_override {
            return Ok(());
        }
        let filter = Self::filter(level)?;
        self.handle.reload(filter).map_err(|e| e.to_string())
    }

    /// Whether `level` is a valid filter, without applying it (a reload checks everything first).
    pub fn check_level(level: &str) -> Result<(), String> {
        Self::filter(level).map(|_| ())
    }

    fn filter(level: &str) -> Result<EnvFilter, String> {
        EnvFilter::try_new(with_quiet_dependencies(level))
            .map_err(|e| format!("log.level {level:?}: {e}"))
    }
}

/// Installs the global subscriber (logs go to stderr).
pub fn init(config: &LogConfig) -> LogControl {
    let env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let env_override = env.is_some();
    let spec = with_quiet_dependencies(&env.unwrap_or_else(|| config.level.clone()));
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|e| {
        eprintln!("svcd: invalid log filter {spec:?} ({e}); using \"info\"");
        EnvFilter::new("info")
    });
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match config.format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .init(),
        LogFormat::Human => registry
            .with(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr))
            .init(),
    }
    LogControl {
        handle,
        env_override,
    }
}

/// hickory logs every request at info; keep it at warn unless the filter names it.
fn with_quiet_dependencies(spec: &str) -> String {
    if spec.contains("hickory") {
        spec.to_string()
    } else {
        format!(
            "{spec},hickory_server=warn,hickory_proto=warn,hickory_resolver=warn,hickory_net=warn"
        )
    }
}
