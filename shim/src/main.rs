//! `containerd-shim-sandboxvm-v2`: the containerd shim v2 of sandboxvm. One
//! shim and one micro-VM per pod (or per stand-alone container): the first
//! container boots the VM, the pod's other containers are created in it
//! through the guest agent, each with its own rootfs in the pod's virtio-fs
//! share.
//!
//! - [`bootstrap`]: containerd's actions; [`shim`]: start/delete of the
//!   shim itself, grouping by pod;
//! - [`service`]: the task API (create, start, exec, kill, wait, ...);
//! - [`pod`]: the pod's VM, state directory and shared mount;
//! - [`container`]: a container's rootfs and mounts; [`spec`]: its spec as
//!   the guest needs it; [`process`]: init and exec processes;
//! - [`stdio`]: the FIFO pumps; [`events`]: task events; [`mounts`]: host
//!   mount helpers.

mod bootstrap;
mod container;
mod error;
mod events;
mod mounts;
mod options;
mod pod;
mod process;
mod service;
mod shim;
mod spec;
mod stdio;

pub use error::Error;

fn main() {
    std::process::exit(bootstrap::main());
}
