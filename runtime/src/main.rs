//! `sandboxvm`: containers in micro-VMs.
//!
//! The CLI only parses arguments and builds configurations; the work is done
//! by the library crates. Errors are printed once, as one line, here.

mod cli;

use sandboxvm::{artefacts, bundle, sandbox, signals, timeouts, tty};

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    let g = cli::Globals {
        verbose: if cli.debug {
            cli.verbose.max(2)
        } else {
            cli.verbose
        },
        root: cli.root,
        log: cli.log,
        log_format: cli.log_format,
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
    let default = match g.verbose {
        0 => "warn",
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

#[cfg(test)]
mod tests {
    use super::*;

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
