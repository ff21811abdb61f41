//! A template guest (`sandboxvm.template` on the kernel command line): the
//! agent gets the system ready, says so on the console, and waits on the
//! serial line before it touches any device. The VMM saves the guest there.
//! Each copy restored from it gets a line from its VMM on the serial input
//! ([`protocol::template::Restore`]): the agent reseeds the kernel's random
//! pool with it (copies of one template must not share a pool or a boot
//! id: the boot id is made on its first read, after this), sets the wall
//! clock, then binds the copy's own virtio devices and goes on as a guest
//! booted cold.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{bail, Context, Result};
use nix::sys::termios::{self, SetArg};
use protocol::template::{Restore, ENTROPY_BYTES, PARAM, READY};

/// Whether the kernel command line makes this guest a template.
pub fn is_template() -> bool {
    std::fs::read_to_string("/proc/cmdline")
        .is_ok_and(|line| line.split_whitespace().any(|w| w == PARAM))
}

/// Says the guest is ready to be saved and waits for the restore line; then
/// reseeds, sets the clock and binds the devices.
pub fn await_restore() -> Result<()> {
    let mut tty = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/ttyS0")
        .context("open /dev/ttyS0")?;
    let cooked = termios::tcgetattr(&tty).context("tcgetattr")?;
    let mut raw = cooked.clone();
    termios::cfmakeraw(&mut raw);
    termios::tcsetattr(&tty, SetArg::TCSANOW, &raw).context("tcsetattr")?;
    tty.write_all(format!("\r\n{READY}\r\n").as_bytes())
        .context("write the ready line")?;
    let line = read_line(&mut tty)?;
    let _ = termios::tcsetattr(&tty, SetArg::TCSANOW, &cooked);
    let restore = Restore::parse(&line).with_context(|| format!("not a restore line: {line:?}"))?;
    reseed(&restore.entropy)?;
    set_clock(restore.time_us)?;
    let bound = bind_devices()?;
    log::info!("restored from a template: random pool reseeded, clock set, {bound} devices bound");
    Ok(())
}

/// Reads up to a newline (at most 128 bytes).
fn read_line(tty: &mut File) -> Result<String> {
    let mut line = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    while line.len() < 128 {
        if tty.read(&mut byte).context("read the restore line")? == 0 {
            bail!("the serial line closed before the restore line");
        }
        match byte[0] {
            b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            b'\r' => {}
            b => line.push(b),
        }
    }
    bail!("restore line too long")
}

/// `struct rand_pool_info` with the host's bytes.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; ENTROPY_BYTES],
}

nix::ioctl_write_ptr_bad!(
    rnd_add_entropy,
    nix::request_code_write!(b'R', 0x03, 2 * std::mem::size_of::<libc::c_int>()),
    RandPoolInfo
);
nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);

/// Mixes the host's bytes into the input pool, credited, and makes the
/// kernel rekey its generator from the pool now (not at its next
/// scheduled reseed, which would leave copies of a template drawing the
/// same numbers until then).
fn reseed(entropy: &[u8; ENTROPY_BYTES]) -> Result<()> {
    let urandom = File::options()
        .write(true)
        .open("/dev/urandom")
        .context("open /dev/urandom")?;
    let info = RandPoolInfo {
        entropy_count: (ENTROPY_BYTES * 8) as libc::c_int,
        buf_size: ENTROPY_BYTES as libc::c_int,
        buf: *entropy,
    };
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buf holds buf_size
    // bytes, as `info` does.
    unsafe { rnd_add_entropy(urandom.as_raw_fd(), &info) }.context("RNDADDENTROPY")?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    match unsafe { rnd_reseed_crng(urandom.as_raw_fd()) } {
        // Not seeded before: the 256 bits just credited seeded it, from
        // the pool they went into, which is a reseed.
        Ok(_) | Err(nix::Error::ENODATA) => Ok(()),
        Err(e) => Err(e).context("RNDRESEEDCRNG"),
    }
}

fn set_clock(time_us: u64) -> Result<()> {
    let ts = libc::timespec {
        tv_sec: (time_us / 1_000_000) as libc::time_t,
        tv_nsec: ((time_us % 1_000_000) * 1000) as libc::c_long,
    };
    // SAFETY: clock_settime reads the timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        bail!("clock_settime: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Binds every virtio-mmio slot that has no driver, in slot order (so the
/// first network device is eth0 again). Returns how many were bound.
fn bind_devices() -> Result<usize> {
    let devices = Path::new("/sys/bus/platform/devices");
    let mut slots: Vec<(u32, String)> = std::fs::read_dir(devices)
        .context("list platform devices")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = name.strip_prefix("virtio-mmio.")?.parse().ok()?;
            Some((n, name))
        })
        .collect();
    slots.sort();
    let mut bound = 0;
    for (_, name) in slots {
        if devices.join(&name).join("driver").exists() {
            continue;
        }
        std::fs::write("/sys/bus/platform/drivers/virtio-mmio/bind", &name)
            .with_context(|| format!("bind {name}"))?;
        bound += 1;
    }
    Ok(bound)
}
