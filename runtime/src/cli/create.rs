//! `sandboxvm create`: boots the container's VM and creates its process,
//! not started (runc create).

use sandboxvm::oci::ContainerId;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::Globals;
use sandboxvm::bundle::Bundle;
use sandboxvm::oci::state;

/// runc's flags of `create`, which `run` takes too.
#[derive(Debug, Clone, Default, Args)]
pub struct RuncCreateFlags {
    /// Write the container's host pid (its monitor's) here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// A Unix socket that receives the terminal's master (process.terminal).
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility (the guest always pivots).
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Accepted for runc compatibility; extra fds are not passed to the guest.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
}

/// Creates container ID from the bundle: its VM boots and the process is
/// created but waits for `start`. The pid written to --pid-file is a host
/// process that lives as long as the container and exits with its status.
#[derive(Debug, Args)]
pub struct Create {
    /// The container id.
    pub id: ContainerId,
    /// The bundle directory.
    #[arg(long, short, default_value = ".")]
    pub bundle: PathBuf,
    #[command(flatten)]
    pub runc: RuncCreateFlags,
    /// Guest kernel (default: $SANDBOXVM_KERNEL, the configuration's guest.kernel, the build cache, /usr/share/sandboxvm).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Guest initramfs (default: $SANDBOXVM_INITRD, the configuration's guest.initrd, the build cache, /usr/share/sandboxvm).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Seconds to wait for the guest agent (default: $SANDBOXVM_BOOT_TIMEOUT,
    /// the configuration's timeouts.boot_secs, or 60; times the scale).
    #[arg(long)]
    pub boot_timeout: Option<u64>,
}

impl Create {
    pub fn run(self, g: &Globals) -> anyhow::Result<i32> {
        let bundle = Bundle::load(&self.bundle)?;
        anyhow::ensure!(
            !bundle.terminal() || self.runc.console_socket.is_some(),
            "the process has a terminal (process.terminal): --console-socket is needed"
        );
        if state::dir(&g.root, &self.id).exists() {
            anyhow::bail!("container with id {:?} already exists", self.id);
        }
        sandboxvm::private::create_dir_all(&g.root)
            .with_context(|| format!("cannot create {}", g.root.display()))?;
        let mut args: Vec<std::ffi::OsString> = vec![
            "--id".into(),
            self.id.as_str().into(),
            "--bundle".into(),
            bundle.dir.clone().into(),
        ];
        if let Some(t) = self.boot_timeout {
            args.push("--boot-timeout".into());
            args.push(t.to_string().into());
        }
        for (flag, v) in [
            ("--console-socket", &self.runc.console_socket),
            ("--kernel", &self.kernel),
            ("--initrd", &self.initrd),
        ] {
            if let Some(v) = v {
                args.push(flag.into());
                args.push(absolute(v)?.into());
            }
        }
        let pid = super::monitor::spawn(g, args)?;
        if let Some(path) = &self.runc.pid_file {
            write_pid_file(path, pid)?;
        }
        Ok(0)
    }
}

fn absolute(p: &std::path::Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// Writes `pid` to `path` atomically (readers never see a partial file).
pub fn write_pid_file(path: &std::path::Path, pid: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("sandboxvm-tmp");
    std::fs::write(&tmp, pid.to_string())
        .and_then(|_| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write pid file {}", path.display()))
}
