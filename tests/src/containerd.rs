//! The harness of the containerd tests (tests/containerd.rs with `ctr`,
//! tests/cri.rs with a CRI client): Debian's containerd with the sandboxvm
//! shim, on a host that boots guests (the nested CI host here).
//!
//! Each test runs one script there: it starts its own containerd (config
//! from resources/containerd-config.toml plus the test's own lines, root,
//! state and socket in a tmpfs, `containerd-shim-sandboxvm-v2` and
//! `sandboxvm` first on PATH), imports OCI images the test built (no
//! registry), runs the test's steps, stops containerd and records what is
//! left: shims, VMMs, virtiofsd, mounts, sandboxvm state, shim sockets. Each
//! step's stdout, stderr and status land in files the test reads. One
//! script runs at a time: each boots VMs inside a nested host on 2 cores.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use crate::{agent_initramfs, guest_kernel, on_kvm_host, repo_root, sandboxvm_bin};

/// The shim's runtime type.
pub const RUNTIME: &str = "io.containerd.sandboxvm.v2";
/// The busybox image's name (its command: `sh`).
pub const IMAGE: &str = "docker.io/library/sbx-busybox:latest";

/// What the tests share, built once per test binary.
pub struct Fixture {
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The agent initramfs.
    pub initrd: PathBuf,
    /// Directory holding `sandboxvm` and `containerd-shim-sandboxvm-v2`.
    pub bin_dir: PathBuf,
    /// The busybox bundle the images are made of.
    pub bundle: PathBuf,
    /// The OCI image layout tarball of [`IMAGE`].
    pub image: PathBuf,
}

/// This test process's scratch directory.
pub fn work_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("sandboxvm-e2e-ctrd-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn last_line(out: &std::process::Output, what: &str) -> PathBuf {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim(),
    )
}

/// Builds workspace packages (other packages' binaries the tests run),
/// release or debug as this test binary is.
pub fn cargo_build(packages: &[&str]) {
    let bin_dir = sandboxvm_bin().parent().unwrap().to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.current_dir(repo_root()).arg("build");
    for p in packages {
        build.args(["-p", p]);
    }
    if bin_dir.ends_with("release") {
        build.arg("--release");
    }
    let out = build.output().expect("run cargo build");
    assert!(
        out.status.success(),
        "cargo build of {packages:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds an OCI image layout tarball (oci-layout, index.json, manifest,
/// config, one gzipped layer; all by digest) of the busybox rootfs in
/// `bundle`, with image config `config` (the part under "config").
const MAKE_IMAGE: &str = r#"
set -euo pipefail
bundle=$1 out=$2 name=$3 image_config=$4
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/layout/blobs/sha256"
tar --numeric-owner -C "$bundle/rootfs" -cf "$work/layer.tar" .
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
gzip -n "$work/layer.tar"
blob() {  # file -> prints "digest size", stores the blob
  local d s
  d=$(sha256sum "$1" | cut -d' ' -f1); s=$(stat -c %s "$1")
  cp "$1" "$work/layout/blobs/sha256/$d"
  echo "$d $s"
}
read -r layer layer_size < <(blob "$work/layer.tar.gz")
cat >"$work/config.json" <<EOF
{"architecture":"amd64","os":"linux","config":$image_config,"rootfs":{"type":"layers","diff_ids":["sha256:$diff_id"]}}
EOF
read -r config config_size < <(blob "$work/config.json")
cat >"$work/manifest.json" <<EOF
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:$config","size":$config_size},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:$layer","size":$layer_size}]}
EOF
read -r manifest manifest_size < <(blob "$work/manifest.json")
cat >"$work/layout/index.json" <<EOF
{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:$manifest","size":$manifest_size,"annotations":{"io.containerd.image.name":"$name","org.opencontainers.image.ref.name":"latest"}}]}
EOF
echo '{"imageLayoutVersion":"1.0.0"}' >"$work/layout/oci-layout"
tar -C "$work/layout" -cf "$out" oci-layout index.json blobs
echo "$out"
"#;

/// The image config of [`IMAGE`]: PATH, `sh`.
pub const SHELL_CONFIG: &str = r#"{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"],"WorkingDir":"/"}"#;

/// Makes the OCI image tarball `out` named `name` of the busybox rootfs
/// in `bundle`, with image config `config` (JSON: Env, Cmd, ...).
pub fn make_image(bundle: &Path, out: &Path, name: &str, config: &str) -> PathBuf {
    let result = Command::new("bash")
        .arg("-c")
        .arg(MAKE_IMAGE)
        .arg("make-image")
        .arg(bundle)
        .arg(out)
        .arg(name)
        .arg(config)
        .output()
        .expect("run bash");
    last_line(&result, "making the OCI image")
}

/// The binaries (built now), guest kernel, initramfs and busybox image.
pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let bin_dir = sandboxvm_bin().parent().unwrap().to_path_buf();
        // The shim is another package's binary: make sure it is current.
        cargo_build(&["containerd-shim-sandboxvm-v2", "sandboxvm"]);
        let kernel = guest_kernel().expect("guest kernel");
        let initrd = agent_initramfs().expect("agent initramfs");
        let work = work_dir();
        let bundle = work.join("busybox");
        let out = Command::new(repo_root().join("resources/make-busybox-bundle"))
            .arg(&bundle)
            .env("SANDBOXVM", sandboxvm_bin())
            .output()
            .expect("run make-busybox-bundle");
        last_line(&out, "make-busybox-bundle");
        let image = make_image(&bundle, &work.join("busybox-oci.tar"), IMAGE, SHELL_CONFIG);
        Fixture {
            kernel,
            initrd,
            bin_dir,
            bundle,
            image,
        }
    })
}

