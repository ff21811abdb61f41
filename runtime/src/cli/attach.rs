//! Attaching a guest process to host stdio (the caller's, or a pty slave
//! whose master went to a console socket) until it exits, forwarding
//! signals and terminal resizes. Used by `run`, the container monitor and
//! `exec`.

use std::fs::File;
use std::os::fd::AsFd;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::time::Duration;

use sandboxvm::agent::Agent;
use sandboxvm::oci::stdio::{pump_in, pump_out};
use sandboxvm::signals::Forwarder;

/// What wakes [`attach`]'s wait.
enum Event {
    /// The process ended (or the wait failed).
    Done(Result<i32, sandboxvm::agent::Error>),
    /// The wait's thread panicked.
    Lost,
    /// A signal came (maybe SIGCHLD).
    Wake,
}

/// The host side of a process's stdio.
pub struct HostIo {
    stdin: File,
    stdout: File,
    stderr: File,
    /// Where the terminal size is read on SIGWINCH (a terminal process).
    size_from: Option<File>,
}

fn dup(fd: impl AsFd) -> std::io::Result<File> {
    Ok(File::from(fd.as_fd().try_clone_to_owned()?))
}

impl HostIo {
    /// This process's own stdin/stdout/stderr; `tty`: stdin is the
    /// terminal whose size the process gets.
    pub fn inherited(tty: bool) -> std::io::Result<HostIo> {
        Ok(HostIo {
            stdin: dup(std::io::stdin())?,
            stdout: dup(std::io::stdout())?,
            stderr: dup(std::io::stderr())?,
            size_from: if tty {
                Some(dup(std::io::stdin())?)
            } else {
                None
            },
        })
    }

    /// A pty slave for all three (the terminal's size comes from it).
    pub fn pty(slave: File) -> std::io::Result<HostIo> {
        Ok(HostIo {
            stdin: slave.try_clone()?,
            stdout: slave.try_clone()?,
            stderr: slave.try_clone()?,
            size_from: Some(slave),
        })
    }

    /// The terminal size, if this is a terminal.
    pub fn size(&self) -> Option<(u32, u32)> {
        self.size_from
            .as_ref()
            .and_then(sandboxvm::oci::console::size_of)
    }
}

/// Relays stdio of process `exec_id` ("" = init) of container `id` and
/// waits for it; forwards pending signals (SIGWINCH resizes a terminal).
/// `alive` reports a dead VM; it is asked after each signal (SIGCHLD
/// included), not periodically. Returns the exit status (128 + N: signal N).
pub fn attach(
    agent: &Agent,
    id: &str,
    exec_id: &str,
    io: HostIo,
    terminal: bool,
    signals: &Forwarder,
    mut alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<i32> {
    let size = io.size();
    let HostIo {
        stdin,
        stdout,
        stderr,
        size_from,
    } = io;
    let mut pumps = vec![pump_out(agent.clone(), id, exec_id, false, stdout)];
    if !terminal {
        pumps.push(pump_out(agent.clone(), id, exec_id, true, stderr));
    }
    pump_in(agent.clone(), id, exec_id, stdin, !terminal);
    if terminal {
        if let Some((rows, cols)) = size {
            agent.resize(id, exec_id, rows, cols)?;
        }
    }

    // One channel wakes the loop below: the process's end, a signal (to
    // forward, or SIGCHLD: the VMM or virtiofsd may have died). A dead VMM
    // also closes the agent's connection: the wait fails at once.
    let (tx, rx) = mpsc::channel();
    let waker = tx.clone();
    let _waking = signals.wake_with(move || {
        let _ = waker.send(Event::Wake);
    });
    {
        let (agent, id, exec_id) = (agent.clone(), id.to_string(), exec_id.to_string());
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| agent.wait(&id, &exec_id)));
            let _ = tx.send(r.map_or(Event::Lost, Event::Done));
        });
    }
    let status = loop {
        for sig in signals.pending() {
            if sig == libc::SIGWINCH {
                if let Some((rows, cols)) = size_from
                    .as_ref()
                    .and_then(sandboxvm::oci::console::size_of)
                {
                    let _ = agent.resize(id, exec_id, rows, cols);
                }
            } else {
                log::info!("forwarding signal {sig} to {id} {exec_id}");
                if let Err(e) = agent.signal(id, exec_id, sig) {
                    log::debug!("signal {sig}: {e}");
                }
            }
        }
        alive()?;
        match rx.recv() {
            Ok(Event::Done(Ok(status))) => break status,
            Ok(Event::Done(Err(e))) => {
                // A dead VMM or virtiofsd is the better explanation.
                std::thread::sleep(Duration::from_millis(200));
                alive()?;
                anyhow::bail!("lost the guest agent: {e}");
            }
            Ok(Event::Wake) => {}
            Ok(Event::Lost) | Err(_) => anyhow::bail!("lost the guest agent"),
        }
    };
    for p in pumps {
        let _ = p.join();
    }
    Ok(status)
}
