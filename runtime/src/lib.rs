//! What both Snooze binaries need around their own logic, written once: logging set-up,
//! signals and shutdown, a supervisor for long-running tasks, the admin server
//! (`/livez`, `/readyz`, `/metrics` and routes of the binary's own), the Bearer-token
//! check of its protected routes, and watch streams that never end on an error.

pub mod admin;
pub mod auth;
pub mod shutdown;
pub mod supervisor;
pub mod watch;

/// Sets up logging to stderr: `json` or `text` (`RUST_LOG` filters; default
/// `info,kube=warn`).
pub fn init_logging(format: &str) {
    let subscriber = tracing_subscriber::fmt().with_env_filter(
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| "info,kube=warn".into()),
    );
    if format == "json" {
        subscriber.json().init();
    } else {
        subscriber
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

/// The process's resident memory (`VmRSS` of /proc/self/status), for the
/// `*_resident_memory_bytes` gauges; `None` where there is no procfs.
pub fn resident_memory_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: i64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Parses a duration such as `10s`, `1m30s` or `250ms` (the Kubernetes notation).
pub fn duration(s: &str) -> Result<std::time::Duration, String> {
    s.parse::<kube::core::Duration>()
        .map(Into::into)
        .map_err(|e| format!("{s:?}: {e}"))
}
