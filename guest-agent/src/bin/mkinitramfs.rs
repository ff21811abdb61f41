//! `mkinitramfs AGENT OUT`: packs the guest initramfs: `/init` = the agent,
//! the directories it mounts on, and `/dev/console`.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [agent, out] = args.as_slice() else {
        bail!("usage: mkinitramfs AGENT_BINARY OUT.cpio");
    };
    let tmp = format!("{out}.tmp{}", std::process::id());
    let f = File::create(&tmp).with_context(|| format!("create {tmp}"))?;
    let mut w = initramfs::Writer::new(BufWriter::new(f));
    for d in ["dev", "proc", "sys", "run", "tmp"] {
        w.dir(d, if d == "tmp" { 0o1777 } else { 0o755 })?;
    }
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.host_file("init", Path::new(agent))?;
    w.finish()?;
    std::fs::rename(&tmp, out).with_context(|| format!("rename {tmp} to {out}"))?;
    Ok(())
}
