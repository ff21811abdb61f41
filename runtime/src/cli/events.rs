//! `sandboxvm events`: resource usage of a container from its guest, as
//! runc's stats events (JSON lines).

use sandboxvm::oci::ContainerId;
use std::time::Duration;

use clap::Args;

use super::Globals;
use sandboxvm::oci::{Record, Status};

/// Prints stats events of container ID: once with --stats, else every
/// --interval until it stops.
#[derive(Debug, Args)]
pub struct Events {
    /// The container id.
    pub id: ContainerId,
    /// Print one stats event and exit.
    #[arg(long)]
    pub stats: bool,
    /// Time between events (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = parse_interval)]
    pub interval: Duration,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let (num, mul) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else {
        (s, 1000)
    };
    num.parse::<u64>()
        .map(|n| Duration::from_millis(n * mul))
        .map_err(|_| format!("invalid interval {s:?} (e.g. 5s, 500ms)"))
}

/// One stats event in runc's shape.
pub fn stats_event(id: &str, s: &sandboxvm::agent::Stats) -> serde_json::Value {
    serde_json::json!({
        "type": "stats",
        "id": id,
        "data": {
            "cpu": { "usage": { "total": s.cpu_usage_usec * 1000 } },
            "memory": { "usage": { "usage": s.memory_usage_bytes } },
            "pids": { "current": s.pids },
        }
    })
}

impl Events {
    pub fn run(self, g: &Globals) -> anyhow::Result<i32> {
        let record = Record::load(&g.root, &self.id)?;
        loop {
            let status = record.status(&g.root);
            if status == Status::Stopped {
                anyhow::ensure!(!self.stats, "container {} is stopped", self.id);
                return Ok(0);
            }
            if status != Status::Paused {
                let stats = record.agent(&g.root)?.stats(&self.id)?;
                println!("{}", stats_event(&self.id, &stats));
            }
            if self.stats {
                return Ok(0);
            }
            std::thread::sleep(self.interval);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_and_the_event_shape() {
        assert_eq!(parse_interval("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_interval("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_interval("2").unwrap(), Duration::from_secs(2));
        assert!(parse_interval("x").is_err());
        let e = stats_event(
            "c",
            &sandboxvm::agent::Stats {
                cpu_usage_usec: 3,
                memory_usage_bytes: 4096,
                pids: 2,
            },
        );
        assert_eq!(e["data"]["cpu"]["usage"]["total"], 3000);
        assert_eq!(e["data"]["memory"]["usage"]["usage"], 4096);
        assert_eq!(e["data"]["pids"]["current"], 2);
    }
}
