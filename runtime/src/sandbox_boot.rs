//! The boot sequence of every sandbox, in one place: state directory, the
//! shared directory filled, the network wired, virtiofsd and the VMM
//! started, the guest agent connected and the guest's network configured.
//! `run`, `create` (the monitor) and the containerd shim call
//! [`Sandbox::boot`] and then only create their containers.

use std::path::{Path, PathBuf};

use crate::agent::Agent;
use crate::guest_spec::GuestNetns;
use crate::net::{NetConfig, Network, PodNetwork};
use crate::sandbox::{Error, Options, Sandbox};
use crate::timeouts::Timeouts;

/// The guest's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkPlan {
    /// Loopback only.
    None,
    /// An existing tap of the runtime's network namespace as the guest's
    /// eth0, not configured.
    Tap(String),
    /// A host network namespace (made by CNI or podman): its interfaces
    /// mirrored into the VM ([`PodNetwork`]) and configured in the guest.
    Netns(PathBuf),
    /// As `Netns`, for the caller's own namespace (`/proc/PID/ns/net`,
    /// which the container's hooks filled): the mirroring is not recorded,
    /// as the namespace goes with the caller and the VMM.
    OwnNetns(PathBuf),
}

impl NetworkPlan {
    /// Where a container's network namespace is in the guest.
    pub fn guest_netns(&self) -> GuestNetns {
        match self {
            NetworkPlan::None => GuestNetns::Isolated,
            NetworkPlan::Tap(_) | NetworkPlan::Netns(_) | NetworkPlan::OwnNetns(_) => {
                GuestNetns::Pod
            }
        }
    }
}

/// A sandbox that did not boot. Once the VMM ran, the message also says
/// what the guest console shows (a time-out says it already).
#[derive(Debug, thiserror::Error)]
#[error("{error}{}{console}", if .console.is_empty() { "" } else { "; " })]
pub struct BootError {
    /// What failed.
    pub error: Error,
    /// The guest console's diagnosis ([`crate::guest_console::diagnose`]),
    /// or "".
    pub console: String,
}

impl From<Error> for BootError {
    fn from(error: Error) -> BootError {
        BootError {
            error,
            console: String::new(),
        }
    }
}

/// A booted sandbox, its agent, and what `fill` returned.
pub struct Booted<T> {
    /// The sandbox (dropping it stops the VM and removes its state).
    pub sandbox: Sandbox,
    /// Its guest agent, up, with the guest network configured.
    pub agent: Agent,
    /// `fill`'s result.
    pub filled: T,
}

impl Sandbox {
    /// Boots a sandbox from `opts`. `fill` gets the new state directory,
    /// puts what the guest needs in the shared directory and returns the
    /// directory virtiofsd is to serve (it replaces `opts.shared_dir`) and a
    /// value the caller gets back. `interrupted` ends the wait for the
    /// agent (a signal number). On failure everything started is stopped
    /// and removed.
    pub fn boot<T>(
        opts: &Options,
        network: &NetworkPlan,
        fill: impl FnOnce(&Path) -> Result<(PathBuf, T), Error>,
        timeouts: &Timeouts,
        interrupted: impl FnMut() -> Option<i32>,
    ) -> Result<Booted<T>, BootError> {
        let mut sandbox = Sandbox::prepare(opts)?;
        let (served, filled) = fill(sandbox.dir())?;
        let opts = Options {
            shared_dir: served,
            template_limit: timeouts.boot,
            ..opts.clone()
        };
        let guest_net = match network {
            NetworkPlan::None => None,
            NetworkPlan::Tap(tap) => {
                sandbox.attach_network(Network::Taps(vec![NetConfig {
                    tap: tap.clone(),
                    mac: None,
                    mtu: None,
                }]));
                None
            }
            NetworkPlan::Netns(path) | NetworkPlan::OwnNetns(path) => {
                let pod = match network {
                    NetworkPlan::OwnNetns(_) => PodNetwork::setup_unrecorded(path),
                    _ => PodNetwork::setup(path, sandbox.dir()),
                };
                let pod = pod.map_err(|e| {
                    Error::Network(format!(
                        "cannot wire the network of {}: {e}",
                        path.display()
                    ))
                })?;
                let config = pod.guest_config();
                sandbox.attach_network(Network::Pod(pod));
                Some(config)
            }
        };
        sandbox.launch(&opts)?;
        let agent = sandbox.agent(timeouts, interrupted).and_then(|agent| {
            if let Some(net) = &guest_net {
                agent.configure_network(net)?;
                log::info!("guest network configured");
            }
            Ok(agent)
        });
        match agent {
            Ok(agent) => Ok(Booted {
                sandbox,
                agent,
                filled,
            }),
            Err(error) => {
                for line in sandbox.console_tail(20) {
                    log::info!("guest console: {line}");
                }
                let console = match error {
                    Error::Timeout { .. } => String::new(),
                    _ => crate::guest_console::diagnose(&sandbox.console_log()),
                };
                Err(BootError { error, console })
            }
        }
    }
}