/// The guest kernel's release (what `uname -r` says in a container).
pub fn guest_release() -> String {
    let kernel = std::fs::canonicalize(&fixture().kernel).unwrap();
    std::fs::read_to_string(kernel.with_file_name("release"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// What a test script left: its steps' results, the logs and leftovers.
#[derive(Debug)]
pub struct Ran {
    /// The script's directory (the steps' files).
    pub dir: PathBuf,
    /// What was left after containerd stopped (empty = clean).
    pub leftovers: String,
    /// containerd's log (with the shim's lines), for failure messages.
    pub log: String,
    /// `ctr events` during the test.
    pub events: String,
}

/// One step's result.
#[derive(Debug)]
pub struct Step {
    /// Its stdout.
    pub out: String,
    /// Its stderr.
    pub err: String,
    /// Its exit status (-1: the step did not run).
    pub code: i32,
}

impl Ran {
    /// The result of step `name`.
    pub fn step(&self, name: &str) -> Step {
        let read = |ext: &str| {
            std::fs::read_to_string(self.dir.join(format!("{name}.{ext}"))).unwrap_or_default()
        };
        Step {
            out: read("out"),
            err: read("err"),
            code: read("code").trim().parse().unwrap_or(-1),
        }
    }

    /// The tail of containerd's log, for assertion messages.
    pub fn tail(&self) -> String {
        let lines: Vec<&str> = self.log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Asserts that nothing was left after containerd stopped.
    pub fn assert_clean(&self) {
        assert_eq!(
            self.leftovers,
            "",
            "left behind after containerd stopped; containerd log:\n{}",
            self.tail()
        );
    }
}

/// The script around a test's steps: containerd up, images imported,
/// `body`, containerd down, leftovers recorded.
const SCRIPT: &str = r#"
set -u
W=@WORK@
cd "$W"
export PATH=@BIN@:$PATH SANDBOXVM_KERNEL=@KERNEL@ SANDBOXVM_INITRD=@INITRD@
export SANDBOXVM_BOOT_TIMEOUT=120
@ENV@
# step NAME CMD...: runs CMD, its stdout, stderr and status into NAME.*
step() { local n=$1; shift; "$@" >"$W/$n.out" 2>"$W/$n.err"; echo $? >"$W/$n.code"; }
# What the shim may leave: shims, virtiofsd, VMMs, mounts, state, sockets.
leftovers() {
  pgrep -af containerd-shim-sandboxvm
  pgrep -a virtiofsd
  pgrep -af 'sandboxvm.* boot '
  grep -F -e "$W/ctd/" -e /run/sandboxvm /proc/self/mountinfo
  ls -A /run/sandboxvm/shim 2>/dev/null
  ls -A /run/containerd/s 2>/dev/null
  return 0
}
C="ctr --address $W/ctd/containerd.sock -n @NAMESPACE@"
mkdir -p ctd
mount -t tmpfs -o size=1g ctd-test ctd
# overlayfs is a module of the CI host's kernel: load it from the package
# ci/nested booted, if it is not there; else the native snapshotter.
snapshotter=overlayfs
if ! grep -qw overlay /proc/filesystems && ! modprobe overlay 2>/dev/null; then
  deb=$(ls "${SANDBOXVM_CACHE:-$HOME/.cache/sandboxvm}"/nested/linux-image-"$(uname -r)"_*/kernel.deb 2>/dev/null | head -n1)
  if [ -n "$deb" ]; then
    mkdir -p ctd/mod
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C ctd/mod --wildcards '*/overlay.ko' 2>/dev/null
    ko=$(find ctd/mod -name overlay.ko | head -n1)
    [ -n "$ko" ] && insmod "$ko" 2>/dev/null
  fi
  grep -qw overlay /proc/filesystems || snapshotter=native
fi
echo "$snapshotter" >snapshotter
{
  echo 'version = 2'
  echo "root = \"$W/ctd/root\""
  echo "state = \"$W/ctd/state\""
  echo '[grpc]'
  echo "  address = \"$W/ctd/containerd.sock\""
  echo '[debug]'
  echo '  level = "debug"'
  cat <<CONFIG
@CONFIG@
CONFIG
  echo '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]'
  echo '  runtime_type = "io.containerd.runc.v2"'
  cat @SNIPPET@
} >config.toml
containerd --config config.toml >containerd.log 2>&1 &
ctrd=$!
for _ in $(seq 100); do $C version >/dev/null 2>&1 && break; sleep 0.1; done
$C events >events.log 2>&1 &
events=$!
step import sh -c 'for i in "$@"; do '"$C"' images import "$i" || exit; done' import @IMAGES@
SN="--snapshotter $snapshotter"
R="--runtime @RUNTIME@"
@BODY@
sleep 0.5
kill $events 2>/dev/null
kill -TERM $ctrd; wait $ctrd
sleep 0.5
leftovers >leftovers 2>&1
umount ctd
echo done >finished
"#;

/// A test's script: what it adds to the harness.
pub struct Script<'a> {
    /// The script's directory under [`work_dir`].
    pub name: &'a str,
    /// Shell code run before containerd starts (e.g. exports containerd
    /// and so the shim inherit).
    pub env: &'a str,
    /// TOML lines for containerd's config, before the runtimes (a here
    /// document: `$snapshotter` and `$W` expand).
    pub config: &'a str,
    /// The containerd namespace of `$C` and of the imported images.
    pub namespace: &'a str,
    /// OCI image tarballs to import.
    pub images: &'a [&'a Path],
    /// The steps: shell, with `$C` = ctr for the test's containerd and
    /// namespace, `$R` = the runtime flag, `$SN` = the snapshotter flag,
    /// `$W` the script's directory, `step NAME CMD...` and `leftovers`.
    pub body: &'a str,
}

impl Default for Script<'_> {
    fn default() -> Self {
        Script {
            name: "test",
            env: "",
            config: "",
            namespace: "test",
            images: &[],
            body: "",
        }
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs `s` around a containerd of its own, on a host that boots guests.
pub fn run(s: &Script) -> Ran {
    static SERIAL: Mutex<()> = Mutex::new(());
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let f = fixture();
    let dir = work_dir().join(s.name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let images: Vec<String> = s
        .images
        .iter()
        .map(|i| shell_quote(i.to_str().unwrap()))
        .collect();
    let script = SCRIPT
        .replace("@WORK@", dir.to_str().unwrap())
        .replace("@BIN@", f.bin_dir.to_str().unwrap())
        .replace("@KERNEL@", f.kernel.to_str().unwrap())
        .replace("@INITRD@", f.initrd.to_str().unwrap())
        .replace(
            "@SNIPPET@",
            repo_root()
                .join("resources/containerd-config.toml")
                .to_str()
                .unwrap(),
        )
        .replace("@IMAGES@", &images.join(" "))
        .replace("@NAMESPACE@", s.namespace)
        .replace("@RUNTIME@", RUNTIME)
        .replace("@CONFIG@", s.config)
        .replace("@ENV@", s.env)
        .replace("@BODY@", s.body);
    let path = dir.join("script.sh");
    std::fs::write(&path, script).unwrap();
    let out = on_kvm_host(&["bash", path.to_str().unwrap()])
        .output()
        .expect("run the test script");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    assert!(
        dir.join("finished").exists(),
        "the script did not finish: {}{}\ncontainerd log: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        read("containerd.log")
    );
    let ran = Ran {
        leftovers: read("leftovers"),
        log: read("containerd.log"),
        events: read("events.log"),
        dir,
    };
    let import = ran.step("import");
    assert_eq!(import.code, 0, "ctr images import: {import:?}");
    ran
}
