//! `sandboxvm`: containers in micro-VMs.
//!
//! The CLI only parses arguments and builds configurations; the work is done
//! by the library crates. Errors are printed once, as one line, here.

mod cli;

use sandboxvm::{agent, artefacts, bundle, sandbox, signals, tty};

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    init_logging(cli.verbose);
    match cli.command.run(cli.verbose) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("sandboxvm: {}", dedup_chain(&chain));
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
fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format_timestamp_millis()
        .init();
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
