//! When micro-batches run.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sluice_common::options::parse_duration;
use sluice_common::{Error, Result};

/// When a query runs its next micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A batch every `interval` (zero: as soon as the previous one commits
    /// and new data is there).
    ProcessingTime(Duration),
    /// One batch over whatever is available, then stop.
    Once,
    /// Everything available at start, in as many capped batches as needed, then stop.
    AvailableNow,
    /// No background loop: batches run only when asked
    /// (`run_batch`, `process_all_available`). For tests and embedding.
    Manual,
}

impl Default for Trigger {
    fn default() -> Self {
        Trigger::ProcessingTime(Duration::ZERO)
    }
}

impl FromStr for Trigger {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "once" => Ok(Trigger::Once),
            "available-now" => Ok(Trigger::AvailableNow),
            "manual" => Ok(Trigger::Manual),
            other => parse_duration(other).map(Trigger::ProcessingTime).map_err(|_| {
                Error::plan(format!(
                    "trigger '{s}' is not one of: an interval such as '5s', 'once', 'available-now'"
                ))
            }),
        }
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::ProcessingTime(d) => write!(f, "processing_time({d:?})"),
            Trigger::Once => f.write_str("once"),
            Trigger::AvailableNow => f.write_str("available_now"),
            Trigger::Manual => f.write_str("manual"),
        }
    }
}

/// When the next batch of a processing-time trigger starts: on the interval
/// grid after `last_start`; immediately if a batch overran its interval
/// (the overrun is reported by progress rather than by skipping batches).
/// With no new data, the loop waits `poll` before looking again.
pub fn next_start_ms(
    last_start_ms: i64,
    interval: Duration,
    now_ms: i64,
    had_data: bool,
    poll: Duration,
) -> i64 {
    let iv = interval.as_millis() as i64;
    if iv == 0 {
        return if had_data {
            now_ms
        } else {
            now_ms + poll.as_millis() as i64
        };
    }
    let next = last_start_ms + iv;
    if next >= now_ms {
        next
    } else {
        // Overran: start now, aligned to nothing.
        now_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_parse_and_intervals_schedule_on_the_grid() {
        assert_eq!(
            "5s".parse::<Trigger>().unwrap(),
            Trigger::ProcessingTime(Duration::from_secs(5))
        );
        assert_eq!(
            "available_now".parse::<Trigger>().unwrap(),
            Trigger::AvailableNow
        );
        assert_eq!("ONCE".parse::<Trigger>().unwrap(), Trigger::Once);
        assert!("sometimes".parse::<Trigger>().is_err());
        let iv = Duration::from_secs(5);
        let poll = Duration::from_millis(100);
        assert_eq!(next_start_ms(1_000, iv, 2_000, true, poll), 6_000);
        assert_eq!(next_start_ms(1_000, iv, 7_500, true, poll), 7_500);
        assert_eq!(
            next_start_ms(1_000, Duration::ZERO, 1_200, true, poll),
            1_200
        );
        assert_eq!(
            next_start_ms(1_000, Duration::ZERO, 1_200, false, poll),
            1_300
        );
    }
}
