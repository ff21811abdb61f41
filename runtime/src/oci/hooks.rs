//! OCI hooks run on the host: prestart, createRuntime and createContainer
//! (during create, before the VM boots), poststart (after start), poststop
//! (after delete), each with the container's state JSON on stdin. The
//! guest agent runs startContainer hooks in the container.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::Hook;

/// A hook failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// It could not be started.
    #[error("{stage} hook {path}: {source}")]
    Spawn {
        /// Which hook list.
        stage: &'static str,
        /// The hook's path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// It exited non-zero or was killed.
    #[error("{stage} hook {path} failed ({status}){detail}")]
    Failed {
        /// Which hook list.
        stage: &'static str,
        /// The hook's path.
        path: String,
        /// How it ended.
        status: String,
        /// Its last stderr line, as ": ..." or "".
        detail: String,
    },
    /// It outlived its timeout and was killed.
    #[error("{stage} hook {path} timed out after {secs} s")]
    Timeout {
        /// Which hook list.
        stage: &'static str,
        /// The hook's path.
        path: String,
        /// The timeout.
        secs: i64,
    },
}

/// Runs `hooks` in order with `state_json` on their stdin; stops at the
/// first failure.
pub fn run(stage: &'static str, hooks: &[Hook], state_json: &str) -> Result<(), Error> {
    for hook in hooks {
        run_one(stage, hook, state_json)?;
    }
    Ok(())
}

/// Runs every one of `hooks` (poststart, poststop: the spec wants the
/// remaining hooks and the lifecycle to go on after a failure), logging
/// each failure as a warning.
pub fn run_each(stage: &'static str, hooks: &[Hook], state_json: &str) {
    for hook in hooks {
        if let Err(e) = run_one(stage, hook, state_json) {
            log::warn!("{e}");
        }
    }
}

fn run_one(stage: &'static str, hook: &Hook, state_json: &str) -> Result<(), Error> {
    let path = hook.path().display().to_string();
    let mut cmd = Command::new(hook.path());
    if let Some(args) = hook.args() {
        if let Some((argv0, rest)) = args.split_first() {
            cmd.arg0(argv0).args(rest);
        }
    }
    cmd.env_clear();
    for kv in hook.env().iter().flatten() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| Error::Spawn {
        stage,
        path: path.clone(),
        source,
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is fine.
        let _ = stdin.write_all(state_json.as_bytes());
    }
    let stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
        }
        s
    });
    let deadline = hook
        .timeout()
        .filter(|&t| t > 0)
        .map(|t| (t, Instant::now() + Duration::from_secs(t as u64)));
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => {}
            Err(source) => {
                return Err(Error::Spawn {
                    stage,
                    path,
                    source,
                })
            }
        }
        if let Some((secs, at)) = deadline {
            if Instant::now() >= at {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Timeout { stage, path, secs });
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let err = reader.join().unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    let detail = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| format!(": {}", l.trim()))
        .unwrap_or_default();
    Err(Error::Failed {
        stage,
        path,
        status: status.to_string(),
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::HookBuilder;

    fn hook(script: &str, timeout: Option<i64>) -> Hook {
        let mut b = HookBuilder::default()
            .path("/bin/sh")
            .args(vec!["sh".to_string(), "-c".into(), script.into()])
            .env(vec!["GREETING=hi".to_string()]);
        if let Some(t) = timeout {
            b = b.timeout(t);
        }
        b.build().unwrap()
    }

    #[test]
    fn hooks_get_the_state_on_stdin_and_their_env() {
        let dir = std::env::temp_dir().join(format!("sandboxvm-hook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let h = hook(
            &format!("cat > {0}; echo $GREETING >> {0}", out.display()),
            None,
        );
        run("poststart", &[h], r#"{"id":"x"}"#).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "{\"id\":\"x\"}hi\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failing_hook_is_reported_with_its_stderr() {
        let e = run(
            "prestart",
            &[hook("echo no network >&2; exit 3", None)],
            "{}",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("prestart hook /bin/sh failed"), "{e}");
        assert!(e.ends_with(": no network"), "{e}");
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed() {
        let t = Instant::now();
        let e = run("createRuntime", &[hook("sleep 30", Some(1))], "{}").unwrap_err();
        assert!(matches!(e, Error::Timeout { secs: 1, .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn after_a_failed_poststop_hook_the_others_still_run() {
        let dir = std::env::temp_dir().join(format!("sandboxvm-hook-each-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        run_each(
            "poststop",
            &[
                hook(&format!("echo one >> {}; exit 1", out.display()), None),
                hook(&format!("echo two >> {}", out.display()), None),
            ],
            "{}",
        );
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "one\ntwo\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
