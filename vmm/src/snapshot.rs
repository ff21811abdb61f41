//! Templates: a booted guest saved once and restored by every new VM that
//! asks for the same thing, instead of booting its kernel again.
//!
//! What a template holds: every vCPU's registers, FPU/XSAVE, LAPIC, MSRs,
//! events and multiprocessing state; the in-kernel IRQ chip (both PICs and
//! the IOAPIC), the PIT and the KVM clock; the UART's registers; and the
//! guest's memory as a sparse file (only the pages that are not zero). No
//! virtio device is in it: the template guest boots with its device slots
//! on the command line but nothing behind them, and its agent binds the
//! devices once restored, so each restored VM probes its own devices (its
//! own vsock, virtiofsd, taps and MACs) from scratch.
//!
//! A restored VM maps the memory file private and copy-on-write
//! ([`map_memory`]): every VM restored from one template shares the pages
//! its guest has not written (the file's page cache), and what a guest
//! writes is its own. virtiofsd cannot map such memory, so the restored
//! VM's virtio-fs device relays each request through memory of its own.
//!
//! A template is never trusted: its manifest names the format, the VM it
//! was built for (vCPUs, memory, the whole kernel command line) and a
//! checksum of its state and of its memory; [`load`] checks them all, and
//! a VM whose template does not check out boots cold.
//!
//! Layout of a template directory: `template.json` (the [`Manifest`]) and
//! `memory` (the guest memory file, holes where the guest had zeros).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestRam;

/// The manifest's file name in a template directory.
pub const MANIFEST: &str = "template.json";
/// The guest memory's file name in a template directory.
pub const MEMORY: &str = "memory";
/// Bumped whenever what a template holds changes.
pub const FORMAT: u32 = 1;
/// What the guest agent prints on the console once the template guest is
/// ready to be saved (only a VM building a template acts on it).
pub const READY_MARKER: &str = "sandboxvm-agent: template ready";
const PAGE: usize = 4096;

