//! x86_64 specifics: CPU state at the kernel's entry, CPUID, MSRs, the TSC,
//! MP table.

pub mod cpuid;
pub mod gdt;
pub mod mptable;
pub mod msr;
pub mod regs;
pub mod tsc;
