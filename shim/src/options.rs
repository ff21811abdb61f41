//! containerd's runtime options for a shim that is not runc's: the
//! `runtimeoptions.v1.Options` message (`TypeUrl`, `ConfigPath`,
//! `ConfigBody`), which the CRI fills from the runtime's `options` table in
//! containerd's configuration and `ctr run --runtime-config-path` from its
//! flag. sandboxvm reads `ConfigPath`: the configuration file of the pods
//! this runtime handler starts ([`sandboxvm::config`]).

use std::path::PathBuf;

use containerd_shim::protos::protobuf::well_known_types::any::Any;

/// The message's type URL, as containerd registers it.
const TYPE_URL: &str = "runtimeoptions.v1.Options";
/// `config_path`'s field number.
const CONFIG_PATH: u64 = 2;

/// `ConfigPath` of runtime options, if they are `runtimeoptions.v1.Options`
/// and set it; other option types (runc's) carry nothing for sandboxvm.
pub fn config_path(options: &Any) -> Result<Option<PathBuf>, String> {
    // "runtimeoptions.v1.Options", with or without a "host/" prefix.
    if options.type_url.rsplit('/').next() != Some(TYPE_URL) {
        return Ok(None);
    }
    let path = string_field(&options.value, CONFIG_PATH)
        .map_err(|why| format!("runtime options {TYPE_URL}: {why}"))?;
    Ok(path.filter(|p| !p.is_empty()).map(PathBuf::from))
}

/// The last value of string field `field` in protobuf wire format.
fn string_field(mut b: &[u8], field: u64) -> Result<Option<String>, &'static str> {
    let mut found = None;
    while !b.is_empty() {
        let tag = varint(&mut b)?;
        let len = match tag & 7 {
            0 => {
                varint(&mut b)?;
                0
            }
            1 => 8,
            2 => usize::try_from(varint(&mut b)?).map_err(|_| "length too large")?,
            5 => 4,
            _ => return Err("unknown wire type"),
        };
        if len > b.len() {
            return Err("truncated");
        }
        let (value, rest) = b.split_at(len);
        if tag >> 3 == field && tag & 7 == 2 {
            found = Some(String::from_utf8(value.to_vec()).map_err(|_| "ConfigPath is not UTF-8")?);
        }
        b = rest;
    }
    Ok(found)
}

fn varint(b: &mut &[u8]) -> Result<u64, &'static str> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first().ok_or("truncated")?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint too long")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(type_url: &str, value: &[u8]) -> Any {
        let mut a = Any::new();
        a.type_url = type_url.into();
        a.value = value.to_vec();
        a
    }

    // TypeUrl "x" (field 1), ConfigPath "/etc/s.toml" (field 2), ConfigBody "" (3).
    const MSG: &[u8] = b"\x0a\x01x\x12\x0b/etc/s.toml\x1a\x00";

    #[test]
    fn config_path_is_read_from_runtimeoptions() {
        for url in [TYPE_URL, "type.googleapis.com/runtimeoptions.v1.Options"] {
            assert_eq!(
                config_path(&any(url, MSG)).unwrap(),
                Some(PathBuf::from("/etc/s.toml"))
            );
        }
        // Empty or absent: none.
        assert_eq!(config_path(&any(TYPE_URL, b"\x12\x00")).unwrap(), None);
        assert_eq!(config_path(&any(TYPE_URL, b"")).unwrap(), None);
        assert_eq!(config_path(&Any::new()).unwrap(), None);
        // runc's options are not ours.
        assert_eq!(
            config_path(&any("containerd.runc.v1.Options", b"\x12\x03abc")).unwrap(),
            None
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b"\x12\x0b/etc"[..],
            b"\x12",
            b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
            b"\x0f",
            b"\x12\x02\xff\xfe",
        ] {
            assert!(config_path(&any(TYPE_URL, bad)).is_err(), "{bad:?}");
        }
    }
}
