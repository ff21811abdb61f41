//! `containerd-shim-sandboxvm-v2`: the containerd shim v2 of sandboxvm. One
//! shim and one micro-VM per pod (or per stand-alone container): the first
//! container boots the VM, the pod's other containers are created in it
//! through the guest agent, each with its own rootfs in the pod's virtio-fs
//! share.
//!
//! - [`shim`]: start/delete of the shim itself, grouping by pod;
//! - [`service`]: the task API (create, start, exec, kill, wait, ...);
//! - [`pod`]: the pod's VM, state directory and shared mount;
//! - [`container`]: a container's rootfs and mounts; [`spec`]: its spec as
//!   the guest needs it; [`process`]: init and exec processes;
//! - [`stdio`]: the FIFO pumps; [`events`]: task events; [`mounts`]: host
//!   mount helpers.

mod container;
mod error;
mod events;
mod mounts;
mod pod;
mod process;
mod service;
mod shim;
mod spec;
mod stdio;

pub use error::Error;

fn main() {
    let config = containerd_shim::Config {
        // The sandbox reaps its own children (the VMM and virtiofsd); the
        // library's reaper would take their exit statuses from it.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<shim::Shim>(shim::RUNTIME_ID, Some(config));
}
