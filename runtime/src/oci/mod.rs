//! The OCI runtime side of sandboxvm: what `create`/`start`/`state`/...
//! share. A container's state lives in `<root>/<id>/` (the sandbox's state
//! directory) as `state.json` plus marker files, and its "pid" is the host
//! process that monitors it (`sandboxvm` re-executed as the monitor), which
//! lives as long as the container and exits with its status.

pub mod console;
pub mod hooks;
pub mod id;
pub mod state;
pub mod stdio;
pub mod time;

pub use id::ContainerId;
pub use state::{Record, Status};
