//! Ballista's log, on standard error, for `sluice cluster` processes.
//!
//! Ballista logs through the `log` facade and installs no logger of its
//! own in the servers we start. `SLUICE_LOG=info` (or `warn`, `debug`,
//! `trace`) makes [`init_from_env`] install this one, which writes
//! `<level> <target>: <message>` lines to standard error.

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Stderr {
    level: LevelFilter,
}

impl Log for Stderr {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            eprintln!("{} {}: {}", record.level(), record.target(), record.args());
        }
    }

    fn flush(&self) {}
}

/// Installs the logger at the level `SLUICE_LOG` names, if it names one
/// (and no logger is installed yet).
pub fn init_from_env() {
    let level = match std::env::var("SLUICE_LOG").ok().as_deref().map(str::trim) {
        Some(l) if l.eq_ignore_ascii_case("error") => Level::Error,
        Some(l) if l.eq_ignore_ascii_case("warn") => Level::Warn,
        Some(l) if l.eq_ignore_ascii_case("info") => Level::Info,
        Some(l) if l.eq_ignore_ascii_case("debug") => Level::Debug,
        Some(l) if l.eq_ignore_ascii_case("trace") => Level::Trace,
        _ => return,
    };
    // Installed once for the life of the process.
    let logger: &'static Stderr = Box::leak(Box::new(Stderr {
        level: level.to_level_filter(),
    }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level.to_level_filter());
    }
}
