//! Pod networking: a network namespace on the host (made by CNI, podman,
//! or a test) is carried into the VM, as Kata does. For each Ethernet
//! interface of the namespace (the pod's veth) a persistent tap is made
//! in the same namespace and traffic is mirrored both ways with tc (an
//! ingress qdisc on each, a u32 match-all filter with a mirred egress
//! redirect to the other). The VMM runs in that namespace and attaches
//! one virtio-net device per tap, with the veth's MAC and MTU; the guest
//! agent then gives the guest interface the veth's addresses and routes
//! ([`PodNetwork::guest_config`], sent with `ConfigureNetwork`).
//!
//! All netlink work runs in a thread that enters the namespace (see
//! `nl`). What was made is recorded in the sandbox's state directory
//! (`network.json`) before it is made, so that a runtime that dies can
//! be cleaned up after ([`teardown_recorded`]). Teardown removes our
//! filters, the veth's ingress qdisc if we added it, and the taps (their
//! qdiscs and filters go with them).
//!
//! For the containerd shim (one VM per pod, the pod sandbox's netns):
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let opts: sandboxvm::sandbox::Options = todo!();
//! # let agent: sandboxvm::agent::Agent = todo!();
//! use sandboxvm::net::{Network, PodNetwork};
//! use sandboxvm::sandbox::Sandbox;
//! let mut sandbox = Sandbox::prepare(&opts)?;
//! let pod = PodNetwork::setup("/var/run/netns/cni-1234".as_ref(), sandbox.dir())?;
//! let config = pod.guest_config();
//! sandbox.attach_network(Network::Pod(pod)); // torn down when the sandbox drops
//! sandbox.launch(&opts)?;
//! // ... connect the agent, then before creating containers:
//! agent.configure_network(&config)?;
//! # Ok(()) }
//! ```

pub mod netns;
mod nl;
mod tap;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use nl::FILTER_PRIO;

/// The file in a state directory that records what was made.
pub const RECORD_FILE: &str = "network.json";

/// Errors wiring a pod network.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The network namespace could not be opened, entered or made.
    #[error("network namespace {path}: {source}")]
    Netns {
        /// Its path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("netlink: {what}: {reason}")]
    Netlink {
        /// The request.
        what: String,
        /// The kernel's errno, if it answered with one.
        errno: Option<i32>,
        /// Why.
        reason: String,
    },
    /// A tap could not be made.
    #[error("tap {name}: {what}: {source}")]
    Tap {
        /// Its name.
        name: String,
        /// The step.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// An interface that cannot be carried into the VM.
    #[error("interface {name}: {reason}")]
    Interface {
        /// Its name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The record of what was made could not be written or read.
    #[error("network record {path}: {reason}")]
    Record {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The netlink thread failed.
    #[error("netlink thread: {0}")]
    Thread(String),
}

impl Error {
    /// The kernel's errno for a netlink error.
    fn errno(&self) -> Option<i32> {
        match self {
            Error::Netlink { errno, .. } => *errno,
            _ => None,
        }
    }
}

/// An address and prefix length, as in `10.88.0.2/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpNet {
    /// The address.
    pub addr: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<IpNet, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: not ADDRESS/PREFIX"))?;
        let addr: IpAddr = a.parse().map_err(|_| format!("{s:?}: bad address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{s:?}: bad prefix length"))?;
        Ok(IpNet { addr, prefix })
    }
}

/// An interface of the pod's namespace that the guest gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Its name (the guest interface is renamed to it).
    pub name: String,
    /// Its index in the pod's namespace.
    pub index: u32,
    /// Its MAC (the guest interface gets it).
    pub mac: [u8; 6],
    /// Its MTU (tap and guest interface get it).
    pub mtu: u32,
    /// Its global addresses (link-local ones the guest makes itself).
    pub addresses: Vec<IpNet>,
}

/// A route of the pod's namespace that the guest gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination; None = default route.
    pub dest: Option<IpNet>,
    /// An IPv6 route (tells the family of a default route).
    pub ipv6: bool,
    /// Gateway; None = on-link.
    pub gateway: Option<IpAddr>,
    /// The interface's name.
    pub device: String,
    /// Preferred source address.
    pub source: Option<IpAddr>,
    /// Metric.
    pub metric: u32,
}

/// What a network namespace holds for the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Discovery {
    /// Ethernet interfaces other than loopback and taps, by index.
    pub interfaces: Vec<Interface>,
    /// Routes of the main table on those interfaces, without the ones
    /// the kernel makes for addresses.
    pub routes: Vec<Route>,
}

/// DNS settings for a container's `/etc/resolv.conf`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dns {
    /// Name servers.
    pub servers: Vec<String>,
    /// Search domains.
    pub search: Vec<String>,
    /// `options` words.
    pub options: Vec<String>,
}

