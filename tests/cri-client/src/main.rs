//! `cri-client`: one CRI (Kubernetes Container Runtime Interface, API v1)
//! call per invocation against a CRI socket (containerd's), made as the
//! kubelet makes it. The end-to-end tests drive a pod with it the way the
//! kubelet does for a pod with a `runtimeClassName`: RunPodSandbox with the
//! runtime handler, CreateContainer, StartContainer, ExecSync, ...
//!
//! Output: ids as a line, statuses and lists as one line of JSON, ExecSync
//! as the command's own stdout, stderr and exit status. A failed call is one
//! line on stderr and exit status 125.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerFilter, ContainerMetadata, ContainerState, ContainerStatsRequest,
    ContainerStatusRequest, CreateContainerRequest, ExecSyncRequest, ImageSpec, KeyValue,
    LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, ListContainersRequest, ListImagesRequest,
    ListPodSandboxRequest, Mount, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, PodSandboxState, PodSandboxStatusRequest, PortMapping, Protocol,
    RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopContainerRequest, StopPodSandboxRequest, UInt64Value, UpdateContainerResourcesRequest,
    VersionRequest,
};
use serde_json::{json, Value};
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Parser)]
#[command(about = "One CRI v1 call against a CRI socket, as the kubelet makes it")]
struct Cli {
    /// The CRI socket (containerd's gRPC address).
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    socket: PathBuf,
    /// Deadline of the call, in seconds.
    #[arg(long, default_value_t = 180)]
    deadline: u64,
    #[command(subcommand)]
    call: Call,
}

/// The pod's metadata, as given to RunPodSandbox and again to each
/// CreateContainer (the kubelet passes the pod's config with both).
#[derive(Args, Clone)]
struct Pod {
    /// The pod's name.
    #[arg(long)]
    pod_name: String,
    /// The pod's Kubernetes namespace.
    #[arg(long, default_value = "default")]
    pod_namespace: String,
    /// The pod's uid (default: derived from its name).
    #[arg(long)]
    pod_uid: Option<String>,
    /// Where the runtime writes the containers' logs.
    #[arg(long)]
    log_dir: Option<String>,
    /// One PID namespace for the pod (`shareProcessNamespace: true`);
    /// else one per container, the Kubernetes default.
    #[arg(long)]
    share_pid: bool,
    /// The pod's CPU limit (the sum of its containers', as the kubelet
    /// passes it in PodSandboxConfig.linux.resources).
    #[arg(long)]
    cpus: Option<f64>,
    /// The pod's memory limit in MiB (likewise).
    #[arg(long)]
    memory_mib: Option<i64>,
    /// The pod's cgroup (PodSandboxConfig.linux.cgroup_parent), where the
    /// kubelet accounts the pod.
    #[arg(long)]
    cgroup_parent: Option<String>,
    /// A network namespace of the pod's own, which the CRI plugin's CNI
    /// plugins set up; else the host's (`hostNetwork: true`, no CNI).
    #[arg(long)]
    pod_network: bool,
    /// A TCP port mapping HOST:CONTAINER (a container's `hostPort`, which
    /// the CNI portmap plugin wires). Repeatable.
    #[arg(long = "port", value_parser = parse_port)]
    ports: Vec<(i32, i32)>,
}

fn parse_port(s: &str) -> std::result::Result<(i32, i32), String> {
    let (h, c) = s.split_once(':').ok_or("expected HOST:CONTAINER")?;
    let p = |v: &str| {
        v.parse::<u16>()
            .map(i32::from)
            .map_err(|e| format!("{v:?}: {e}"))
    };
    Ok((p(h)?, p(c)?))
}

