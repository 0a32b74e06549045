//! Clocks: the system clock for production, a manual clock for tests.
//!
//! Triggers and processing-time values (the `rate` source's timestamps, the
//! offset log's batch timestamp) read time only through a [`Clock`], so a
//! test can move time by hand and never sleeps.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

/// A boxed future that waits.
pub type Wait<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A source of time, in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time in milliseconds since the Unix epoch.
    fn now_millis(&self) -> i64;
    /// Waits until [`Clock::now_millis`] reaches `deadline_millis`.
    fn wait_until(&self, deadline_millis: i64) -> Wait<'_>;
}

/// The real wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    // The one place the wall clock is read; everything else asks a `Clock`.
    #[allow(clippy::disallowed_methods)]
    fn now_millis(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }

    fn wait_until(&self, deadline_millis: i64) -> Wait<'_> {
        let delay = (deadline_millis - self.now_millis()).max(0) as u64;
        Box::pin(tokio::time::sleep(Duration::from_millis(delay)))
    }
}

/// A clock that moves only when [`ManualClock::advance`] or
/// [`ManualClock::set`] is called.
#[derive(Debug, Clone)]
pub struct ManualClock {
    inner: Arc<ManualInner>,
}

#[derive(Debug)]
struct ManualInner {
    now: AtomicI64,
    moved: Notify,
}

impl ManualClock {
    /// A manual clock reading `start_millis`.
    pub fn new(start_millis: i64) -> Self {
        ManualClock {
            inner: Arc::new(ManualInner {
                now: AtomicI64::new(start_millis),
                moved: Notify::new(),
            }),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.inner
            .now
            .fetch_add(by.as_millis() as i64, Ordering::SeqCst);
        self.inner.moved.notify_waiters();
    }

    /// Sets the clock to `millis` (never backwards).
    pub fn set(&self, millis: i64) {
        self.inner.now.fetch_max(millis, Ordering::SeqCst);
        self.inner.moved.notify_waiters();
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> i64 {
        self.inner.now.load(Ordering::SeqCst)
    }

    fn wait_until(&self, deadline_millis: i64) -> Wait<'_> {
        Box::pin(async move {
            loop {
                let moved = self.inner.moved.notified();
                if self.now_millis() >= deadline_millis {
                    return;
                }
                moved.await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_clock_wakes_waiters_only_when_advanced_far_enough() {
        let clock = ManualClock::new(1_000);
        let waiter = {
            let clock = clock.clone();
            tokio::spawn(async move { clock.wait_until(1_500).await })
        };
        tokio::task::yield_now().await;
        clock.advance(Duration::from_millis(200));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        clock.advance(Duration::from_millis(300));
        waiter.await.unwrap();
        assert_eq!(clock.now_millis(), 1_500);
    }
}
