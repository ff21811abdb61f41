//! A sync ttrpc client that never polls: ttrpc 0.9's `sync::Client` wakes
//! every 10 ms to poll its socket, 100 wake-ups a second per idle client.
//!
//! Here one reader thread blocks in `read` and hands each response to the
//! caller waiting on its stream id; one writer thread blocks on a queue of
//! frames, so that a caller's deadline holds even while the guest does not
//! read (a caller never blocks in `write` or behind another's). Dropping
//! the last clone shuts the socket down: both threads end, the fd closes.
//! The peer (the guest) is not trusted: a response longer than ttrpc's
//! limit ends the connection, unknown and non-response frames are dropped.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ttrpc::proto::{
    Code, Codec, MessageHeader, MESSAGE_HEADER_LENGTH, MESSAGE_LENGTH_MAX, MESSAGE_TYPE_RESPONSE,
};
use ttrpc::{Error, Request, Response, Result};

/// How [`Client::request`]'s time-out error starts (see [`is_timeout`]).
const TIMEOUT: &str = "timeout: no response within";

/// Whether `e` is [`Client::request`]'s own time-out.
pub fn is_timeout(e: &Error) -> bool {
    matches!(e, Error::Others(m) if m.starts_with(TIMEOUT))
}

/// The callers waiting for a response, by stream id, and why the
/// connection ended once it has.
#[derive(Default)]
struct State {
    waiting: HashMap<u32, mpsc::SyncSender<Result<Vec<u8>>>>,
    closed: Option<String>,
}

type Shared = Arc<Mutex<State>>;

/// A request's stream id and its frame (header and body).
type Frame = (u32, Vec<u8>);

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the clones share; its drop shuts the connection down.
struct Inner {
    stream: Arc<UnixStream>,
    state: Shared,
    /// The next stream id (odd, from 1) and the writer's queue: taken
    /// together so that stream ids reach the wire in order.
    queue: Mutex<(u32, mpsc::Sender<Frame>)>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// A sync ttrpc client on a connected stream; clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Starts the reader and writer threads on `stream`, which the client
    /// owns from now on.
    pub fn new(stream: UnixStream) -> Result<Client> {
        let io = |e: std::io::Error| Error::Socket(e.to_string());
        stream.set_nonblocking(false).map_err(io)?;
        stream.set_read_timeout(None).map_err(io)?;
        stream.set_write_timeout(None).map_err(io)?;
        let stream = Arc::new(stream);
        let state = Shared::default();
        let (tx, rx) = mpsc::channel();
        let (s, st) = (stream.clone(), state.clone());
        std::thread::Builder::new()
            .name("ttrpc-reader".into())
            .spawn(move || read_responses(s, st))
            .map_err(io)?;
        let (s, st) = (stream.clone(), state.clone());
        let spawned = std::thread::Builder::new()
            .name("ttrpc-writer".into())
            .spawn(move || write_requests(s, st, rx));
        if let Err(e) = spawned {
            let _ = stream.shutdown(Shutdown::Both);
            return Err(io(e));
        }
        let queue = Mutex::new((1, tx));
        let inner = Arc::new(Inner {
            stream,
            state,
            queue,
        });
        Ok(Client { inner })
    }

