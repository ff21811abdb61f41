//! `sandboxvm`: containers in micro-VMs.
//!
//! The CLI only parses arguments and builds configurations; the work is done
//! by the library crates. Errors are printed once, as one line, here.

mod cli;

use sandboxvm::{bundle, sandbox, signals, timeouts, tty};

use clap::Parser;

fn main() {
    let cli = cli::Cli::try_parse().unwrap_or_else(|e| usage_error(e));
    if let Some(config) = &cli.config {
        // The library's own lookups (the OCI commands' agent limits) and
        // the processes this one starts see the same file. Set before any
        // thread exists.
        std::env::set_var(sandboxvm::config::ENV, config);
    }
    let g = cli::Globals {
        verbose: if cli.debug {
            cli.verbose.max(2)
        } else {
            cli.verbose
        },
        root: cli.root,
        log: cli.log,
        log_format: cli.log_format,
        config: sandboxvm::config::Loaded::load(cli.config.as_deref()).map_err(|e| e.to_string()),
    };
    let to_stderr = g.log.is_none() && !cli.command.is_monitor();
    init_logging(&g, to_stderr);
    match cli.command.run(&g) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            let line = dedup_chain(&chain);
            if g.log.is_some() {
                // containerd's runc shim reads the last error from the log.
                log::error!("{line}");
            }
            eprintln!("sandboxvm: {line}");
            std::process::exit(1);
        }
    }
}

/// Help and version go out as clap prints them; a usage error becomes one
/// line (clap's first, without its "error: " prefix), exit status 2.
fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    // A value refused by its parser (an id): its own error, which quotes the
    // value escaped and bounded (clap's message repeats it raw).
    let line = match (e.kind(), std::error::Error::source(&e)) {
        (ErrorKind::ValueValidation, Some(src)) => src.to_string(),
        _ => usage_line(&e.to_string()).to_string(),
    };
    eprintln!("sandboxvm: {line}");
    std::process::exit(2);
}

fn usage_line(rendered: &str) -> &str {
    let first = rendered.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first)
}

/// Joins an error chain into one line, dropping causes already quoted by
/// their parent's message.
fn dedup_chain(chain: &[String]) -> String {
    let mut line = String::new();
    for msg in chain {
        if line.contains(msg.as_str()) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(msg);
    }
    line
}

/// `-v` shows one line per phase (info), `-vv` debug; `RUST_LOG` overrides.
/// With `--log FILE` messages go there (as JSON lines with
/// `--log-format json`); the monitor without `--log` logs nowhere, since
/// its stderr is the container's.
fn init_logging(g: &cli::Globals, to_stderr: bool) {
    use std::io::Write;
    // Without -v, the configuration's level (a broken file is reported by
    // the command that needs it).
    let configured = g.config.as_ref().ok().and_then(|l| l.config.log.level);
    let default = match g.verbose {
        0 => configured.map_or("warn", |l| l.as_str()),
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let mut b =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default));
    b.format_timestamp_millis();
    if let Some(path) = &g.log {
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => {
                b.target(env_logger::Target::Pipe(Box::new(f)));
            }
            Err(e) => eprintln!("sandboxvm: cannot open log {}: {e}", path.display()),
        }
    } else if !to_stderr {
        b.target(env_logger::Target::Pipe(Box::new(std::io::sink())));
    } else {
        // The VMM's stderr is its vmm.log on the /run tmpfs: bounded, whatever
        // the guest makes it log (its lines are also rate-limited per site).
        b.target(env_logger::Target::Pipe(Box::new(Capped::new(
            std::io::stderr(),
            LOG_LIMIT,
        ))));
    }
    if g.log_format == cli::LogFormat::Json {
        b.format(|buf, rec| {
            let line = serde_json::json!({
                "level": rec.level().as_str().to_lowercase(),
                "msg": rec.args().to_string(),
                "time": sandboxvm::oci::time::now(),
            });
            writeln!(buf, "{line}")
        });
    }
    b.init();
}

/// Most bytes one process logs to stderr.
const LOG_LIMIT: u64 = 16 << 20;

/// A writer that passes at most `limit` bytes, then one line saying so.
struct Capped<W> {
    out: W,
    left: u64,
    told: bool,
}

impl<W: std::io::Write> Capped<W> {
    fn new(out: W, limit: u64) -> Self {
        Capped {
            out,
            left: limit,
            told: false,
        }
    }
}

impl<W: std::io::Write> std::io::Write for Capped<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() as u64 <= self.left {
            self.left -= buf.len() as u64;
            self.out.write_all(buf)?;
        } else if !self.told {
            self.told = true;
            self.left = 0;
            self.out
                .write_all(b"sandboxvm: log limit reached; later lines dropped\n")?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_id_is_a_one_line_usage_error_for_every_command() {
        for args in [
            &["sandboxvm", "delete", "-f", "../victim"][..],
            &["sandboxvm", "delete", "/"],
            &["sandboxvm", "state", ".."],
            &["sandboxvm", "kill", "a/b", "KILL"],
            &["sandboxvm", "create", "--bundle", ".", "../x"],
            &["sandboxvm", "exec", "../x", "true"],
            &["sandboxvm", "events", "../x"],
            &["sandboxvm", "pause", "../x"],
            &["sandboxvm", "start", "../x"],
            &["sandboxvm", "ps", "../x"],
            &["sandboxvm", "state", "a\nb"],
            &["sandboxvm", "state", "\x1b[31mred"],
        ] {
            let e = cli::Cli::try_parse_from(args).expect_err(args[1]);
            let line = std::error::Error::source(&e).unwrap().to_string();
            assert!(line.contains("invalid container id"), "{args:?}: {line}");
            assert!(!line.contains(['\n', '\x1b']), "{args:?}: {line}");
        }
    }

    #[test]
    fn the_log_stops_at_its_limit_with_one_line_saying_so() {
        use std::io::Write;
        let mut c = Capped::new(Vec::new(), 100);
        for _ in 0..1000 {
            c.write_all(b"0123456789\n").unwrap();
        }
        let text = String::from_utf8(c.out).unwrap();
        assert!(text.len() < 100 + 60, "{}", text.len());
        assert!(text.ends_with("log limit reached; later lines dropped\n"));
        assert_eq!(text.matches("limit reached").count(), 1);
    }

    #[test]
    fn error_chain_is_one_line_without_repeats() {
        let chain = vec![
            "cannot boot".to_string(),
            "cannot read kernel /x: No such file".to_string(),
            "No such file".to_string(),
        ];
        assert_eq!(
            dedup_chain(&chain),
            "cannot boot: cannot read kernel /x: No such file"
        );
    }
}
