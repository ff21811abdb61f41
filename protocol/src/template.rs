//! What the VMM and the guest agent say to each other around a template:
//! the command-line word that makes a guest a template, the console line
//! the agent prints when it is ready to be saved, and the line the VMM puts
//! on the guest's serial input when a copy of it is restored.

/// On the kernel command line: this guest is a template (its agent waits
/// for a restore before it touches any device).
pub const PARAM: &str = "sandboxvm.template";
/// Printed by the agent on the console when the template may be saved.
pub const READY: &str = "sandboxvm-agent: template ready";
/// Bytes of host randomness a restored guest is reseeded with: 256 bits,
/// what the guest kernel's generator needs to count as seeded (the whole
/// restore line, in base64, fits the UART's 64-byte receive FIFO).
pub const ENTROPY_BYTES: usize = 32;
const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// What a restored guest is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restore {
    /// Fresh randomness from the host, for the guest's random pool.
    pub entropy: [u8; ENTROPY_BYTES],
    /// The host's wall clock, microseconds since the Unix epoch.
    pub time_us: u64,
}

impl Restore {
    /// `R<entropy in base64, unpadded> <time in hex>\n`.
    pub fn line(&self) -> String {
        let mut text = String::with_capacity(64);
        text.push('R');
        for chunk in self.entropy.chunks(3) {
            let mut n = 0u32;
            for (i, b) in chunk.iter().enumerate() {
                n |= u32::from(*b) << (16 - 8 * i);
            }
            for i in 0..=chunk.len() {
                text.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        text.push_str(&format!(" {:x}\n", self.time_us));
        text
    }

    /// Reads [`Restore::line`] back (without its newline).
    pub fn parse(line: &str) -> Option<Restore> {
        let (b64, time) = line.trim_end().strip_prefix('R')?.split_once(' ')?;
        if b64.len() != (ENTROPY_BYTES * 4).div_ceil(3) {
            return None;
        }
        let mut bits = Vec::with_capacity(ENTROPY_BYTES + 2);
        let (mut acc, mut n) = (0u32, 0);
        for c in b64.bytes() {
            acc = acc << 6 | B64.iter().position(|&d| d == c)? as u32;
            n += 6;
            if n >= 8 {
                n -= 8;
                bits.push((acc >> n) as u8);
            }
        }
        let entropy: [u8; ENTROPY_BYTES] = bits.try_into().ok()?;
        let time_us = u64::from_str_radix(time, 16).ok()?;
        Some(Restore { entropy, time_us })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restore_line_reads_back_and_fits_the_uart_fifo() {
        let mut entropy = [0u8; ENTROPY_BYTES];
        for (i, b) in entropy.iter_mut().enumerate() {
            *b = (i * 37 + 255) as u8;
        }
        let r = Restore {
            entropy,
            time_us: u64::MAX,
        };
        let line = r.line();
        assert!(line.len() <= 64, "{} bytes", line.len());
        assert_eq!(Restore::parse(&line), Some(r));
        for bad in [
            "",
            "R",
            "Rzz 1",
            "Rab 1",
            &line.replace(' ', ""),
            &line.replace('R', "R!"),
        ] {
            assert_eq!(Restore::parse(bad), None, "{bad:?}");
        }
    }
}