#[derive(Subcommand)]
enum Call {
    /// Version: the runtime's name and versions, as JSON.
    Version,
    /// ListImages: the image tags the CRI plugin knows, as JSON.
    Images,
    /// RunPodSandbox (in the host's network namespace unless
    /// --pod-network); prints the pod sandbox id.
    RunPod {
        #[command(flatten)]
        pod: Pod,
        /// The runtime handler (the RuntimeClass's `handler`).
        #[arg(long, default_value = "")]
        handler: String,
    },
    /// PodSandboxStatus, as JSON.
    PodStatus { id: String },
    /// ListPodSandbox, as JSON.
    Pods,
    /// StopPodSandbox.
    StopPod { id: String },
    /// RemovePodSandbox.
    RemovePod { id: String },
    /// CreateContainer in pod sandbox `--pod-id`; prints the container id.
    Create {
        /// The pod sandbox id RunPodSandbox returned.
        #[arg(long)]
        pod_id: String,
        #[command(flatten)]
        pod: Pod,
        /// The container's name.
        #[arg(long)]
        name: String,
        /// The image reference.
        #[arg(long)]
        image: String,
        /// A host path mounted into the container: HOST:CONTAINER[:ro].
        #[arg(long = "mount")]
        mounts: Vec<String>,
        /// An environment variable: NAME=VALUE.
        #[arg(long = "env")]
        envs: Vec<String>,
        /// Give the container a terminal.
        #[arg(long)]
        tty: bool,
        /// The container's own memory limit in MiB.
        #[arg(long)]
        limit_mib: Option<i64>,
        /// The command (the image's entrypoint if none).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// StartContainer.
    Start { id: String },
    /// ExecSync: runs CMD in the container; prints its stdout and stderr
    /// and exits with its status.
    Exec {
        id: String,
        /// ExecSync's own timeout, in seconds (0: none).
        #[arg(long, default_value_t = 60)]
        timeout: i64,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// UpdateContainerResources (what in-place resize and VPA call).
    Update {
        id: String,
        /// The CPU limit, in CPUs.
        #[arg(long)]
        cpus: Option<f64>,
        /// The memory limit in MiB.
        #[arg(long)]
        memory_mib: Option<i64>,
    },
    /// ContainerStatus, as JSON.
    Status { id: String },
    /// ContainerStats (what the kubelet polls), as JSON.
    Stats { id: String },
    /// ListContainers (of one pod with `--pod-id`), as JSON.
    List {
        #[arg(long)]
        pod_id: Option<String>,
    },
    /// StopContainer.
    Stop {
        id: String,
        /// Seconds between SIGTERM and SIGKILL.
        #[arg(long, default_value_t = 10)]
        timeout: i64,
    },
    /// RemoveContainer.
    Remove { id: String },
}

/// What a call prints, or how it fails.
enum Outcome {
    /// A line on stdout; exit status 0.
    Line(String),
    /// Nothing; exit status 0.
    Done,
    /// ExecSync's result.
    Exec {
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        code: i32,
    },
}

type Result<T> = std::result::Result<T, String>;

async fn connect(socket: &Path) -> Result<Channel> {
    let path = socket.to_path_buf();
    // The URI is a placeholder: the connector dials the Unix socket.
    Endpoint::from_static("http://[::]:50051")
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|e| format!("connect to {}: {e}", socket.display()))
}

/// `request` with the call's deadline (tonic's grpc-timeout).
fn req<T>(msg: T, deadline: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(deadline);
    r
}

fn rpc_err(call: &str) -> impl FnOnce(tonic::Status) -> String + '_ {
    move |s| format!("{call}: {:?}: {}", s.code(), s.message())
}

