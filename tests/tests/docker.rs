//! End to end: Docker (Debian's `docker.io`: dockerd, containerd's runc
//! shim) with sandboxvm added as a runtime (`dockerd --add-runtime
//! sandboxvm=...`), for an image imported from the busybox bundle's rootfs:
//! `docker run --runtime sandboxvm` with output and exit status, a volume,
//! and a published port reaching a server in the guest through Docker's
//! bridge network (its prestart hook fills the network namespace the
//! runtime made; the VM mirrors it); nothing of sandboxvm is left after.

use e2e::fixtures::{engine_script, host_kernel};

#[test]
fn docker_runs_containers_with_sandboxvm_as_a_runtime() {
    let r = engine_script(
        "docker",
        r#"
# Docker's state on a tmpfs of the CI host's own (its / may be virtiofs).
T=$(mktemp -d /run/sandboxvm-docker.XXXXXX)
mount -t tmpfs tmpfs "$T"
mkdir "$T/vol"; echo from-host >"$T/vol/in"
# Docker's containerd, started here: dockerd gives the one it starts
# itself a fixed time to come up, which a busy CI host can exceed.
containerd --address "$T/ctd.sock" --root "$T/ctd-root" --state "$T/ctd-state" >containerd.log 2>&1 &
ctd=$!
for _ in $(seq 600); do ctr --address "$T/ctd.sock" version >/dev/null 2>&1 && break; sleep 0.2; done
# No iptables in the CI host's kernel: published ports go through
# docker-proxy (userland), the bridge network is Docker's own.
dockerd --containerd "$T/ctd.sock" --data-root "$T/data" --exec-root "$T/exec" \
  --pidfile "$T/dockerd.pid" -H "unix://$T/docker.sock" --storage-driver vfs \
  --iptables=false --ip-masq=false --exec-opt native.cgroupdriver=cgroupfs \
  --add-runtime sandboxvm="$BIN" >dockerd.log 2>&1 &
D="/usr/bin/docker -H unix://$T/docker.sock"
for _ in $(seq 600); do $D version >/dev/null 2>&1 && break; sleep 0.2; done
$D version --format '{{.Server.Version}}' >version
tar -C "$ROOTFS" -c . | $D import - e2e/busybox >/dev/null
R="--runtime sandboxvm"
$D run --rm $R e2e/busybox sh -c 'echo hello from docker; uname -r; exit 3' >run.out 2>run.err
echo $? >run.rc
$D run --rm $R -v "$T/vol:/data" e2e/busybox sh -c 'cat /data/in; echo from-guest >/data/out' >vol.out 2>vol.err
echo $? >vol.rc
cat "$T/vol/out" >vol.host
$D run -d --name web $R -p 127.0.0.1:18080:80 e2e/busybox \
  sh -c 'mkdir /www; echo served-from-the-guest >/www/index.html; exec httpd -f -p 80 -h /www' >web.id 2>web.err
echo $? >web.rc
for _ in $(seq 120); do curl -sf -m 5 http://127.0.0.1:18080/index.html >web.out && break; sleep 0.5; done
$D inspect -f '{{.NetworkSettings.IPAddress}}' web >web.ip
$D exec web sh -c 'uname -r; ip -4 -o addr show eth0' >exec.out 2>exec.err
echo $? >exec.rc
$D rm -f web >/dev/null
kill "$(cat "$T/dockerd.pid")"
for _ in $(seq 100); do [ -e "$T/dockerd.pid" ] || break; sleep 0.2; done
kill $ctd; wait $ctd
sleep 0.5
umount -l "$T"; rmdir "$T"
"#,
    );
    let (log, read, code) = (&r.log, |f: &str| r.read(f), |f: &str| r.code(f));
    assert!(!read("version").trim().is_empty(), "dockerd: {log}");
    // Output and exit status; the guest's kernel, not the host's.
    assert_eq!(code("run.rc"), 3, "{log}\n{}", read("run.err"));
    let run_out = read("run.out");
    let lines: Vec<&str> = run_out.lines().collect();
    assert_eq!(lines.len(), 2, "{run_out}");
    assert_eq!(lines[0], "hello from docker", "{run_out}");
    assert_ne!(lines[1], host_kernel(), "{run_out}");
    // A volume: the host directory, both ways.
    assert_eq!(code("vol.rc"), 0, "{log}\n{}", read("vol.err"));
    assert_eq!(read("vol.out"), "from-host\n");
    assert_eq!(read("vol.host"), "from-guest\n");
    // A published port reaches the server in the guest, at the address
    // Docker gave the container.
    assert_eq!(code("web.rc"), 0, "{log}\n{}", read("web.err"));
    assert_eq!(
        read("web.out"),
        "served-from-the-guest\n",
        "{log}\n{}",
        read("dockerd.log")
    );
    assert_eq!(code("exec.rc"), 0, "{log}\n{}", read("exec.err"));
    let ip = read("web.ip").trim().to_string();
    assert!(!ip.is_empty(), "{log}");
    let exec = read("exec.out");
    assert_ne!(exec.lines().next(), Some(host_kernel().as_str()), "{exec}");
    assert!(exec.contains(&format!("inet {ip}/")), "{exec}");
    r.assert_clean();
}