/// Errors from saving or loading a template.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// Saved MSRs were refused.
    #[error(transparent)]
    Msr(#[from] crate::arch::msr::Error),
    /// Mapping the template's memory.
    #[error(transparent)]
    Memory(#[from] crate::memory::Error),
    /// A template file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The manifest is not a template of this format.
    #[error("{}: {why}", path.display())]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The template is for another VM, or does not check out.
    #[error("template {}: {why}", path.display())]
    Mismatch {
        /// The template (or its file).
        path: PathBuf,
        /// What does not fit.
        why: String,
    },
}

/// One vCPU, as KVM describes it.
#[derive(Serialize, Deserialize)]
pub struct VcpuSnapshot {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
    /// Every MSR KVM lets the VMM read, with its value.
    msrs: Vec<(u32, u64)>,
    /// The TSC frequency the guest calibrated against.
    tsc_khz: u32,
}

/// The UART's registers (vm-superio's `SerialState`).
#[derive(Clone, Serialize, Deserialize)]
pub struct SerialSnapshot {
    regs: [u8; 9],
    in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialSnapshot {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialSnapshot {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for vm_superio::serial::SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            s.regs;
        vm_superio::serial::SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The VM-wide state.
#[derive(Serialize, Deserialize)]
pub struct VmSnapshot {
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    /// The UART.
    pub serial: SerialSnapshot,
    /// Every vCPU, in id order.
    pub vcpus: Vec<VcpuSnapshot>,
}

/// What a template was built for: a VM restores only from a template whose
/// every field equals its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fit {
    /// vCPUs at boot and in all.
    pub vcpus: (u8, u8),
    /// Boot RAM and hot-pluggable memory, in bytes.
    pub memory: (u64, u64),
    /// The whole kernel command line (device slots included).
    pub cmdline: String,
}

/// `template.json`.
#[derive(Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// The VM it fits.
    pub fit: Fit,
    /// [`checksum`] of the state as JSON.
    pub state_sum: u64,
    /// [`checksum`] of the memory file's non-zero pages.
    pub memory_sum: u64,
    /// Bytes of non-zero memory saved.
    pub memory_bytes: u64,
    /// The state.
    pub state: VmSnapshot,
}

/// A 64-bit checksum of `data`, folded into `sum`: it catches a changed,
/// missing or moved page of a template, not a forger (templates live in a
/// root-only directory the guest never sees).
pub fn checksum(mut sum: u64, offset: u64, data: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    sum = (sum ^ offset).wrapping_mul(K).rotate_left(29);
    let words = data.chunks_exact(8);
    let tail = words.remainder();
    for word in words {
        let word = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        sum = (sum ^ word).wrapping_mul(K).rotate_left(31);
    }
    if !tail.is_empty() {
        let mut word = [0u8; 8];
        word[..tail.len()].copy_from_slice(tail);
        sum = (sum ^ u64::from_le_bytes(word))
            .wrapping_mul(K)
            .rotate_left(31);
    }
    sum
}

/// Saves a stopped vCPU. Any I/O the vCPU last exited for is completed
/// first (an entry with `immediate_exit` set), so the registers are the
/// ones after the instruction.
pub fn save_vcpu(fd: &mut VcpuFd, msr_list: &[u32]) -> Result<VcpuSnapshot, Error> {
    fd.set_kvm_immediate_exit(1);
    match fd.run() {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
        Err(e) => return Err(Error::Kvm("completing the last exit", e)),
        Ok(_) => return Err(Error::Kvm("completing the last exit", einval())),
    }
    fd.set_kvm_immediate_exit(0);
    let k = |what| move |e| Error::Kvm(what, e);
    let mut msrs = Vec::with_capacity(msr_list.len());
    for &index in msr_list {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .expect("one MSR fits a kvm_msrs");
        // Some listed MSRs cannot be read on this CPU: they are not state.
        if fd.get_msrs(&mut one).map_err(k("get MSR"))? == 1 {
            msrs.push((index, one.as_slice()[0].data));
        }
    }
    Ok(VcpuSnapshot {
        mp_state: fd.get_mp_state().map_err(k("get MP state"))?,
        regs: fd.get_regs().map_err(k("get registers"))?,
        sregs: fd.get_sregs().map_err(k("get special registers"))?,
        xsave: fd.get_xsave().map_err(k("get XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(k("get XCRs"))?,
        debugregs: fd.get_debug_regs().map_err(k("get debug registers"))?,
        lapic: fd.get_lapic().map_err(k("get LAPIC"))?,
        events: fd.get_vcpu_events().map_err(k("get vCPU events"))?,
        tsc_khz: fd.get_tsc_khz().map_err(k("get TSC frequency"))?,
        msrs,
    })
}

/// The MSRs to save: all KVM lists.
pub fn msr_list(kvm: &Kvm) -> Result<Vec<u32>, Error> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(|e| Error::Kvm("MSR list", e))?
        .as_slice()
        .to_vec())
}

/// Puts a saved vCPU's state on `fd` (its CPUID already set).
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuSnapshot) -> Result<(), Error> {
    let k = |what| move |e| Error::Kvm(what, e);
    if fd.get_tsc_khz().map_err(k("get TSC frequency"))? != s.tsc_khz {
        fd.set_tsc_khz(s.tsc_khz).map_err(k("set TSC frequency"))?;
    }
    fd.set_mp_state(s.mp_state).map_err(k("set MP state"))?;
    fd.set_regs(&s.regs).map_err(k("set registers"))?;
    fd.set_sregs(&s.sregs).map_err(k("set special registers"))?;
    // SAFETY: the buffer is a whole kvm_xsave (4 KiB), what KVM_SET_XSAVE
    // reads on a host without dynamically enabled XSAVE features (the VMM
    // enables none).
    unsafe { fd.set_xsave(&s.xsave) }.map_err(k("set XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(k("set XCRs"))?;
    fd.set_debug_regs(&s.debugregs)
        .map_err(k("set debug registers"))?;
    fd.set_lapic(&s.lapic).map_err(k("set LAPIC"))?;
    crate::arch::msr::set(fd, &s.msrs)?;
    fd.set_vcpu_events(&s.events)
        .map_err(k("set vCPU events"))?;
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, Error> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(|e| Error::Kvm("get IRQ chip", e))?;
    Ok(chip)
}

/// Saves the VM-wide state (the vCPUs are stopped).
pub fn save_vm(
    vm: &VmFd,
    serial: SerialSnapshot,
    vcpus: Vec<VcpuSnapshot>,
) -> Result<VmSnapshot, Error> {
    Ok(VmSnapshot {
        pit: vm.get_pit2().map_err(|e| Error::Kvm("get PIT", e))?,
        clock: vm.get_clock().map_err(|e| Error::Kvm("get clock", e))?,
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        serial,
        vcpus,
    })
}

/// Puts the VM-wide state back. The guest's clock goes on from where it
/// was saved (its agent sets the wall clock once restored).
pub fn restore_vm(vm: &VmFd, s: &VmSnapshot) -> Result<(), Error> {
    vm.set_pit2(&s.pit).map_err(|e| Error::Kvm("set PIT", e))?;
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock)
        .map_err(|e| Error::Kvm("set clock", e))?;
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(chip)
            .map_err(|e| Error::Kvm("set IRQ chip", e))?;
    }
    Ok(())
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn einval() -> kvm_ioctls::Error {
    kvm_ioctls::Error::new(libc::EINVAL)
}

/// The data ranges of `file` (SEEK_DATA/SEEK_HOLE): what is not a hole.
fn data_ranges(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let mut ranges = Vec::new();
    let mut at = 0i64;
    let len = len as i64;
    while at < len {
        // SAFETY: lseek on an fd the caller owns; no memory is touched.
        let start = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
        if start < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(file.as_raw_fd(), start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let end = end.min(len);
        ranges.push((start as u64, end as u64));
        at = end;
    }
    Ok(ranges)
}

/// Writes the guest memory's non-zero pages to `path` at their offsets (a
/// sparse file as long as the memfd). Returns the bytes written and their
/// checksum.
pub fn save_memory(ram: &GuestRam, path: &Path) -> Result<(u64, u64), Error> {
    let total = ram.file.metadata().map_err(io(path))?.len();
    let out = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    out.set_len(total).map_err(io(path))?;
    let mut buf = vec![0u8; 2 << 20];
    let (mut bytes, mut sum) = (0u64, 0u64);
    for (start, end) in data_ranges(&ram.file, total).map_err(io(path))? {
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            ram.file
                .read_exact_at(&mut buf[..n], at)
                .map_err(io(path))?;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                if page.iter().all(|&b| b == 0) {
                    continue;
                }
                let offset = at + (i * PAGE) as u64;
                out.write_all_at(page, offset).map_err(io(path))?;
                sum = checksum(sum, offset, page);
                bytes += page.len() as u64;
            }
            at += n as u64;
        }
    }
    out.sync_all().map_err(io(path))?;
    Ok((bytes, sum))
}

/// Maps a template's memory file (in `dir`) as a VM's guest memory,
/// private and copy-on-write ([`crate::memory::from_template`]), and checks
/// it against the manifest. Reading it through the mapping also maps the
/// template's pages, shared, before the guest asks for them.
pub fn map_memory(
    mib: u64,
    hotplug_mib: u64,
    dir: &Path,
    manifest: &Manifest,
) -> Result<GuestRam, Error> {
    let path = dir.join(MEMORY);
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io(&path))?;
    let len = file.metadata().map_err(io(&path))?.len();
    let ranges = data_ranges(&file, len).map_err(io(&path))?;
    let ram = crate::memory::from_template(mib, hotplug_mib, file)?;
    let (mut bytes, mut sum) = (0u64, 0u64);
    for (start, end) in ranges {
        for region in ram.memory.iter() {
            let Some(fo) = region.file_offset() else {
                continue;
            };
            let (r_start, r_end) = (fo.start(), fo.start() + region.len());
            let (lo, hi) = (start.max(r_start), end.min(r_end));
            if lo >= hi {
                continue;
            }
            // SAFETY: `lo..hi` lies within this region's part of the file,
            // so the slice lies within the region's live mapping, which
            // `ram` owns; no vCPU runs yet, nothing writes it.
            let data = unsafe {
                std::slice::from_raw_parts(
                    region.as_ptr().add((lo - r_start) as usize),
                    (hi - lo) as usize,
                )
            };
            for (i, page) in data.chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    sum = checksum(sum, lo + (i * PAGE) as u64, page);
                    bytes += page.len() as u64;
                }
            }
        }
    }
    if (bytes, sum) != (manifest.memory_bytes, manifest.memory_sum) {
        return Err(Error::Mismatch {
            path,
            why: format!(
            "memory does not check out ({bytes} bytes, sum {sum:#x}; saved {} bytes, sum {:#x})",
            manifest.memory_bytes, manifest.memory_sum
            ),
        });
    }
    Ok(ram)
}