impl Dns {
    /// Reads resolv.conf text; loopback name servers (a resolver stub on
    /// the host) are left out: the guest cannot reach them.
    pub fn parse(text: &str) -> Dns {
        let mut dns = Dns::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    if let Some(s) = words.next() {
                        let loopback = s.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
                        if !loopback {
                            dns.servers.push(s.to_string());
                        }
                    }
                }
                Some("search" | "domain") => dns.search = words.map(str::to_string).collect(),
                Some("options") => dns.options.extend(words.map(str::to_string)),
                _ => {}
            }
        }
        dns
    }

    /// The DNS settings for the namespace at `netns`: `ip netns`'s
    /// `/etc/netns/NAME/resolv.conf` for `/run/netns/NAME`, else the host's
    /// `/etc/resolv.conf`.
    pub fn for_netns(netns: &Path) -> Dns {
        let named = ["/run/netns", "/var/run/netns"]
            .iter()
            .find_map(|d| netns.strip_prefix(d).ok())
            .map(|name| Path::new("/etc/netns").join(name).join("resolv.conf"));
        let path = named
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("/etc/resolv.conf"));
        Dns::parse(&std::fs::read_to_string(path).unwrap_or_default())
    }
}

/// A virtio-net device of the VM: the VMM's own configuration, which
/// crosses to `sandboxvm boot --net` in its own text form.
pub use vmm::virtio::format_mac;
pub use vmm::NetConfig;

/// The network a sandbox's VM gets.
#[derive(Debug, Default)]
pub enum Network {
    /// None: loopback only in the guest.
    #[default]
    None,
    /// Existing taps in the runtime's own namespace, not configured.
    Taps(Vec<NetConfig>),
    /// A pod network namespace, mirrored; torn down with the sandbox.
    Pod(PodNetwork),
}

impl Network {
    /// The namespace the VMM must run in (None: the runtime's).
    pub fn netns(&self) -> Option<&Path> {
        match self {
            Network::Pod(p) => Some(p.netns()),
            _ => None,
        }
    }

    /// The VM's virtio-net devices.
    pub fn devices(&self) -> Vec<NetConfig> {
        match self {
            Network::None => Vec::new(),
            Network::Taps(d) => d.clone(),
            Network::Pod(p) => p.devices(),
        }
    }
}

/// One veth mirrored to one tap, as recorded in the state directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Mirror {
    veth: String,
    veth_index: u32,
    tap: String,
    /// The veth had no ingress qdisc: ours to remove.
    veth_qdisc_ours: bool,
}

/// What was made in a namespace, written before it is made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    netns: PathBuf,
    mirrors: Vec<Mirror>,
}

impl Record {
    fn save(&self, path: &Path) -> Result<(), Error> {
        let err = |reason: String| Error::Record {
            path: path.to_path_buf(),
            reason,
        };
        let json = serde_json::to_string_pretty(self).map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| err(e.to_string()))
    }

    fn load(path: &Path) -> Result<Option<Record>, Error> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::Record {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Record {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
    }
}

/// Reads what a network namespace holds for a guest.
pub fn discover(netns: &Path) -> Result<Discovery, Error> {
    nl::in_netns(netns, discover_with)
}

fn discover_with(nl: &mut nl::Nl) -> Result<Discovery, Error> {
    let links = nl.links()?;
    let addrs = nl.addresses()?;
    let mut interfaces = Vec::new();
    for l in &links {
        let wanted = l.ether
            && !l.loopback
            && !matches!(l.kind.as_deref(), Some("tun" | "bridge"))
            && l.mac.len() == 6;
        if !wanted {
            continue;
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&l.mac);
        interfaces.push(Interface {
            name: l.name.clone(),
            index: l.index,
            mac,
            mtu: l.mtu,
            addresses: addrs
                .iter()
                .filter(|a| a.index == l.index && !a.local_scope)
                .map(|a| a.net)
                .collect(),
        });
    }
    let names: Vec<&str> = interfaces.iter().map(|i| i.name.as_str()).collect();
    let routes = nl
        .routes(&links)?
        .into_iter()
        .filter(|r| names.contains(&r.device.as_str()))
        .collect();
    Ok(Discovery { interfaces, routes })
}

/// A pod network namespace mirrored into taps for a VM. Dropping it
/// tears the mirroring down (as [`PodNetwork::teardown`], errors logged).
#[derive(Debug)]
pub struct PodNetwork {
    netns: PathBuf,
    /// Where the mirroring is recorded (None: not recorded, the namespace
    /// dies with its maker).
    record_path: Option<PathBuf>,
    discovery: Discovery,
    mirrors: Vec<Mirror>,
    dns: Dns,
    done: bool,
}

