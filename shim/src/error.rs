//! The shim's errors, and how they reach containerd (ttrpc status codes that
//! containerd maps to its errdefs: not found, already exists, ...).

use containerd_shim::protos::ttrpc::{self, Code};

/// Errors of the task service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such container or process.
    #[error("{0}: not found")]
    NotFound(String),
    /// The container or process exists already.
    #[error("{0}: already exists")]
    Exists(String),
    /// The operation does not fit the current state.
    #[error("{0}")]
    State(String),
    /// A bad request.
    #[error("{0}")]
    Invalid(String),
    /// A container, pod or exec id that may not name anything on the host.
    #[error(transparent)]
    Id(#[from] sandboxvm::oci::id::InvalidId),
    /// The bundle (config.json, rootfs).
    #[error(transparent)]
    Bundle(#[from] sandboxvm::bundle::Error),
    /// Kernel, initramfs or virtiofsd not found.
    #[error(transparent)]
    Artefact(#[from] sandboxvm::artefacts::Error),
    /// The pod's share (bind mounts, the guest's view).
    #[error(transparent)]
    Share(#[from] sandboxvm::share::Error),
    /// The pod's host cgroup (`linux.cgroupsPath` of its sandbox).
    #[error(transparent)]
    Cgroup(#[from] sandboxvm::cgroup::Error),
    /// The VM (virtiofsd, VMM, boot).
    #[error("the sandbox VM: {0}")]
    Sandbox(#[from] sandboxvm::sandbox::Error),
    /// The guest agent refused or failed.
    #[error("{0}")]
    Agent(#[from] sandboxvm::agent::Error),
    /// A host mount.
    #[error("{what}: {source}")]
    Mount {
        /// What was mounted or unmounted.
        what: String,
        /// The error.
        source: nix::Error,
    },
    /// A signal to a host process.
    #[error("{what}: {source}")]
    Signal {
        /// Which signal to whom.
        what: String,
        /// The error.
        source: nix::Error,
    },
    /// A host file operation.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

impl Error {
    /// An I/O error with context.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::Exists(_) => Code::ALREADY_EXISTS,
            Error::State(_) => Code::FAILED_PRECONDITION,
            Error::Invalid(_)
            | Error::Id(_)
            | Error::Bundle(_)
            | Error::Cgroup(sandboxvm::cgroup::Error::BadPath { .. }) => Code::INVALID_ARGUMENT,
            _ => Code::UNKNOWN,
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> ttrpc::Error {
        log::warn!("{e}");
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

/// Results of the task service.
pub type Result<T> = std::result::Result<T, Error>;
