//! `sandboxvm update`: new resource limits for a container (runc update):
//! the VM grows first if they need more than it has ([`sandboxvm::vm_size`];
//! beyond its ceiling they are refused), then its cgroup in the guest
//! changes at once.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::{json, Map, Value};

use super::Globals;
use sandboxvm::oci::{state, ContainerId, Record};

/// Updates the resource limits of container ID, as runc does.
#[derive(Debug, Args)]
pub struct Update {
    /// A JSON file of OCI LinuxResources, or - for standard input; the
    /// flags below replace its fields.
    #[arg(long, short)]
    pub resources: Option<PathBuf>,
    /// Memory limit in bytes (k, m, g suffixes; -1: none).
    #[arg(long, allow_hyphen_values = true)]
    pub memory: Option<String>,
    /// Memory soft limit in bytes (the guest cgroup's memory.low).
    #[arg(long, allow_hyphen_values = true)]
    pub memory_reservation: Option<String>,
    /// Memory plus swap in bytes (the guest has no swap: accepted as is).
    #[arg(long, allow_hyphen_values = true)]
    pub memory_swap: Option<String>,
    /// CPU CFS period in µs.
    #[arg(long)]
    pub cpu_period: Option<u64>,
    /// CPU CFS quota in µs per period (-1: none).
    #[arg(long, allow_hyphen_values = true)]
    pub cpu_quota: Option<i64>,
    /// CPU shares (relative weight).
    #[arg(long)]
    pub cpu_share: Option<u64>,
    /// Realtime period: not supported in the guest.
    #[arg(long)]
    pub cpu_rt_period: Option<u64>,
    /// Realtime runtime: not supported in the guest.
    #[arg(long)]
    pub cpu_rt_runtime: Option<i64>,
    /// CPUs to use: not supported in the guest.
    #[arg(long)]
    pub cpuset_cpus: Option<String>,
    /// Memory nodes to use: not supported in the guest.
    #[arg(long)]
    pub cpuset_mems: Option<String>,
    /// Block I/O weight: not supported in the guest.
    #[arg(long)]
    pub blkio_weight: Option<u16>,
    /// Maximum number of processes (-1: none).
    #[arg(long, allow_hyphen_values = true)]
    pub pids_limit: Option<i64>,
    /// Intel RDT: not supported in the guest.
    #[arg(long)]
    pub l3_cache_schema: Option<String>,
    /// Intel RDT: not supported in the guest.
    #[arg(long)]
    pub mem_bw_schema: Option<String>,
    /// The container id.
    pub id: ContainerId,
}

impl Update {
    pub fn run(self, g: &Globals) -> anyhow::Result<i32> {
        let unsupported = [
            ("--cpu-rt-period", self.cpu_rt_period.is_some()),
            ("--cpu-rt-runtime", self.cpu_rt_runtime.is_some()),
            ("--l3-cache-schema", self.l3_cache_schema.is_some()),
            ("--mem-bw-schema", self.mem_bw_schema.is_some()),
        ];
        if let Some((flag, _)) = unsupported.iter().find(|(_, set)| *set) {
            anyhow::bail!("{flag} is not supported: the container runs in a VM");
        }
        let resources = self.resources_json()?;
        let parsed: oci_spec::runtime::LinuxResources =
            serde_json::from_value(resources.clone()).context("resources")?;
        // Held to the end: the guest's limits and the record change together.
        let (mut record, _locked) = Record::load_locked(&g.root, &self.id)?;
        let agent = record.live_agent(&g.root)?;
        let before = record.vm;
        let grown = record
            .vm
            .grow_for(&agent, &parsed, u32::try_from(record.vmm_pid).unwrap_or(0));
        if record.vm != before {
            record
                .save(&state::dir(&g.root, &self.id))
                .context("cannot write the container state")?;
        }
        grown.map_err(|e| anyhow::anyhow!("container {}: {e}", self.id))?;
        agent.update(&self.id, &resources.to_string())?;
        Ok(0)
    }

    /// The `--resources` object with the flags' fields replaced.
    fn resources_json(&self) -> anyhow::Result<Value> {
        let mut r = match &self.resources {
            None => json!({}),
            Some(path) => {
                let text = if path.as_os_str() == "-" {
                    let mut s = String::new();
                    std::io::stdin()
                        .take(1 << 20)
                        .read_to_string(&mut s)
                        .context("cannot read the resources from standard input")?;
                    s
                } else {
                    std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?
                };
                let v: Value = serde_json::from_str(&text).context("resources: malformed JSON")?;
                anyhow::ensure!(v.is_object(), "resources: not a JSON object");
                v
            }
        };
        let mut set = |section: &str, key: &str, value: Value| {
            let obj = r.as_object_mut().expect("an object");
            let s = obj
                .entry(section)
                .or_insert_with(|| Value::Object(Map::new()));
            if !s.is_object() {
                *s = Value::Object(Map::new());
            }
            s.as_object_mut()
                .expect("an object")
                .insert(key.into(), value);
        };
        for (flag, key, v) in [
            ("--memory", "limit", &self.memory),
            (
                "--memory-reservation",
                "reservation",
                &self.memory_reservation,
            ),
            ("--memory-swap", "swap", &self.memory_swap),
        ] {
            if let Some(v) = v {
                let bytes = parse_bytes(v).with_context(|| format!("{flag} {v:?}"))?;
                set("memory", key, json!(bytes));
            }
        }
        if let Some(p) = self.cpu_period {
            set("cpu", "period", json!(p));
        }
        if let Some(q) = self.cpu_quota {
            set("cpu", "quota", json!(q));
        }
        if let Some(s) = self.cpu_share {
            set("cpu", "shares", json!(s));
        }
        if let Some(c) = &self.cpuset_cpus {
            set("cpu", "cpus", json!(c));
        }
        if let Some(m) = &self.cpuset_mems {
            set("cpu", "mems", json!(m));
        }
        if let Some(w) = self.blkio_weight {
            set("blockIO", "weight", json!(w));
        }
        if let Some(l) = self.pids_limit {
            set("pids", "limit", json!(l));
        }
        Ok(r)
    }
}

/// Bytes as runc's flags take them: a number with an optional k, m, g or t
/// suffix (binary units, an optional trailing b), or -1 for no limit.
fn parse_bytes(v: &str) -> anyhow::Result<i64> {
    let s = v.trim().to_ascii_lowercase();
    if s == "-1" {
        return Ok(-1);
    }
    let s = s.strip_suffix('b').unwrap_or(&s);
    let (digits, shift) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 10),
        Some('m') => (&s[..s.len() - 1], 20),
        Some('g') => (&s[..s.len() - 1], 30),
        Some('t') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: i64 = digits
        .trim()
        .parse()
        .ok()
        .filter(|&n| n >= 0)
        .context("not a size in bytes (e.g. 536870912, 512m, 1g)")?;
    n.checked_mul(1 << shift).context("too large")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_runc_takes_them() {
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("512m").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("64kb").unwrap(), 64 << 10);
        assert_eq!(parse_bytes("-1").unwrap(), -1);
        for bad in ["", "m", "-5", "lots", "99999999999t"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }
}
