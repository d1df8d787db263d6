//! gRPC framing of the xDS streams, holding no buffer while a stream is idle.
//!
//! tonic's streaming codec keeps, for a stream's whole life, an encode buffer as large as the
//! largest response it sent and a decode buffer as large as the largest request it read. For a
//! client holding 1,000 clusters that is a ~100 KB CDS response and ~25 KB ACKs naming every
//! cluster, per stream, forever: most of what 1,000 streams cost (docs/performance.md). Here:
//!
//! * a response is a [`Push`]: its few scalar fields plus the shared, already encoded resources
//!   of the [`XdsSnapshot`](crate::XdsSnapshot) (`Arc`s, never copied per stream until written);
//!   [`ResponseBody`] cuts it into chunks of at most [`CHUNK_BYTES`], each made only when hyper
//!   asks for the next one — hyper asks when the HTTP/2 stream has send capacity, so a stream
//!   holds one chunk in flight at most, whatever the response's size;
//! * a request is read by [`Requests`] into a buffer that is let go as soon as the request is
//!   decoded.
//!
//! The wire format is gRPC's (a 5-byte prefix: compressed flag, big-endian length) around the
//! protobuf encoding of `DiscoveryRequest`/`DiscoveryResponse`; tonic still gives the status
//! codes and their headers, prost the messages. Compressed requests are refused (svcd never
//! announces an encoding, so conforming clients do not send one).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use hyper::body::{Body, Bytes, Frame};
use prost::bytes::{Buf, BufMut, BytesMut};
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;

use crate::resources::Resource;

/// The largest chunk of a response handed to HTTP/2 at once (its default frame size).
pub const CHUNK_BYTES: usize = 16 * 1024;

/// The gRPC message prefix: compressed flag and length.
const PREFIX: usize = 5;

/// One `DiscoveryResponse`, as pointers to the resources it carries.
#[derive(Debug, Clone)]
pub struct Push {
    pub version_info: String,
    pub type_url: &'static str,
    pub nonce: String,
    pub resources: Vec<Arc<Resource>>,
}

