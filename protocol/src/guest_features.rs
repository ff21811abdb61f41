//! What the guest agent applies of an OCI spec beyond the basics, in the
//! runtime-spec's names: `sandboxvm features` reports these lists
//! (runtime-spec `features.md`), and the agent's tests check its code
//! accepts each of them.

/// Namespace types a container may ask for (a time namespace is refused).
pub const NAMESPACES: &[&str] = &["cgroup", "ipc", "mount", "network", "pid", "uts", "user"];

/// Seccomp actions (`SCMP_ACT_NOTIFY` is refused: a seccomp agent on the
/// host cannot serve calls made in the guest).
pub const SECCOMP_ACTIONS: &[&str] = &[
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_LOG",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_TRAP",
];

/// Seccomp argument comparisons.
pub const SECCOMP_OPERATORS: &[&str] = &[
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_LE",
    "SCMP_CMP_LT",
    "SCMP_CMP_MASKED_EQ",
    "SCMP_CMP_NE",
];

/// Seccomp architectures: the guest's (its kernel has no 32-bit ABI).
pub const SECCOMP_ARCHS: &[&str] = &["SCMP_ARCH_X86_64"];

/// Seccomp filter flags.
pub const SECCOMP_FLAGS: &[&str] = &[
    "SECCOMP_FILTER_FLAG_LOG",
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
    "SECCOMP_FILTER_FLAG_TSYNC",
];