    /// Sends `req` and waits for its response, at most `req.timeout_nano`
    /// (0: no limit). A non-OK status is [`Error::RpcStatus`].
    pub fn request(&self, req: Request) -> Result<Response> {
        let body = req.encode().map_err(|e| Error::Others(e.to_string()))?;
        if body.len() > MESSAGE_LENGTH_MAX {
            return Err(Error::Others(format!(
                "message length {} exceed maximum message size of {MESSAGE_LENGTH_MAX}",
                body.len()
            )));
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let id = {
            let mut queue = self.inner.queue.lock().unwrap_or_else(|e| e.into_inner());
            let mut id = queue.0;
            {
                let mut state = lock(&self.inner.state);
                if let Some(why) = &state.closed {
                    return Err(Error::Socket(why.clone()));
                }
                // After 2^31 requests the ids wrap: a wait may still hold one.
                while state.waiting.contains_key(&id) {
                    id = id.wrapping_add(2);
                }
                state.waiting.insert(id, tx);
            }
            let mut frame: Vec<u8> = MessageHeader::new_request(id, body.len() as u32).into();
            frame.extend_from_slice(&body);
            if queue.1.send((id, frame)).is_err() {
                lock(&self.inner.state).waiting.remove(&id);
                return Err(Error::Socket("the ttrpc connection is closed".into()));
            }
            queue.0 = id.wrapping_add(2);
            id
        };
        let reply = if req.timeout_nano <= 0 {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(Duration::from_nanos(req.timeout_nano as u64))
        };
        let body = match reply {
            Ok(r) => r?,
            Err(RecvTimeoutError::Timeout) => {
                lock(&self.inner.state).waiting.remove(&id);
                let limit = Duration::from_nanos(req.timeout_nano as u64);
                return Err(Error::Others(format!("{TIMEOUT} {limit:?}")));
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(Error::Socket("the ttrpc connection is closed".into()))
            }
        };
        let res = Response::decode(body)
            .map_err(|e| Error::Others(format!("Unpack response error {e}")))?;
        if res.status().code() != Code::OK {
            return Err(Error::RpcStatus(res.status().clone()));
        }
        Ok(res)
    }

    /// The socket, alive while a clone or one of the threads holds it.
    #[cfg(test)]
    fn socket(&self) -> std::sync::Weak<UnixStream> {
        Arc::downgrade(&self.inner.stream)
    }
}

/// The writer thread: writes each queued frame; on an error fails its
/// caller and shuts the socket down (the reader then fails the others).
fn write_requests(stream: Arc<UnixStream>, state: Shared, rx: mpsc::Receiver<Frame>) {
    for (id, frame) in rx {
        if let Err(e) = (&*stream).write_all(&frame) {
            if let Some(tx) = lock(&state).waiting.remove(&id) {
                let _ = tx.try_send(Err(Error::Socket(format!("send request: {e}"))));
            }
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// The reader thread: hands each response to its caller until the
/// connection ends, then fails every caller waiting and every later one.
fn read_responses(stream: Arc<UnixStream>, state: Shared) {
    let why = read_loop(&stream, &state);
    let _ = stream.shutdown(Shutdown::Both);
    let mut state = lock(&state);
    for (_, tx) in state.waiting.drain() {
        let _ = tx.try_send(Err(Error::Socket(why.clone())));
    }
    state.closed = Some(why);
}

/// Reads responses until the connection fails; returns why.
fn read_loop(stream: &UnixStream, state: &Shared) -> String {
    let mut reader = stream;
    let mut logged = false;
    loop {
        let mut header = [0u8; MESSAGE_HEADER_LENGTH];
        if let Err(e) = reader.read_exact(&mut header) {
            return format!("the ttrpc connection ended: {e}");
        }
        let mh = MessageHeader::from(&header);
        let len = mh.length as usize;
        if len > MESSAGE_LENGTH_MAX {
            return format!("the peer sent a {len}-byte message, more than {MESSAGE_LENGTH_MAX}");
        }
        // Grows as bytes arrive: a length alone allocates nothing.
        let mut body = Vec::new();
        match reader.take(len as u64).read_to_end(&mut body) {
            Ok(n) if n == len => {}
            Ok(_) => return "the ttrpc connection ended inside a message".into(),
            Err(e) => return format!("the ttrpc connection failed: {e}"),
        }
        let tx = match mh.type_ {
            MESSAGE_TYPE_RESPONSE => lock(state).waiting.remove(&mh.stream_id),
            _ => None,
        };
        match tx {
            // The caller may have timed out and gone: nothing to do.
            Some(tx) => drop(tx.try_send(Ok(body))),
            None if !logged => {
                log::debug!("ttrpc: dropped a frame {mh:?} no caller waits for (not logged again)");
                logged = true;
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ttrpc::proto::{Status, MESSAGE_TYPE_REQUEST};

    fn req(payload: &[u8], timeout: Duration) -> Request {
        let mut r = Request::new();
        r.set_service("s".into());
        r.set_method("m".into());
        r.payload = payload.to_vec();
        r.timeout_nano = timeout.as_nanos() as i64;
        r
    }

    /// The fake server: the next request's stream id and payload.
    fn next(mut s: &UnixStream) -> (u32, Vec<u8>) {
        let mut h = [0u8; MESSAGE_HEADER_LENGTH];
        s.read_exact(&mut h).unwrap();
        let mh = MessageHeader::from(&h);
        assert_eq!((mh.type_, mh.stream_id % 2), (MESSAGE_TYPE_REQUEST, 1));
        let mut body = vec![0; mh.length as usize];
        s.read_exact(&mut body).unwrap();
        (mh.stream_id, Request::decode(body).unwrap().payload)
    }

    fn send(mut s: &UnixStream, id: u32, type_: u8, payload: &[u8], status: Option<Status>) {
        let mut res = Response::new();
        res.payload = payload.to_vec();
        if let Some(st) = status {
            res.set_status(st);
        }
        let body = res.encode().unwrap();
        let mut mh = MessageHeader::new_response(id, body.len() as u32);
        mh.type_ = type_;
        s.write_all(&Vec::from(mh)).unwrap();
        s.write_all(&body).unwrap();
    }

    fn pair() -> (Client, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Client::new(a).unwrap(), b)
    }

    #[test]
    fn concurrent_requests_answered_out_of_order() {
        let (c, s) = pair();
        let callers: Vec<_> = (0..3u8)
            .map(|i| {
                let c = c.clone();
                std::thread::spawn(move || c.request(req(&[i], Duration::ZERO)).unwrap().payload)
            })
            .collect();
        let mut got: Vec<_> = (0..3).map(|_| next(&s)).collect();
        got.sort();
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [1, 3, 5]);
        // Noise first: an unknown stream id, a request frame.
        send(&s, 99, MESSAGE_TYPE_RESPONSE, b"x", None);
        send(&s, got[0].0, MESSAGE_TYPE_REQUEST, b"x", None);
        for (id, p) in got.iter().rev() {
            send(&s, *id, MESSAGE_TYPE_RESPONSE, p, None);
        }
        for (i, t) in callers.into_iter().enumerate() {
            assert_eq!(t.join().unwrap(), [i as u8]);
        }
    }

    #[test]
    fn timeout_then_the_late_response_is_dropped() {
        let (c, s) = pair();
        let e = c.request(req(b"a", Duration::from_millis(50))).unwrap_err();
        assert!(is_timeout(&e) && e.to_string().contains("timeout"), "{e}");
        let (late, _) = next(&s);
        send(&s, late, MESSAGE_TYPE_RESPONSE, b"late", None);
        let t = std::thread::spawn(move || c.request(req(b"b", Duration::ZERO)));
        let (id, p) = next(&s);
        send(&s, id, MESSAGE_TYPE_RESPONSE, &p, None);
        assert_eq!(t.join().unwrap().unwrap().payload, b"b");
    }

    #[test]
    fn status_error() {
        let (c, s) = pair();
        let t = std::thread::spawn(move || c.request(req(b"a", Duration::ZERO)));
        let (id, _) = next(&s);
        let st = ttrpc::get_status(Code::NOT_FOUND, "no such thing");
        send(&s, id, MESSAGE_TYPE_RESPONSE, b"", Some(st.clone()));
        assert_eq!(t.join().unwrap().unwrap_err(), Error::RpcStatus(st));
    }

    #[test]
    fn eof_fails_waiting_and_later_callers() {
        let (c, s) = pair();
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.request(req(b"a", Duration::ZERO)));
        next(&s);
        drop(s);
        assert!(matches!(t.join().unwrap(), Err(Error::Socket(_))));
        let e = c.request(req(b"b", Duration::ZERO)).unwrap_err();
        assert!(matches!(e, Error::Socket(_)), "{e}");
    }

    #[test]
    fn oversized_response_closes_the_connection() {
        let (c, mut s) = pair();
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.request(req(b"a", Duration::ZERO)));
        let (id, _) = next(&s);
        // The body never comes: had the reader waited for it, so would the caller.
        let mh = MessageHeader::new_response(id, MESSAGE_LENGTH_MAX as u32 + 1);
        s.write_all(&Vec::from(mh)).unwrap();
        let e = t.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        assert_eq!(
            s.read(&mut [0u8; 1]).unwrap(),
            0,
            "the client shut the socket"
        );
    }

    #[test]
    fn dropping_the_last_clone_ends_both_threads() {
        let (c, mut s) = pair();
        let socket = c.socket();
        let c2 = c.clone();
        drop(c);
        assert!(socket.upgrade().is_some());
        drop(c2);
        assert_eq!(s.read(&mut [0u8; 1]).unwrap(), 0);
        // The threads hold the socket until they return.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while socket.upgrade().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "a client thread lives on"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