impl Push {
    /// The fields other than `resources`, encoded (protobuf allows fields in any order, and a
    /// repeated field's elements to follow them).
    fn head(&self) -> Vec<u8> {
        DiscoveryResponse {
            version_info: self.version_info.clone(),
            type_url: self.type_url.to_string(),
            nonce: self.nonce.clone(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// The whole message, encoded, without the gRPC prefix.
    #[cfg(test)]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.head();
        for r in &self.resources {
            out.extend_from_slice(&r.framed);
        }
        out
    }

    /// The message as a client decodes it.
    #[cfg(test)]
    pub fn to_response(&self) -> DiscoveryResponse {
        DiscoveryResponse::decode(&self.encode()[..]).expect("a push encodes a DiscoveryResponse")
    }
}

/// What a stream's task queues for its response body. Boxed: the queue's block holds 32 slots
/// however short the queue, so a slot is a pointer.
pub type Output = Box<Push>;

/// The status a stream ends with, left by its task before it ends. Not queued: a client that
/// stopped reading has the queue full, and its refusal must not become an OK.
pub type Ending = Arc<std::sync::Mutex<Option<Status>>>;

/// A [`Push`] being written out.
struct Writing {
    push: Box<Push>,
    /// The head and the gRPC prefix, until the first chunk is made.
    head: Option<Vec<u8>>,
    /// The next resource to write.
    next: usize,
    /// Bytes still to write (the prefix included).
    left: usize,
}

impl Writing {
    fn new(push: Box<Push>) -> Writing {
        let head = push.head();
        let message = head.len() + push.resources.iter().map(|r| r.framed.len()).sum::<usize>();
        let mut prefixed = Vec::with_capacity(PREFIX + head.len());
        prefixed.push(0);
        // A message over 4 GiB cannot be framed; a registry that large is far past any limit.
        prefixed.extend_from_slice(&u32::try_from(message).unwrap_or(u32::MAX).to_be_bytes());
        prefixed.extend_from_slice(&head);
        Writing {
            push,
            head: Some(prefixed),
            next: 0,
            left: PREFIX + message,
        }
    }

    /// The next chunk, `None` once everything is written. A resource larger than a chunk goes
    /// out as its own (shared, not copied); smaller ones are copied together.
    fn next_chunk(&mut self) -> Option<Bytes> {
        let resources = &self.push.resources;
        if self.head.is_none() {
            let big = resources.get(self.next)?;
            if big.framed.len() >= CHUNK_BYTES {
                self.next += 1;
                self.left -= big.framed.len();
                return Some(big.framed.clone());
            }
        }
        let mut chunk = BytesMut::with_capacity(self.left.min(CHUNK_BYTES));
        if let Some(head) = self.head.take() {
            chunk.put_slice(&head);
        }
        while let Some(r) = resources.get(self.next) {
            if chunk.len() + r.framed.len() > CHUNK_BYTES {
                break;
            }
            chunk.put_slice(&r.framed);
            self.next += 1;
        }
        self.left -= chunk.len();
        Some(chunk.freeze())
    }
}

/// A stream's response body: the pushes its task queues, then the trailers with the stream's
/// status (OK when the task ended it without an error).
pub struct ResponseBody {
    queue: Option<mpsc::Receiver<Output>>,
    ending: Ending,
    writing: Option<Writing>,
    ended: bool,
}

impl ResponseBody {
    pub fn new(queue: mpsc::Receiver<Output>, ending: Ending) -> ResponseBody {
        ResponseBody {
            queue: Some(queue),
            ending,
            writing: None,
            ended: false,
        }
    }
}

/// An empty body: the response is headers only (tonic's "trailers-only" errors).
impl Default for ResponseBody {
    fn default() -> Self {
        ResponseBody {
            queue: None,
            ending: Ending::default(),
            writing: None,
            ended: true,
        }
    }
}

fn trailers(status: &Status) -> Frame<Bytes> {
    let mut map = hyper::HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        // Only a message that cannot be a header value fails; the code alone still goes out.
        let _ = Status::new(status.code(), "").add_header(&mut map);
    }
    Frame::trailers(map)
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            if let Some(writing) = &mut this.writing {
                if let Some(chunk) = writing.next_chunk() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                this.writing = None;
            }
            if this.ended {
                return Poll::Ready(None);
            }
            let Some(queue) = &mut this.queue else {
                this.ended = true;
                return Poll::Ready(None);
            };
            match ready!(queue.poll_recv(cx)) {
                Some(push) => this.writing = Some(Writing::new(push)),
                None => {
                    this.ended = true;
                    let status = this.ending.lock().unwrap_or_else(|e| e.into_inner()).take();
                    let status = status.unwrap_or_else(|| Status::ok(""));
                    return Poll::Ready(Some(Ok(trailers(&status))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.writing.is_none()
    }
}

/// Why no request could be read.
#[derive(Debug)]
pub enum ReadError {
    /// The client's side broke (reset, connection lost): nothing to answer.
    Broken(String),
    /// The client sent what is not a request svcd takes: the stream ends with `status`, counted
    /// under `reason` (`svcd_xds_requests_rejected_total`).
    Refused {
        reason: &'static str,
        status: Status,
    },
}

fn refused(reason: &'static str, status: Status) -> ReadError {
    ReadError::Refused { reason, status }
}

/// What requests may hold before they are complete, across all streams: a client declaring a
/// 16 MiB request and sending it slowly holds that much, so many of them are bounded together.
pub struct RequestBudget {
    limit: usize,
    held: std::sync::atomic::AtomicUsize,
}

impl RequestBudget {
    pub fn new(limit: usize) -> Arc<RequestBudget> {
        Arc::new(RequestBudget {
            limit,
            held: Default::default(),
        })
    }

    fn take(&self, n: usize) -> bool {
        use std::sync::atomic::Ordering;
        if self.held.fetch_add(n, Ordering::AcqRel) + n > self.limit {
            self.held.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn give(&self, n: usize) {
        self.held.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Limits on what one stream's requests may be.
#[derive(Clone, Copy)]
pub struct RequestLimits {
    /// Bytes of one request.
    pub max_bytes: usize,
    /// Names in one request (`xds.max_names`), counted before the request is decoded.
    pub max_names: usize,
}

/// A stream's requests, decoded one at a time.
pub struct Requests<B> {
    body: B,
    /// The bytes of requests not complete yet; no allocation between requests. Counted in
    /// `budget` while held.
    partial: BytesMut,
    limits: RequestLimits,
    budget: Arc<RequestBudget>,
    ended: bool,
}

impl<B> Drop for Requests<B> {
    fn drop(&mut self) {
        self.budget.give(self.partial.len());
    }
}

/// How many `resource_names` (field 3) an encoded `DiscoveryRequest` carries, read without
/// decoding it (a request of 16 MiB of one-byte names would decode to ~20 times that).
fn count_names(mut message: &[u8]) -> Result<usize, prost::DecodeError> {
    use prost::encoding::{decode_key, skip_field, DecodeContext, WireType};
    let mut names = 0;
    while !message.is_empty() {
        let (tag, wire_type) = decode_key(&mut message)?;
        if tag == 3 && wire_type == WireType::LengthDelimited {
            names += 1;
        }
        skip_field(wire_type, tag, &mut message, DecodeContext::default())?;
    }
    Ok(names)
}

impl<B> Requests<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    /// Reads `body`, refusing requests past `limits` or past what `budget` has left.
    pub fn new(body: B, limits: RequestLimits, budget: Arc<RequestBudget>) -> Requests<B> {
        Requests {
            body,
            partial: BytesMut::new(),
            limits,
            budget,
            ended: false,
        }
    }

    /// The next request; `None` when the client ended its side cleanly. Cancel-safe: what was
    /// read stays buffered for the next call.
    pub async fn message(&mut self) -> Result<Option<DiscoveryRequest>, ReadError> {
        loop {
            if let Some(request) = self.take()? {
                return Ok(Some(request));
            }
            if self.ended {
                return match self.partial.is_empty() {
                    true => Ok(None),
                    false => Err(refused(
                        "malformed",
                        Status::invalid_argument("the request stream ended inside a message"),
                    )),
                };
            }
            let frame = std::future::poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)).await;
            match frame {
                None => self.ended = true,
                Some(Err(e)) => return Err(ReadError::Broken(e.to_string())),
                Some(Ok(frame)) => {
                    // Trailers carry nothing for a request stream.
                    if let Ok(data) = frame.into_data() {
                        if !self.budget.take(data.len()) {
                            return Err(refused(
                                "too_large",
                                Status::resource_exhausted(
                                    "xDS requests being read hold all the memory svcd gives them",
                                ),
                            ));
                        }
                        self.partial.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// A complete request out of `partial`, if there is one.
    fn take(&mut self) -> Result<Option<DiscoveryRequest>, ReadError> {
        let Some(prefix) = self.partial.get(..PREFIX) else {
            return Ok(None);
        };
        if prefix[0] != 0 {
            return Err(refused(
                "compressed",
                Status::unimplemented(
                    "compressed requests are not accepted (svcd announces no grpc-encoding)",
                ),
            ));
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > self.limits.max_bytes {
            return Err(refused(
                "too_large",
                Status::resource_exhausted(format!(
                    "a request of {len} bytes; the limit is {}",
                    self.limits.max_bytes
                )),
            ));
        }
        let Some(message) = self.partial.get(PREFIX..PREFIX + len) else {
            return Ok(None);
        };
        let names = count_names(message);
        let decoded = match names {
            Ok(n) if n > self.limits.max_names => {
                return Err(refused(
                    "too_many_names",
                    Status::invalid_argument(format!(
                        "{n} resource names in one request; the limit is {} (xds.max_names)",
                        self.limits.max_names
                    )),
                ))
            }
            Ok(_) => DiscoveryRequest::decode(message),
            Err(e) => Err(e),
        };
        self.partial.advance(PREFIX + len);
        self.budget.give(PREFIX + len);
        if self.partial.is_empty() {
            // Let the buffer go: an idle stream holds none.
            self.partial = BytesMut::new();
        }
        decoded.map(Some).map_err(|e| {
            refused(
                "malformed",
                Status::invalid_argument(format!("malformed DiscoveryRequest: {e}")),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::Any;
    use http_body_util::{BodyExt, StreamBody};

    fn resource(name: &str, size: usize) -> Arc<Resource> {
        Arc::new(Resource::from_any(
            name.into(),
            Any {
                type_url: "type.googleapis.com/x".into(),
                value: vec![7; size],
            },
        ))
    }

    /// Splits a body's data into gRPC messages.
    fn messages(mut data: &[u8]) -> Vec<DiscoveryResponse> {
        let mut out = Vec::new();
        while !data.is_empty() {
            assert_eq!(data[0], 0, "uncompressed");
            let len = u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize;
            out.push(DiscoveryResponse::decode(&data[5..5 + len]).unwrap());
            data = &data[5 + len..];
        }
        out
    }

    #[tokio::test]
    async fn pushes_are_written_in_bounded_chunks_that_decode_to_the_messages() {
        let small: Vec<_> = (0..300).map(|i| resource(&format!("c{i}"), 150)).collect();
        let mut mixed = small.clone();
        mixed.insert(10, resource("big", 3 * CHUNK_BYTES));
        let pushes = [
            Push {
                version_info: "7".into(),
                type_url: "t",
                nonce: "1".into(),
                resources: small,
            },
            Push {
                version_info: "8".into(),
                type_url: "t",
                nonce: "2".into(),
                resources: mixed,
            },
            Push {
                version_info: "9".into(),
                type_url: "t",
                nonce: "3".into(),
                resources: Vec::new(),
            },
        ];
        let (tx, rx) = mpsc::channel(4);
        for p in &pushes {
            tx.send(Box::new(p.clone())).await.unwrap();
        }
        // The queue is full: the refusal still ends the stream, after what was queued.
        let ending = Ending::default();
        *ending.lock().unwrap() = Some(Status::invalid_argument("bye"));
        drop(tx);
        let mut body = ResponseBody::new(rx, ending);
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(chunk) => {
                    // Only a resource larger than a chunk makes a larger one.
                    assert!(chunk.len() <= 3 * CHUNK_BYTES + 64, "{}", chunk.len());
                    assert!(chunk.len() <= CHUNK_BYTES || chunk.len() > 3 * CHUNK_BYTES);
                    data.extend_from_slice(&chunk);
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        assert!(body.is_end_stream());
        let got = messages(&data);
        let want: Vec<_> = pushes.iter().map(Push::to_response).collect();
        assert_eq!(got, want);
        assert_eq!(got[1].resources.len(), 301);
        assert_eq!(got[1].resources[10].value.len(), 3 * CHUNK_BYTES);
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers["grpc-status"], "3");
        assert_eq!(trailers["grpc-message"], "bye");
    }

    #[tokio::test]
    async fn a_queue_that_closes_ends_with_status_ok() {
        let (tx, rx) = mpsc::channel(1);
        drop(tx);
        let mut body = ResponseBody::new(rx, Ending::default());
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_trailers().unwrap()["grpc-status"], "0");
        assert!(body.frame().await.is_none());
        assert!(ResponseBody::default().is_end_stream());
    }

    fn framed(request: &DiscoveryRequest) -> Vec<u8> {
        let encoded = request.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        out.extend_from_slice(&encoded);
        out
    }

    fn body_of(
        chunks: Vec<Vec<u8>>,
    ) -> impl Body<Data = Bytes, Error = Infallible> + Unpin + 'static {
        StreamBody::new(futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, Infallible>(Frame::data(Bytes::from(c)))),
        ))
    }

    #[tokio::test]
    async fn requests_split_and_joined_across_frames_decode_and_free_their_buffer() {
        let a = DiscoveryRequest {
            version_info: "1".into(),
            resource_names: (0..2000).map(|i| format!("svc{i}.default:http")).collect(),
            ..Default::default()
        };
        let b = DiscoveryRequest {
            response_nonce: "5".into(),
            ..Default::default()
        };
        let mut bytes = framed(&a);
        bytes.extend(framed(&b));
        bytes.extend(framed(&b));
        // Frames of 7 bytes, then of 10,000: messages cut anywhere, and two in one frame.
        let mut chunks: Vec<Vec<u8>> = bytes[..70].chunks(7).map(<[u8]>::to_vec).collect();
        chunks.extend(bytes[70..].chunks(10_000).map(<[u8]>::to_vec));
        let limits = RequestLimits {
            max_bytes: 1 << 20,
            max_names: 10_000,
        };
        let budget = RequestBudget::new(1 << 20);
        let mut requests = Requests::new(body_of(chunks), limits, budget.clone());
        assert_eq!(requests.message().await.unwrap(), Some(a));
        assert_eq!(requests.message().await.unwrap(), Some(b.clone()));
        assert_eq!(requests.message().await.unwrap(), Some(b));
        assert_eq!(
            requests.partial.capacity(),
            0,
            "nothing held between requests"
        );
        assert_eq!(requests.message().await.unwrap(), None);
    }

    #[tokio::test]
    async fn oversized_compressed_truncated_and_garbage_requests_are_refused() {
        let request = framed(&DiscoveryRequest {
            response_nonce: "1".into(),
            ..Default::default()
        });
        let mut big = vec![0];
        big.extend_from_slice(&(2_000u32).to_be_bytes());
        let mut compressed = request.clone();
        compressed[0] = 1;
        let garbage = vec![0, 0, 0, 0, 3, 0xff, 0xff, 0xff];
        let cases = [
            (big, "too_large", tonic::Code::ResourceExhausted),
            (compressed, "compressed", tonic::Code::Unimplemented),
            (
                request[..request.len() - 1].to_vec(),
                "malformed",
                tonic::Code::InvalidArgument,
            ),
            (garbage, "malformed", tonic::Code::InvalidArgument),
            (
                framed(&DiscoveryRequest {
                    resource_names: vec![String::new(); 4],
                    ..Default::default()
                }),
                "too_many_names",
                tonic::Code::InvalidArgument,
            ),
        ];
        for (bytes, want_reason, code) in cases {
            let limits = RequestLimits {
                max_bytes: 1_000,
                max_names: 3,
            };
            let budget = RequestBudget::new(1 << 20);
            let mut requests = Requests::new(body_of(vec![bytes]), limits, budget.clone());
            match requests.message().await {
                Err(ReadError::Refused { reason, status }) => {
                    assert_eq!((reason, status.code()), (want_reason, code), "{status}")
                }
                other => panic!("{want_reason}: {other:?}"),
            }
            drop(requests);
            assert_eq!(budget.held.load(std::sync::atomic::Ordering::Relaxed), 0);
        }
        // Streams together past the budget: the one that would pass it is refused.
        let limits = RequestLimits {
            max_bytes: 1 << 20,
            max_names: 10,
        };
        let budget = RequestBudget::new(100);
        let mut head = vec![0];
        head.extend_from_slice(&1000u32.to_be_bytes());
        head.extend_from_slice(&[0; 60]);
        let mut first = Requests::new(body_of(vec![head.clone()]), limits, budget.clone());
        let mut second = Requests::new(body_of(vec![head]), limits, budget.clone());
        let _ = tokio::time::timeout(std::time::Duration::from_millis(50), first.message()).await;
        match second.message().await {
            Err(ReadError::Refused { reason, .. }) => assert_eq!(reason, "too_large"),
            other => panic!("{other:?}"),
        }
    }
}
