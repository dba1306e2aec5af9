//! Where devmgrd's log goes: the journal, with its native fields, when
//! systemd connected stderr to it; stderr otherwise. `RUST_LOG` filters
//! either (default `info`).

use std::os::unix::fs::MetadataExt;

use tracing_journald::{Priority, PriorityMappings};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// syslog's meanings, as other system daemons log: info is
/// "informational" (6), not tracing-journald's default "notice" (5), so
/// that `journalctl -p notice` shows what needs attention.
const PRIORITIES: PriorityMappings = PriorityMappings {
    error: Priority::Error,
    warn: Priority::Warning,
    info: Priority::Informational,
    debug: Priority::Debug,
    trace: Priority::Debug,
};

/// Sets up the global subscriber. Must run once, before anything logs.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let journal = std::env::var("JOURNAL_STREAM")
        .ok()
        .filter(|stream| stderr_is(stream))
        .and_then(|_| tracing_journald::layer().ok());
    match journal {
        // One identifier whatever the binary is called (a versioned path,
        // a test's copy): `journalctl -t devmgrd` finds it.
        Some(layer) => tracing_subscriber::registry()
            .with(filter)
            .with(
                layer
                    .with_syslog_identifier("devmgrd".to_owned())
                    .with_priority_mappings(PRIORITIES),
            )
            .init(),
        None => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
}

/// Whether `stream` ("DEVICE:INODE", as systemd sets JOURNAL_STREAM) is
/// our stderr. systemd's advice: an inherited variable whose stream is not
/// ours (a shell started from a service, a redirection) must be ignored.
fn stderr_is(stream: &str) -> bool {
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match std::fs::metadata("/proc/self/fd/2") {
        Ok(meta) => meta.dev() == dev && meta.ino() == ino,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_own_stderr_is_the_journal() {
        let meta = std::fs::metadata("/proc/self/fd/2").expect("stderr");
        assert!(stderr_is(&format!("{}:{}", meta.dev(), meta.ino())));
        assert!(!stderr_is(&format!("{}:{}", meta.dev(), meta.ino() + 1)));
        assert!(!stderr_is("garbage"));
        assert!(!stderr_is(""));
        assert!(!stderr_is("1:x"));
    }
}