fn pod_config(pod: &Pod) -> PodSandboxConfig {
    let node = NamespaceMode::Node as i32;
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: pod.pod_name.clone(),
            uid: pod
                .pod_uid
                .clone()
                .unwrap_or_else(|| format!("{}-uid", pod.pod_name)),
            namespace: pod.pod_namespace.clone(),
            attempt: 0,
        }),
        // As the kubelet: a hostNetwork pod keeps the node's hostname (runc
        // refuses a hostname without a UTS namespace of the pod's own).
        hostname: if pod.pod_network {
            pod.pod_name.clone()
        } else {
            String::new()
        },
        log_directory: pod.log_dir.clone().unwrap_or_default(),
        port_mappings: pod
            .ports
            .iter()
            .map(|&(host_port, container_port)| PortMapping {
                protocol: Protocol::Tcp as i32,
                container_port,
                host_port,
                host_ip: String::new(),
            })
            .collect(),
        labels: HashMap::from([("io.kubernetes.pod.name".into(), pod.pod_name.clone())]),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                // hostNetwork unless a pod network is asked for; IPC per
                // pod, PID per container unless shared.
                namespace_options: Some(NamespaceOption {
                    network: if pod.pod_network {
                        NamespaceMode::Pod as i32
                    } else {
                        node
                    },
                    pid: if pod.share_pid {
                        NamespaceMode::Pod
                    } else {
                        NamespaceMode::Container
                    } as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            cgroup_parent: pod.cgroup_parent.clone().unwrap_or_default(),
            resources: (pod.cpus.is_some() || pod.memory_mib.is_some()).then(|| {
                LinuxContainerResources {
                    cpu_period: 100_000,
                    cpu_quota: pod.cpus.map_or(0, |c| (c * 100_000.0) as i64),
                    memory_limit_in_bytes: pod.memory_mib.map_or(0, |m| m << 20),
                    ..Default::default()
                }
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn mount(spec: &str) -> Result<Mount> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (host, ctr, ro) = match parts.as_slice() {
        [h, c] => (h, c, false),
        [h, c, "ro"] => (h, c, true),
        _ => return Err(format!("--mount {spec}: want HOST:CONTAINER[:ro]")),
    };
    Ok(Mount {
        host_path: host.to_string(),
        container_path: ctr.to_string(),
        readonly: ro,
        ..Default::default()
    })
}

fn state_name(state: i32) -> &'static str {
    ContainerState::try_from(state).map_or("UNKNOWN_STATE", |s| s.as_str_name())
}

fn pod_state_name(state: i32) -> &'static str {
    PodSandboxState::try_from(state).map_or("UNKNOWN_STATE", |s| s.as_str_name())
}

fn line(v: Value) -> Outcome {
    Outcome::Line(v.to_string())
}

async fn call(cli: Cli) -> Result<Outcome> {
    let channel = connect(&cli.socket).await?;
    let d = Duration::from_secs(cli.deadline);
    let mut rt = RuntimeServiceClient::new(channel.clone());
    Ok(match cli.call {
        Call::Version => {
            let v = rt
                .version(req(VersionRequest::default(), d))
                .await
                .map_err(rpc_err("Version"))?
                .into_inner();
            line(json!({
                "runtime_name": v.runtime_name,
                "runtime_version": v.runtime_version,
                "runtime_api_version": v.runtime_api_version,
            }))
        }
        Call::Images => {
            let mut img = ImageServiceClient::new(channel);
            let images = img
                .list_images(req(ListImagesRequest::default(), d))
                .await
                .map_err(rpc_err("ListImages"))?
                .into_inner()
                .images;
            let tags: Vec<&String> = images.iter().flat_map(|i| &i.repo_tags).collect();
            line(json!(tags))
        }
        Call::RunPod { pod, handler } => {
            let r = RunPodSandboxRequest {
                config: Some(pod_config(&pod)),
                runtime_handler: handler,
            };
            let id = rt
                .run_pod_sandbox(req(r, d))
                .await
                .map_err(rpc_err("RunPodSandbox"))?
                .into_inner()
                .pod_sandbox_id;
            Outcome::Line(id)
        }
        Call::PodStatus { id } => {
            let r = PodSandboxStatusRequest {
                pod_sandbox_id: id,
                verbose: false,
            };
            let s = rt
                .pod_sandbox_status(req(r, d))
                .await
                .map_err(rpc_err("PodSandboxStatus"))?
                .into_inner()
                .status
                .unwrap_or_default();
            let ns = s
                .linux
                .and_then(|l| l.namespaces)
                .and_then(|n| n.options)
                .unwrap_or_default();
            line(json!({
                "id": s.id,
                "name": s.metadata.map(|m| m.name).unwrap_or_default(),
                "state": pod_state_name(s.state),
                "runtime_handler": s.runtime_handler,
                "network": NamespaceMode::try_from(ns.network).map_or("?", |m| m.as_str_name()),
                "ip": s.network.map(|n| n.ip).unwrap_or_default(),
            }))
        }
        Call::Pods => {
            let pods = rt
                .list_pod_sandbox(req(ListPodSandboxRequest::default(), d))
                .await
                .map_err(rpc_err("ListPodSandbox"))?
                .into_inner()
                .items;
            line(json!(pods
                .iter()
                .map(|p| json!({
                    "id": p.id,
                    "name": p.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
                    "state": pod_state_name(p.state),
                    "runtime_handler": p.runtime_handler,
                }))
                .collect::<Vec<_>>()))
        }
        Call::StopPod { id } => {
            let r = StopPodSandboxRequest { pod_sandbox_id: id };
            rt.stop_pod_sandbox(req(r, d))
                .await
                .map_err(rpc_err("StopPodSandbox"))?;
            Outcome::Done
        }
        Call::RemovePod { id } => {
            let r = RemovePodSandboxRequest { pod_sandbox_id: id };
            rt.remove_pod_sandbox(req(r, d))
                .await
                .map_err(rpc_err("RemovePodSandbox"))?;
            Outcome::Done
        }
        Call::Create {
            pod_id,
            pod,
            name,
            image,
            mounts,
            envs,
            tty,
            limit_mib,
            command,
        } => {
            let envs = envs
                .iter()
                .map(|e| {
                    let (k, v) = e.split_once('=').unwrap_or((e, ""));
                    KeyValue {
                        key: k.into(),
                        value: v.into(),
                    }
                })
                .collect();
            let config = ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: name.clone(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image,
                    ..Default::default()
                }),
                command,
                envs,
                mounts: mounts.iter().map(|m| mount(m)).collect::<Result<_>>()?,
                log_path: format!("{name}.log"),
                tty,
                labels: HashMap::from([("io.kubernetes.container.name".into(), name)]),
                linux: Some(LinuxContainerConfig {
                    security_context: Some(LinuxContainerSecurityContext {
                        namespace_options: pod_config(&pod)
                            .linux
                            .and_then(|l| l.security_context)
                            .and_then(|s| s.namespace_options),
                        ..Default::default()
                    }),
                    resources: limit_mib.map(|m| LinuxContainerResources {
                        memory_limit_in_bytes: m << 20,
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            };
            let r = CreateContainerRequest {
                pod_sandbox_id: pod_id,
                config: Some(config),
                sandbox_config: Some(pod_config(&pod)),
            };
            let id = rt
                .create_container(req(r, d))
                .await
                .map_err(rpc_err("CreateContainer"))?
                .into_inner()
                .container_id;
            Outcome::Line(id)
        }
        Call::Start { id } => {
            let r = StartContainerRequest { container_id: id };
            rt.start_container(req(r, d))
                .await
                .map_err(rpc_err("StartContainer"))?;
            Outcome::Done
        }
        Call::Exec { id, timeout, cmd } => {
            let r = ExecSyncRequest {
                container_id: id,
                cmd,
                timeout,
            };
            let r = rt
                .exec_sync(req(r, d))
                .await
                .map_err(rpc_err("ExecSync"))?
                .into_inner();
            Outcome::Exec {
                stdout: r.stdout,
                stderr: r.stderr,
                code: r.exit_code,
            }
        }
        Call::Status { id } => {
            let r = ContainerStatusRequest {
                container_id: id,
                verbose: false,
            };
            let s = rt
                .container_status(req(r, d))
                .await
                .map_err(rpc_err("ContainerStatus"))?
                .into_inner()
                .status
                .unwrap_or_default();
            line(json!({
                "id": s.id,
                "name": s.metadata.map(|m| m.name).unwrap_or_default(),
                "state": state_name(s.state),
                "exit_code": s.exit_code,
                "reason": s.reason,
                "message": s.message,
                "started": s.started_at != 0,
                "finished": s.finished_at != 0,
                "image": s.image.map(|i| i.image).unwrap_or_default(),
                "log_path": s.log_path,
            }))
        }
        Call::Update {
            id,
            cpus,
            memory_mib,
        } => {
            let r = UpdateContainerResourcesRequest {
                container_id: id,
                linux: Some(LinuxContainerResources {
                    cpu_period: 100_000,
                    cpu_quota: cpus.map_or(0, |c| (c * 100_000.0) as i64),
                    memory_limit_in_bytes: memory_mib.map_or(0, |m| m << 20),
                    ..Default::default()
                }),
                ..Default::default()
            };
            rt.update_container_resources(req(r, d))
                .await
                .map_err(rpc_err("UpdateContainerResources"))?;
            Outcome::Done
        }
        Call::Stats { id } => {
            let r = ContainerStatsRequest { container_id: id };
            let s = rt
                .container_stats(req(r, d))
                .await
                .map_err(rpc_err("ContainerStats"))?
                .into_inner()
                .stats
                .unwrap_or_default();
            let v = |x: Option<UInt64Value>| x.map(|x| x.value);
            let (cpu, mem) = (s.cpu.unwrap_or_default(), s.memory.unwrap_or_default());
            line(json!({
                "id": s.attributes.map(|a| a.id).unwrap_or_default(),
                "cpu_usage_core_nano_seconds": v(cpu.usage_core_nano_seconds),
                "memory_usage_bytes": v(mem.usage_bytes),
                "memory_working_set_bytes": v(mem.working_set_bytes),
            }))
        }
        Call::List { pod_id } => {
            let r = ListContainersRequest {
                filter: pod_id.map(|p| ContainerFilter {
                    pod_sandbox_id: p,
                    ..Default::default()
                }),
            };
            let list = rt
                .list_containers(req(r, d))
                .await
                .map_err(rpc_err("ListContainers"))?
                .into_inner()
                .containers;
            line(json!(list
                .iter()
                .map(|c| json!({
                    "id": c.id,
                    "pod_sandbox_id": c.pod_sandbox_id,
                    "name": c.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
                    "state": state_name(c.state),
                }))
                .collect::<Vec<_>>()))
        }
        Call::Stop { id, timeout } => {
            let r = StopContainerRequest {
                container_id: id,
                timeout,
            };
            rt.stop_container(req(r, d))
                .await
                .map_err(rpc_err("StopContainer"))?;
            Outcome::Done
        }
        Call::Remove { id } => {
            let r = RemoveContainerRequest { container_id: id };
            rt.remove_container(req(r, d))
                .await
                .map_err(rpc_err("RemoveContainer"))?;
            Outcome::Done
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cri-client: tokio runtime: {e}");
            return ExitCode::from(125);
        }
    };
    match runtime.block_on(call(cli)) {
        Ok(Outcome::Line(l)) => {
            println!("{l}");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Exec {
            stdout,
            stderr,
            code,
        }) => {
            use std::io::Write;
            let _ = std::io::stdout().write_all(&stdout);
            let _ = std::io::stderr().write_all(&stderr);
            // A status beyond 255 (a runtime's own code) still fails.
            ExitCode::from(u8::try_from(code).unwrap_or(255))
        }
        Err(e) => {
            eprintln!("cri-client: {e}");
            ExitCode::from(125)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn mounts_parse() {
        let m = mount("/h:/c:ro").unwrap();
        assert_eq!(
            (m.host_path.as_str(), m.container_path.as_str()),
            ("/h", "/c")
        );
        assert!(m.readonly);
        assert!(!mount("/h:/c").unwrap().readonly);
        assert!(mount("/h").is_err());
    }
}
