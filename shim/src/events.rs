//! Task events to containerd, in order, from one thread (a slow containerd
//! never holds up a task call).
//!
//! They go through protocol's ttrpc client ([`Publisher`]), not the
//! library's `RemotePublisher`: that one sits on ttrpc 0.10's sync client,
//! whose receiver thread polls its socket every 10 ms for the shim's whole
//! life. The request is the one `RemotePublisher::publish` sends.

use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageDyn};
use containerd_shim::protos::shim::event::Envelope;
use containerd_shim::protos::shim::events::ForwardRequest;
use containerd_shim::protos::topics;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::Context;
use protocol::client::Client;
use protocol::ttrpc::Request;

/// containerd's events service and the method that takes a shim's events.
const SERVICE: &str = "containerd.services.events.ttrpc.v1.Events";
const METHOD: &str = "Forward";

/// Where events go.
pub trait Publish: Send + 'static {
    /// Publishes `event` on `topic` in `namespace`.
    fn publish(
        &self,
        topic: &str,
        namespace: &str,
        event: Box<dyn MessageDyn>,
    ) -> Result<(), String>;
}

/// containerd's events service on protocol's ttrpc client. As with
/// `RemotePublisher`: one connection, made at start and never remade (once
/// it ends every publish fails at once), and no time-out.
pub struct Publisher {
    client: Client,
}

impl Publisher {
    /// Connects to containerd's ttrpc `address` (`TTRPC_ADDRESS`, a socket
    /// path, maybe `unix://`-prefixed).
    pub fn connect(address: &str) -> Result<Publisher, String> {
        let path = address.strip_prefix("unix://").unwrap_or(address);
        let stream = UnixStream::connect(path).map_err(|e| format!("connect {path}: {e}"))?;
        let client = Client::new(stream).map_err(|e| e.to_string())?;
        Ok(Publisher { client })
    }
}

