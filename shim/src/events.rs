//! Task events to containerd, in order, from one thread (a slow containerd
//! never holds up a task call).

use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::Context;

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
    /// Publishes through `publisher` in `namespace`.
    pub fn new(publisher: RemotePublisher, namespace: String) -> Events {
        let (tx, rx) = channel::<Msg>();
        std::thread::spawn(move || {
            for msg in rx {
                match msg {
                    Msg::Event(topic, event) => {
                        log::debug!("event {topic}");
                        if let Err(e) =
                            publisher.publish(Context::default(), topic, &namespace, event)
                        {
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
