//! How long the host side waits for the guest: every such limit in one
//! place, so that `run`, the OCI commands and the containerd shim agree.
//!
//! - `boot`: from the VMM's start until the guest agent answers (60 s);
//! - `call`: one ordinary agent call (30 s; the blocking ones, `Wait` and
//!   the output reads, have none).
//!
//! The configuration file's `[timeouts]` (`boot_secs`, `agent_secs`,
//! `scale`) replace the defaults; `SANDBOXVM_BOOT_TIMEOUT` and
//! `SANDBOXVM_AGENT_TIMEOUT` (seconds) replace those, and
//! `SANDBOXVM_TIMEOUT_SCALE` (a factor, e.g. `4` on an emulated host) the
//! file's scale, which multiplies both. A call limit also scales with the guest
//! itself: once the agent is up, calls get at least
//! [`CALLS_PER_BOOT`] times the time the guest took to come up, so a host
//! that boots guests slowly (overcommitted, or emulated) does not turn every
//! slow answer into a failure, while a fast host still reports a dead guest
//! in 30 s.

use std::time::Duration;

/// Default for [`Timeouts::boot`].
pub const DEFAULT_BOOT: Duration = Duration::from_secs(60);
/// Default for [`Timeouts::call`].
pub const DEFAULT_CALL: Duration = Duration::from_secs(30);
/// The longest limit that can be set, seconds (a day).
pub const MAX_SECS: f64 = 86_400.0;
/// The factors the limits can be scaled by.
pub const SCALE: std::ops::RangeInclusive<f64> = 0.1..=100.0;

/// A limit of `s` seconds, if it is one: above 0, at most [`MAX_SECS`].
pub fn seconds(s: f64) -> Option<Duration> {
    (s.is_finite() && s > 0.0 && s <= MAX_SECS).then(|| Duration::from_secs_f64(s))
}

/// `f`, if it is a factor in [`SCALE`].
pub fn scale(f: f64) -> Option<f64> {
    (f.is_finite() && SCALE.contains(&f)).then_some(f)
}

/// A call may take this many times the guest's boot time (see the module
/// documentation).
pub const CALLS_PER_BOOT: u32 = 20;

/// Errors in the timeout settings.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A variable's value.
    #[error("{var}={value:?}: {why}")]
    Setting {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The configuration file.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
}

/// The limits in force.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    /// The agent must answer within this long after the VMM starts.
    pub boot: Duration,
    /// One ordinary agent call.
    pub call: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            boot: DEFAULT_BOOT,
            call: DEFAULT_CALL,
        }
    }
}

impl Timeouts {
    /// The limits of the configuration in force ([`crate::config`]) with
    /// the environment's overrides.
    pub fn from_env() -> Result<Timeouts, Error> {
        let loaded = crate::config::Loaded::load(None)?;
        Timeouts::configured(&loaded.config.timeouts)
    }

    /// `file`'s limits with the environment's overrides.
    pub fn configured(file: &crate::config::Timeouts) -> Result<Timeouts, Error> {
        Timeouts::from_vars(file, |k| std::env::var(k).ok())
    }

    /// As [`Timeouts::configured`], reading variables through `var`.
    pub fn from_vars(
        file: &crate::config::Timeouts,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Timeouts, Error> {
        let secs = |name: &'static str, default: Duration| -> Result<Duration, Error> {
            match var(name) {
                None => Ok(default),
                Some(v) => match v.trim().parse::<f64>().ok().and_then(seconds) {
                    Some(d) => Ok(d),
                    None => Err(Error::Setting {
                        var: name,
                        value: v,
                        why: "not a number of seconds between 0 and 86400",
                    }),
                },
            }
        };
        let mut t = Timeouts {
            boot: secs(
                "SANDBOXVM_BOOT_TIMEOUT",
                file.boot_secs.map_or(DEFAULT_BOOT, Duration::from_secs_f64),
            )?,
            call: secs(
                "SANDBOXVM_AGENT_TIMEOUT",
                file.agent_secs
                    .map_or(DEFAULT_CALL, Duration::from_secs_f64),
            )?,
        };
        let factor = var("SANDBOXVM_TIMEOUT_SCALE").or_else(|| file.scale.map(|f| f.to_string()));
        if let Some(v) = factor {
            match v.trim().parse::<f64>().ok().and_then(scale) {
                Some(f) => {
                    t.boot = t.boot.mul_f64(f);
                    t.call = t.call.mul_f64(f);
                }
                None => {
                    return Err(Error::Setting {
                        var: "SANDBOXVM_TIMEOUT_SCALE",
                        value: v,
                        why: "not a factor between 0.1 and 100",
                    })
                }
            }
        }
        Ok(t)
    }