impl Publish for Publisher {
    fn publish(
        &self,
        topic: &str,
        namespace: &str,
        event: Box<dyn MessageDyn>,
    ) -> Result<(), String> {
        let req = forward_request(topic, namespace, event, SystemTime::now())?;
        self.client.request(req).map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// The library's publisher (what `containerd_shim::Shim::create_task_service`
/// hands over; the shim's bootstrap uses [`Publisher`]).
impl Publish for RemotePublisher {
    fn publish(
        &self,
        topic: &str,
        namespace: &str,
        event: Box<dyn MessageDyn>,
    ) -> Result<(), String> {
        RemotePublisher::publish(self, Context::default(), topic, namespace, event)
            .map_err(|e| e.to_string())
    }
}

/// The ttrpc request `RemotePublisher::publish` sends for `event` at `at`:
/// an `Envelope` in a `ForwardRequest`, the event an `Any` whose type URL
/// is the message's full name (as containerd-shim's `convert_to_any`), no
/// time-out, no metadata.
pub fn forward_request(
    topic: &str,
    namespace: &str,
    event: Box<dyn MessageDyn>,
    at: SystemTime,
) -> Result<Request, String> {
    let envelope = Envelope {
        timestamp: Some(timestamp(at)).into(),
        namespace: namespace.into(),
        topic: topic.into(),
        event: Some(containerd_shim::util::convert_to_any(event).map_err(|e| e.to_string())?)
            .into(),
        ..Default::default()
    };
    let forward = ForwardRequest {
        envelope: Some(envelope).into(),
        ..Default::default()
    };
    let mut req = Request::new();
    req.set_service(SERVICE.into());
    req.set_method(METHOD.into());
    req.payload = forward.write_to_bytes().map_err(|e| e.to_string())?;
    Ok(req)
}

enum Msg {
    Event(&'static str, Box<dyn MessageDyn>),
    Flush(Sender<()>),
}

/// The event queue.
pub struct Events {
    tx: Mutex<Sender<Msg>>,
}

/// A protobuf timestamp.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

impl Events {
    /// Publishes through `publisher` in `namespace`; a failure is logged.
    pub fn new(publisher: impl Publish, namespace: String) -> Events {
        let (tx, rx) = channel::<Msg>();
        std::thread::spawn(move || {
            for msg in rx {
                match msg {
                    Msg::Event(topic, event) => {
                        log::debug!("event {topic}");
                        if let Err(e) = publisher.publish(topic, &namespace, event) {
                            log::warn!("cannot publish {topic}: {e}");
                        }
                    }
                    Msg::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Events { tx: Mutex::new(tx) }
    }

    fn send(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let _ = tx.send(Msg::Event(topic, event));
    }

    /// Waits (up to `timeout`) until what was queued is published.
    pub fn flush(&self, timeout: Duration) {
        let (done, wait) = channel();
        {
            let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
            let _ = tx.send(Msg::Flush(done));
        }
        let _ = wait.recv_timeout(timeout);
    }

    /// /tasks/create.
    pub fn create(&self, cid: &str, bundle: &str, io: TaskIO, pid: u32) {
        let e = TaskCreate {
            container_id: cid.into(),
            bundle: bundle.into(),
            io: Some(io).into(),
            pid,
            ..Default::default()
        };
        self.send(topics::TASK_CREATE_EVENT_TOPIC, Box::new(e));
    }

    /// /tasks/start.
    pub fn start(&self, cid: &str, pid: u32) {
        let e = TaskStart {
            container_id: cid.into(),
            pid,
            ..Default::default()
        };
        self.send(topics::TASK_START_EVENT_TOPIC, Box::new(e));
    }

    /// /tasks/exit; `id` is the container id for its init process.
    pub fn exit(&self, cid: &str, id: &str, pid: u32, status: u32, at: SystemTime) {
        let e = TaskExit {
            container_id: cid.into(),
            id: id.into(),
            pid,
            exit_status: status,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        };
        self.send(topics::TASK_EXIT_EVENT_TOPIC, Box::new(e));
    }

    /// /tasks/oom: the guest's OOM killer killed a process of container
    /// `cid`.
    pub fn oom(&self, cid: &str) {
        let e = TaskOOM {
            container_id: cid.into(),
            ..Default::default()
        };
        self.send(topics::TASK_OOM_EVENT_TOPIC, Box::new(e));
    }

    /// /tasks/delete.
    pub fn delete(&self, cid: &str, pid: u32, status: u32, at: SystemTime) {
        let e = TaskDelete {
            container_id: cid.into(),
            id: cid.into(),
            pid,
            exit_status: status,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        };
        self.send(topics::TASK_DELETE_EVENT_TOPIC, Box::new(e));
    }

    /// /tasks/exec-added.
    pub fn exec_added(&self, cid: &str, exec_id: &str) {
        let e = TaskExecAdded {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.send(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(e));
    }

    /// /tasks/exec-started.
    pub fn exec_started(&self, cid: &str, exec_id: &str, pid: u32) {
        let e = TaskExecStarted {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            pid,
            ..Default::default()
        };
        self.send(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(e));
    }

    /// /tasks/paused.
    pub fn paused(&self, cid: &str) {
        let e = TaskPaused {
            container_id: cid.into(),
            ..Default::default()
        };
        self.send(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(e));
    }

    /// /tasks/resumed.
    pub fn resumed(&self, cid: &str) {
        let e = TaskResumed {
            container_id: cid.into(),
            ..Default::default()
        };
        self.send(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(e));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::sync::mpsc;

    use containerd_shim::protos::protobuf::well_known_types::any::Any;
    use protocol::ttrpc::proto::{
        Codec, MessageHeader, Response, MESSAGE_HEADER_LENGTH, MESSAGE_TYPE_REQUEST,
    };

    use super::*;

    /// The envelope in a Forward request, after checking the rest.
    fn envelope(req: &Request) -> Envelope {
        assert_eq!((req.service(), req.method()), (SERVICE, METHOD));
        assert_eq!((req.timeout_nano, req.metadata.len()), (0, 0));
        let forward = ForwardRequest::parse_from_bytes(&req.payload).unwrap();
        forward.envelope.into_option().unwrap()
    }

    fn event<M: Message>(any: &Any) -> M {
        M::parse_from_bytes(&any.value).unwrap()
    }

    #[test]
    fn forward_request_is_an_envelope_in_a_forward_request() {
        let e = TaskOOM {
            container_id: "c1".into(),
            ..Default::default()
        };
        let at = SystemTime::UNIX_EPOCH + Duration::new(7, 8);
        let req = forward_request("/tasks/oom", "k8s.io", Box::new(e), at).unwrap();
        let env = envelope(&req);
        assert_eq!((env.topic(), env.namespace()), ("/tasks/oom", "k8s.io"));
        assert_eq!((env.timestamp.seconds, env.timestamp.nanos), (7, 8));
        assert_eq!(env.event.type_url, "containerd.events.TaskOOM");
        assert_eq!(event::<TaskOOM>(&env.event).container_id, "c1");
    }

    /// A temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "sandboxvm-shim-events-{}-{name}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A fake containerd events service on `dir`/events.sock: accepts one
    /// connection and answers `n` requests OK (empty payload), sending
    /// each to the channel; then closes the connection.
    fn containerd(dir: &TempDir, n: usize) -> (String, mpsc::Receiver<Request>) {
        let path = dir.0.join("events.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            for _ in 0..n {
                let mut h = [0u8; MESSAGE_HEADER_LENGTH];
                s.read_exact(&mut h).unwrap();
                let mh = MessageHeader::from(&h);
                assert_eq!(mh.type_, MESSAGE_TYPE_REQUEST);
                let mut body = vec![0; mh.length as usize];
                s.read_exact(&mut body).unwrap();
                let req = Request::decode(body).unwrap();
                let res = Response::new().encode().unwrap();
                s.write_all(&Vec::from(MessageHeader::new_response(
                    mh.stream_id,
                    res.len() as u32,
                )))
                .unwrap();
                s.write_all(&res).unwrap();
                let _ = tx.send(req);
            }
        });
        (format!("unix://{}", path.display()), rx)
    }

    #[test]
    fn an_event_reaches_containerd() {
        let dir = TempDir::new("forward");
        let (address, got) = containerd(&dir, 1);
        let events = Events::new(Publisher::connect(&address).unwrap(), "ns1".into());
        events.exit("c1", "e1", 42, 137, SystemTime::UNIX_EPOCH);
        let req = got.recv_timeout(Duration::from_secs(10)).unwrap();
        let env = envelope(&req);
        assert_eq!((env.topic(), env.namespace()), ("/tasks/exit", "ns1"));
        assert_eq!(env.event.type_url, "containerd.events.TaskExit");
        let exit: TaskExit = event(&env.event);
        assert_eq!(
            (
                exit.container_id.as_str(),
                exit.id.as_str(),
                exit.pid,
                exit.exit_status
            ),
            ("c1", "e1", 42, 137)
        );
    }

    /// The request is the library's, byte for byte (at its timestamp).
    #[test]
    fn the_request_is_remote_publishers() {
        let dir = TempDir::new("library");
        let (address, got) = containerd(&dir, 1);
        let e = TaskExit {
            container_id: "c1".into(),
            pid: 3,
            ..Default::default()
        };
        RemotePublisher::new(&address)
            .unwrap()
            .publish(
                Context::default(),
                "/tasks/exit",
                "ns1",
                Box::new(e.clone()),
            )
            .unwrap();
        let theirs = got.recv_timeout(Duration::from_secs(10)).unwrap();
        let ts = envelope(&theirs).timestamp.into_option().unwrap();
        let at = SystemTime::UNIX_EPOCH + Duration::new(ts.seconds as u64, ts.nanos as u32);
        let ours = forward_request("/tasks/exit", "ns1", Box::new(e), at).unwrap();
        assert_eq!(ours.encode().unwrap(), theirs.encode().unwrap());
    }

    #[test]
    fn a_closed_connection_fails_at_once() {
        let dir = TempDir::new("closed");
        let (address, got) = containerd(&dir, 0);
        let publisher = Publisher::connect(&address).unwrap();
        // The server's thread ends (and closes the connection) having
        // answered nothing: its channel then disconnects.
        assert!(got.recv_timeout(Duration::from_secs(10)).is_err());
        let e = publisher.publish("/tasks/oom", "ns1", Box::new(TaskOOM::new()));
        assert!(e.is_err());
        assert!(Publisher::connect(&dir.0.join("none").display().to_string()).is_err());
    }

    /// Voluntary context switches of this process's protocol client
    /// threads, by thread id.
    fn switches() -> HashMap<String, u64> {
        let mut n = HashMap::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
                continue;
            };
            let field = |f: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(f))
                    .map(str::trim)
                    .unwrap_or_default()
                    .to_string()
            };
            if ["ttrpc-reader", "ttrpc-writer"].contains(&field("Name:").as_str()) {
                let count = field("voluntary_ctxt_switches:").parse().unwrap();
                n.insert(task.file_name().to_string_lossy().into_owned(), count);
            }
        }
        n
    }

    /// An idle connection does not wake (ttrpc's sync client wakes 100
    /// times a second): the client's threads, over a second.
    #[test]
    fn an_idle_publisher_does_not_poll() {
        let dir = TempDir::new("idle");
        let (address, got) = containerd(&dir, 2);
        let publisher = Publisher::connect(&address).unwrap();
        publisher
            .publish("/tasks/oom", "ns1", Box::new(TaskOOM::new()))
            .unwrap();
        got.recv().unwrap();
        let before = switches();
        std::thread::sleep(Duration::from_secs(1));
        let woke: u64 = switches()
            .into_iter()
            .map(|(tid, n)| before.get(&tid).map_or(0, |b| n - b))
            .sum();
        // Other tests' clients (alive at both reads) may switch a few times.
        assert!(woke < 10, "{woke} switches in 1 s");
        publisher
            .publish("/tasks/oom", "ns1", Box::new(TaskOOM::new()))
            .unwrap();
    }
}
