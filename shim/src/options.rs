//! containerd's runtime options for a shim that is not runc's: the
//! `runtimeoptions.v1.Options` message (`TypeUrl`, `ConfigPath`,
//! `ConfigBody`), which the CRI fills from the runtime's `options` table in
//! containerd's configuration and `ctr run --runtime-config-path` from its
//! flag. sandboxvm reads `ConfigPath`: the configuration file of the pods
//! this runtime handler starts ([`sandboxvm::config`]).

use std::path::PathBuf;

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::empty::Empty;
use containerd_shim::protos::protobuf::{Message, UnknownValueRef};

/// The message's type URL, as containerd registers it.
const TYPE_URL: &str = "runtimeoptions.v1.Options";
/// `config_path`'s field number.
const CONFIG_PATH: u32 = 2;

/// `ConfigPath` of runtime options, if they are `runtimeoptions.v1.Options`
/// and set it; other option types (runc's) carry nothing for sandboxvm.
pub fn config_path(options: &Any) -> Result<Option<PathBuf>, String> {
    // "runtimeoptions.v1.Options", with or without a "host/" prefix.
    if options.type_url.rsplit('/').next() != Some(TYPE_URL) {
        return Ok(None);
    }
    let bad = |why: &str| format!("runtime options {TYPE_URL}: {why}");
    // The message's fields, read by protobuf's own parser as the unknown
    // fields of an empty message (sandboxvm does not compile containerd's
    // .proto for one string).
    let fields = Empty::parse_from_bytes(&options.value).map_err(|e| bad(&e.to_string()))?;
    let path = match fields.special_fields.unknown_fields().get(CONFIG_PATH) {
        None => return Ok(None),
        Some(UnknownValueRef::LengthDelimited(b)) => {
            String::from_utf8(b.to_vec()).map_err(|_| bad("ConfigPath is not UTF-8"))?
        }
        Some(_) => return Err(bad("ConfigPath is not a string")),
    };
    Ok(Some(PathBuf::from(path)).filter(|p| !p.as_os_str().is_empty()))
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
            b"\x10\x01",
        ] {
            assert!(config_path(&any(TYPE_URL, bad)).is_err(), "{bad:?}");
        }
    }
}