    /// The limits of `file` and the environment with `boot_secs` (a
    /// `--boot-timeout` flag), if given, replacing the boot limit.
    pub fn with_boot_flag(
        file: &crate::config::Timeouts,
        boot_secs: Option<u64>,
    ) -> Result<Timeouts, Error> {
        let mut t = Timeouts::configured(file)?;
        if let Some(s) = boot_secs {
            t.boot = Duration::from_secs(s);
        }
        Ok(t)
    }

    /// The call limit for a guest that took `booted` to come up: the
    /// configured one, or [`CALLS_PER_BOOT`] times the boot time if longer.
    pub fn call_after_boot(&self, booted: Duration) -> Duration {
        self.call.max(booted.saturating_mul(CALLS_PER_BOOT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)]) -> Result<Timeouts, Error> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Timeouts::from_vars(&Default::default(), |k| m.get(k).cloned())
    }

    #[test]
    fn the_files_limits_come_before_the_variables() {
        let file = crate::config::Timeouts {
            boot_secs: Some(100.0),
            agent_secs: Some(10.0),
            scale: Some(2.0),
        };
        let t = Timeouts::from_vars(&file, |_| None).unwrap();
        assert_eq!(
            (t.boot, t.call),
            (Duration::from_secs(200), Duration::from_secs(20))
        );
        let t = Timeouts::from_vars(&file, |k| {
            (k == "SANDBOXVM_TIMEOUT_SCALE").then(|| "1".to_string())
        })
        .unwrap();
        assert_eq!(
            (t.boot, t.call),
            (Duration::from_secs(100), Duration::from_secs(10))
        );
    }

    #[test]
    fn defaults_without_variables() {
        assert_eq!(with(&[]).unwrap(), Timeouts::default());
    }

    #[test]
    fn variables_replace_then_scale() {
        let t = with(&[
            ("SANDBOXVM_BOOT_TIMEOUT", "10"),
            ("SANDBOXVM_AGENT_TIMEOUT", "2.5"),
            ("SANDBOXVM_TIMEOUT_SCALE", "3"),
        ])
        .unwrap();
        assert_eq!(t.boot, Duration::from_secs(30));
        assert_eq!(t.call, Duration::from_millis(7500));
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (k, v) in [
            ("SANDBOXVM_BOOT_TIMEOUT", "soon"),
            ("SANDBOXVM_AGENT_TIMEOUT", "-1"),
            ("SANDBOXVM_AGENT_TIMEOUT", "0"),
            ("SANDBOXVM_TIMEOUT_SCALE", "0"),
            ("SANDBOXVM_TIMEOUT_SCALE", "NaN"),
        ] {
            let e = with(&[(k, v)]).unwrap_err().to_string();
            assert!(e.starts_with(&format!("{k}=")), "{e}");
        }
    }

    #[test]
    fn calls_get_more_time_after_a_slow_boot() {
        let t = Timeouts::default();
        assert_eq!(t.call_after_boot(Duration::from_millis(200)), DEFAULT_CALL);
        assert_eq!(
            t.call_after_boot(Duration::from_secs(3)),
            Duration::from_secs(60)
        );
    }
}
