//! Log lines the guest can cause, limited per call site (as Firecracker's
//! rate-limited logging): a guest that pokes a register or posts a bad
//! descriptor a million times a second must not write a million host log
//! lines. Each call site of [`warn_limited!`] / [`error_limited!`] logs at
//! most [`BURST`] lines per [`WINDOW`]; the first line of the next window
//! says how many were dropped.
//!
//! The device modules import them under the usual names
//! (`use crate::{error_limited as error, warn_limited as warn};`), so every
//! line on a guest-driven path is limited without a second thought.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines per call site per window.
pub const BURST: u32 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct State {
    start: Option<Instant>,
    logged: u32,
    dropped: u64,
}

/// The budget of one call site.
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<State>,
}

impl Limiter {
    /// A fresh budget (for a `static`).
    pub const fn new() -> Limiter {
        Limiter {
            state: Mutex::new(State {
                start: None,
                logged: 0,
                dropped: 0,
            }),
        }
    }

    /// Whether a line may go out now: `Some(n)` with the number of lines
    /// dropped since the last one that went out, or `None` to drop it.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = s.start.is_none_or(|t| now.duration_since(t) >= WINDOW);
        if fresh {
            s.start = Some(now);
            s.logged = 0;
        }
        if s.logged < BURST {
            s.logged += 1;
            Some(std::mem::take(&mut s.dropped))
        } else {
            s.dropped += 1;
            None
        }
    }
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::new()
    }
}

/// `log::warn!`, at most [`BURST`] lines per [`WINDOW`] from this call site.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {
        $crate::log_limited!(log::Level::Warn, $($arg)+)
    };
}

/// `log::error!`, at most [`BURST`] lines per [`WINDOW`] from this call site.
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => {
        $crate::log_limited!(log::Level::Error, $($arg)+)
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMITER: $crate::log_limit::Limiter = $crate::log_limit::Limiter::new();
        if log::log_enabled!($level) {
            match LIMITER.allow() {
                Some(0) => log::log!($level, $($arg)+),
                Some(n) => log::log!(
                    $level,
                    "{} ({n} more like it dropped)",
                    format_args!($($arg)+)
                ),
                None => {}
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_silence_then_a_count_of_the_dropped() {
        let l = Limiter::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(l.allow_at(t0), Some(0));
        }
        for _ in 0..1_000_000 {
            assert_eq!(l.allow_at(t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(l.allow_at(t0 + WINDOW), Some(1_000_000));
        assert_eq!(l.allow_at(t0 + WINDOW), Some(0));
    }

    /// Counts the lines that reach the logger, by their first word.
    struct Counter(Mutex<std::collections::HashMap<String, u32>>);
    impl log::Log for Counter {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, r: &log::Record) {
            let text = r.args().to_string();
            let key = text.split(' ').next().unwrap_or_default().to_string();
            *self.0.lock().unwrap().entry(key).or_default() += 1;
        }
        fn flush(&self) {}
    }

    #[test]
    fn each_call_site_has_its_own_budget() {
        static COUNTER: std::sync::OnceLock<Counter> = std::sync::OnceLock::new();
        let c = COUNTER.get_or_init(|| Counter(Mutex::default()));
        // This crate's only logger: no other test installs one.
        log::set_logger(c).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
        for i in 0..100 {
            crate::warn_limited!("site-a {i}");
            crate::error_limited!("site-b {i}");
        }
        let counts = c.0.lock().unwrap().clone();
        assert_eq!(counts.get("site-a"), Some(&BURST));
        assert_eq!(counts.get("site-b"), Some(&BURST));
    }
}