fn state_sum(state: &VmSnapshot) -> u64 {
    let json = serde_json::to_vec(state).expect("a snapshot serializes");
    checksum(0, 0, &json)
}

/// Writes a template into `dir` (new, empty): memory, then the manifest
/// (whose presence says the template is whole).
pub fn save(dir: &Path, fit: Fit, ram: &GuestRam, state: VmSnapshot) -> Result<u64, Error> {
    let (memory_bytes, memory_sum) = save_memory(ram, &dir.join(MEMORY))?;
    let manifest = Manifest {
        format: FORMAT,
        fit,
        state_sum: state_sum(&state),
        memory_sum,
        memory_bytes,
        state,
    };
    let path = dir.join(MANIFEST);
    let json = serde_json::to_vec(&manifest).expect("a manifest serializes");
    let mut f = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io(&path))?;
    f.write_all(&json).map_err(io(&path))?;
    f.sync_all().map_err(io(&path))?;
    Ok(memory_bytes)
}

/// Reads a template's manifest and checks that it fits `fit`, with a state
/// that checks out. Memory is checked as it is loaded ([`load_memory`]).
pub fn load(dir: &Path, fit: &Fit) -> Result<Manifest, Error> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read(&path).map_err(io(&path))?;
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| Error::Manifest {
        path: path.clone(),
        why: e.to_string(),
    })?;
    let mismatch = |why: String| Error::Mismatch {
        path: dir.to_path_buf(),
        why,
    };
    if manifest.format != FORMAT {
        return Err(mismatch(format!(
            "format {} (this VMM reads {FORMAT})",
            manifest.format
        )));
    }
    if &manifest.fit != fit {
        return Err(mismatch(format!(
            "built for {:?}, this VM is {fit:?}",
            manifest.fit
        )));
    }
    if state_sum(&manifest.state) != manifest.state_sum {
        return Err(mismatch("state does not check out".into()));
    }
    if manifest.state.vcpus.len() != usize::from(fit.vcpus.1) {
        return Err(mismatch("vCPU count".into()));
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn the_checksum_sees_a_changed_or_moved_page() {
        let page = [7u8; PAGE];
        let mut other = page;
        other[100] = 8;
        let a = checksum(0, 0, &page);
        assert_ne!(a, checksum(0, 0, &other));
        assert_ne!(a, checksum(0, PAGE as u64, &page));
        assert_eq!(a, checksum(0, 0, &page));
    }

    #[test]
    fn memory_saved_sparse_loads_back_and_a_changed_byte_is_refused() {
        let dir = std::env::temp_dir().join(format!("sbx-snapmem-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ram = crate::memory::create(64, 128).unwrap();
        ram.memory
            .write_obj(0xfeed_u64, GuestAddress(0x1000))
            .unwrap();
        ram.memory
            .write_obj(0xbeef_u64, GuestAddress(0x300_0000))
            .unwrap();
        let (hot, _) = ram.hotplug.unwrap();
        ram.memory.write_obj(0xcafe_u64, hot).unwrap();
        let path = dir.join(MEMORY);
        let (bytes, sum) = save_memory(&ram, &path).unwrap();
        assert_eq!(bytes, 3 * PAGE as u64, "only the non-zero pages");
        let manifest = |bytes, sum| Manifest {
            format: FORMAT,
            fit: Fit {
                vcpus: (1, 1),
                memory: (64 << 20, 128 << 20),
                cmdline: String::new(),
            },
            state_sum: 0,
            memory_sum: sum,
            memory_bytes: bytes,
            state: VmSnapshot {
                pit: Default::default(),
                clock: Default::default(),
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                serial: vm_superio::serial::SerialState::default().into(),
                vcpus: Vec::new(),
            },
        };
        let fresh = map_memory(64, 128, &dir, &manifest(bytes, sum)).unwrap();
        assert!(!fresh.shared);
        assert_eq!(
            fresh.memory.read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
            0xfeed
        );
        assert_eq!(
            fresh
                .memory
                .read_obj::<u64>(GuestAddress(0x300_0000))
                .unwrap(),
            0xbeef
        );
        assert_eq!(fresh.memory.read_obj::<u64>(hot).unwrap(), 0xcafe);
        // The guest's writes are its own: neither the file nor another VM
        // restored from it sees them.
        fresh
            .memory
            .write_obj(0x1234_u64, GuestAddress(0x1000))
            .unwrap();
        let twin = map_memory(64, 128, &dir, &manifest(bytes, sum)).unwrap();
        assert_eq!(
            twin.memory.read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
            0xfeed
        );
        drop((fresh, twin));
        let mut on_disk = [0u8; 8];
        File::open(&path)
            .unwrap()
            .read_exact_at(&mut on_disk, 0x1000)
            .unwrap();
        assert_eq!(u64::from_le_bytes(on_disk), 0xfeed);
        // One flipped byte on disk: refused.
        let f = File::options().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff], 0x300_0001).unwrap();
        let err = map_memory(64, 128, &dir, &manifest(bytes, sum))
            .err()
            .unwrap();
        assert!(err.to_string().contains("does not check out"), "{err}");
        // A VM of another size: refused.
        let err = map_memory(32, 0, &dir, &manifest(bytes, sum))
            .err()
            .unwrap();
        assert!(err.to_string().contains("memory file of"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