impl PodNetwork {
    /// Discovers the interfaces of the namespace at `netns`, makes a tap
    /// for each with the tc mirroring, and records it in `state_dir`. On
    /// failure whatever was made is removed again. DNS settings come from
    /// [`Dns::for_netns`] ([`PodNetwork::set_dns`] replaces them).
    pub fn setup(netns: &Path, state_dir: &Path) -> Result<PodNetwork, Error> {
        PodNetwork::setup_recorded(netns, Some(state_dir.join(RECORD_FILE)))
    }

    /// As [`PodNetwork::setup`] for a namespace of the caller's own
    /// (`/proc/PID/ns/net`): nothing is recorded, as nothing would outlive
    /// the caller and the VMM to clean up, and a recorded pid could name
    /// another process later.
    pub fn setup_unrecorded(netns: &Path) -> Result<PodNetwork, Error> {
        PodNetwork::setup_recorded(netns, None)
    }

    fn setup_recorded(netns: &Path, record_path: Option<PathBuf>) -> Result<PodNetwork, Error> {
        let netns_owned = netns.to_path_buf();
        let rp = record_path.clone();
        let (discovery, mirrors) = nl::in_netns(netns, move |nl| {
            let discovery = discover_with(nl)?;
            let links = nl.links()?;
            let with_ingress = nl.ingress_qdiscs()?;
            let mut mirrors = Vec::new();
            let mut n = 0;
            for i in &discovery.interfaces {
                u16::try_from(i.mtu).map_err(|_| Error::Interface {
                    name: i.name.clone(),
                    reason: format!("MTU {} is above 65535", i.mtu),
                })?;
                let tap = loop {
                    let name = format!("tap{n}_sbx");
                    n += 1;
                    if !links.iter().any(|l| l.name == name) {
                        break name;
                    }
                };
                mirrors.push(Mirror {
                    veth: i.name.clone(),
                    veth_index: i.index,
                    tap,
                    veth_qdisc_ours: !with_ingress.contains(&i.index),
                });
            }
            let record = Record {
                netns: netns_owned,
                mirrors: mirrors.clone(),
            };
            if let Some(rp) = &rp {
                record.save(rp)?;
            }
            if let Err(e) = make(nl, &discovery, &mirrors) {
                if let Err(e2) = unmake(nl, &mirrors) {
                    log::warn!("cleaning up after a failed network setup: {e2}");
                }
                if let Some(rp) = &rp {
                    let _ = std::fs::remove_file(rp);
                }
                return Err(e);
            }
            Ok((discovery, mirrors))
        })?;
        log::info!(
            "pod network {}: {}",
            netns.display(),
            mirrors
                .iter()
                .map(|m| format!("{} <-> {}", m.veth, m.tap))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(PodNetwork {
            netns: netns.to_path_buf(),
            record_path,
            discovery,
            mirrors,
            dns: Dns::for_netns(netns),
            done: false,
        })
    }

    /// The pod's network namespace (the VMM runs there).
    pub fn netns(&self) -> &Path {
        &self.netns
    }

    /// What was discovered.
    pub fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    /// The taps made, in device order (eth0 first).
    pub fn taps(&self) -> Vec<String> {
        self.mirrors.iter().map(|m| m.tap.clone()).collect()
    }

    /// Replaces the DNS settings (e.g. with the pod's DNS config from CRI).
    pub fn set_dns(&mut self, dns: Dns) {
        self.dns = dns;
    }

    /// The VM's devices: one per tap, with the veth's MAC and MTU.
    pub fn devices(&self) -> Vec<NetConfig> {
        self.mirrors
            .iter()
            .zip(&self.discovery.interfaces)
            .map(|(m, i)| NetConfig {
                tap: m.tap.clone(),
                mac: Some(i.mac),
                mtu: u16::try_from(i.mtu).ok(),
            })
            .collect()
    }

    /// The agent's `ConfigureNetwork` request for this network.
    pub fn guest_config(&self) -> protocol::agent::NetworkConfig {
        guest_config(&self.discovery, &self.dns)
    }

    /// Removes the filters, qdiscs and taps made, then the record.
    pub fn teardown(mut self) -> Result<(), Error> {
        self.teardown_inner()
    }

    fn teardown_inner(&mut self) -> Result<(), Error> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let record = Record {
            netns: self.netns.clone(),
            mirrors: self.mirrors.clone(),
        };
        teardown_record(&record)?;
        if let Some(rp) = &self.record_path {
            let _ = std::fs::remove_file(rp);
        }
        Ok(())
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        if let Err(e) = self.teardown_inner() {
            log::warn!("pod network {}: teardown: {e}", self.netns.display());
        }
    }
}

