//! The sandboxvm host runtime as a library: shared by the `sandboxvm` CLI
//! (run and the OCI lifecycle) and the containerd shim.
//!
//! - [`sandbox`]: one VM with its virtiofsd and state directory;
//!   [`sandbox_boot`]: the boot sequence every sandbox goes through;
//! - [`agent`]: the guest agent's API over the VM's vsock;
//! - [`bundle`]: OCI bundles; [`artefacts`]: where kernel, initramfs and
//!   virtiofsd are found; [`signals`], [`tty`]: host-side helpers;
//! - [`config`]: the configuration file (`/etc/sandboxvm/config.toml`);
//! - [`timeouts`]: how long the host waits for the guest;
//!   [`guest_console`]: the guest console read for diagnostics;
//! - [`net`]: pod networking (a host network namespace mirrored into the VM).

pub mod agent;
pub mod artefacts;
pub mod bundle;
pub mod cgroup;
pub mod config;
pub mod guest_console;
pub mod guest_spec;
pub mod net;
pub mod oci;
pub mod private;
pub mod sandbox;
pub mod sandbox_boot;
pub mod sandbox_options;
pub mod share;
pub mod signals;
pub mod sockets;
pub mod template;
pub mod timeouts;
pub mod tty;
pub mod vm_size;
pub mod vmm_args;
