//! The sandboxvm guest agent: PID 1 of the micro-VM. Serves the ttrpc
//! `Agent` service of the `protocol` crate and runs OCI containers.

pub mod container;
pub mod init;
pub mod network;
pub mod reaper;
pub mod resize;
pub mod server;
pub mod template;