/// The `ConfigureNetwork` request for `d` and `dns`: on-link routes
/// before the ones through a gateway.
pub fn guest_config(d: &Discovery, dns: &Dns) -> protocol::agent::NetworkConfig {
    use protocol::agent::{NetworkConfig, NetworkInterface, NetworkRoute};
    let mut routes: Vec<&Route> = d.routes.iter().collect();
    routes.sort_by_key(|r| r.gateway.is_some());
    NetworkConfig {
        interfaces: d
            .interfaces
            .iter()
            .map(|i| NetworkInterface {
                mac: format_mac(&i.mac),
                name: i.name.clone(),
                mtu: i.mtu,
                addresses: i.addresses.iter().map(ToString::to_string).collect(),
                ..Default::default()
            })
            .collect(),
        routes: routes
            .into_iter()
            .map(|r| NetworkRoute {
                dest: match (r.dest, r.ipv6) {
                    (Some(d), _) => d.to_string(),
                    (None, false) => "default".into(),
                    (None, true) => "default6".into(),
                },
                gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                device: r.device.clone(),
                source: r.source.map(|s| s.to_string()).unwrap_or_default(),
                metric: r.metric,
                ..Default::default()
            })
            .collect(),
        dns_servers: dns.servers.clone(),
        dns_search: dns.search.clone(),
        dns_options: dns.options.clone(),
        ..Default::default()
    }
}

/// Makes the taps and the mirroring of `mirrors`.
fn make(nl: &mut nl::Nl, d: &Discovery, mirrors: &[Mirror]) -> Result<(), Error> {
    for (m, i) in mirrors.iter().zip(&d.interfaces) {
        tap::create_persistent(&m.tap)?;
        let tap = nl.link(&m.tap)?.ok_or_else(|| Error::Interface {
            name: m.tap.clone(),
            reason: "the tap vanished after it was made".into(),
        })?;
        if let Err(e) = nl.no_ipv6_addresses(tap.index) {
            log::debug!("{}: {e}", m.tap);
        }
        nl.set_up(tap.index, i.mtu)?;
        nl.add_ingress_qdisc(tap.index)?;
        if m.veth_qdisc_ours {
            nl.add_ingress_qdisc(m.veth_index)?;
        }
        nl.add_redirect(m.veth_index, tap.index)?;
        #[cfg(test)]
        if m.veth.starts_with("sbxfail") {
            // Tests of the failure path: half the mirroring is made.
            return Err(Error::Interface {
                name: m.veth.clone(),
                reason: "injected failure".into(),
            });
        }
        nl.add_redirect(tap.index, m.veth_index)?;
    }
    Ok(())
}

/// Removes what [`make`] made, as far as it exists (idempotent).
fn unmake(nl: &mut nl::Nl, mirrors: &[Mirror]) -> Result<(), Error> {
    let gone = |r: Result<(), Error>| match r {
        Err(e) if matches!(e.errno(), Some(libc::ENOENT | libc::ENODEV | libc::EINVAL)) => Ok(()),
        other => other,
    };
    let mut first_err = None;
    let links = nl.links()?;
    for m in mirrors {
        // The veth by name and index both: an index may have been reused.
        let veth = links
            .iter()
            .find(|l| l.index == m.veth_index && l.name == m.veth);
        if let Some(v) = veth {
            if let Err(e) = gone(nl.del_redirect(v.index)) {
                first_err.get_or_insert(e);
            }
            if m.veth_qdisc_ours {
                if let Err(e) = gone(nl.del_ingress_qdisc(v.index)) {
                    first_err.get_or_insert(e);
                }
            }
        }
        let tap = links
            .iter()
            .find(|l| l.name == m.tap && l.kind.as_deref() == Some("tun"));
        if let Some(t) = tap {
            if let Err(e) = gone(nl.del_link(t.index)) {
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

fn teardown_record(record: &Record) -> Result<(), Error> {
    if record.mirrors.is_empty() {
        return Ok(());
    }
    let mirrors = record.mirrors.clone();
    match nl::in_netns(&record.netns, move |nl| unmake(nl, &mirrors)) {
        // The namespace is gone, and everything in it.
        Err(Error::Netns { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Tears down what a (dead) runtime recorded in `state_dir`; true if there
/// was a record. The record is removed once the teardown succeeded.
pub fn teardown_recorded(state_dir: &Path) -> Result<bool, Error> {
    let path = state_dir.join(RECORD_FILE);
    let Some(record) = Record::load(&path)? else {
        return Ok(false);
    };
    teardown_record(&record)?;
    let _ = std::fs::remove_file(&path);
    Ok(true)
}

/// The path of the spec's network namespace, if it names one.
pub fn spec_netns(spec: &oci_spec::runtime::Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)?
        .path()
        .clone()
        .filter(|p| !p.as_os_str().is_empty())
}
