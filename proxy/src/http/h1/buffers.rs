//! The fast path's read buffers, recycled per worker thread: a connection takes one when bytes
//! arrive and gives it back when it goes idle. An idle connection then holds no buffer, the
//! buffers in use at once bound what exists (as HAProxy's buffer pool), and a request costs no
//! allocation for them. Thread-local, as each worker is one thread: no lock.

use std::cell::RefCell;

use bytes::BytesMut;

/// Each buffer's size: a head, or a small response with its head, fits.
const SIZE: usize = 4 * 1024;
/// Free space a read wants; a buffer with less is grown.
const READ_ROOM: usize = 1024;
/// Free space a body relay reads into, once the body needs more than one read.
const BODY_ROOM: usize = 16 * 1024;
/// Buffers kept per thread (1 MiB of 4 KiB buffers); more are freed. Sized for the bridge's
/// HTTP/2 streams in flight (each holds a buffer until its response is read): with 64, 16 h2load
/// connections of 10 streams emptied the pool and cost a new buffer on every other request.
const KEEP: usize = 256;

thread_local! {
    static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    /// The same for the heads a connection writes (upstream request, client response).
    static FREE_HEADS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Makes room in `buf` for a read: a recycled buffer if it has none, more space if it is full.
pub fn room(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        *buf = FREE
            .with_borrow_mut(Vec::pop)
            .unwrap_or_else(|| BytesMut::with_capacity(SIZE));
    }
    if buf.capacity() - buf.len() < READ_ROOM {
        buf.reserve(SIZE);
    }
}

/// Makes room in `buf` for the next read of a body that did not fit its first read: fewer
/// system calls for long bodies. Such a grown buffer is freed when given back.
pub fn room_for_body(buf: &mut BytesMut) {
    room(buf);
    buf.reserve(BODY_ROOM);
}

/// Takes `buf` (leaving it empty, without capacity) and keeps it for the next reader if it holds
/// nothing unread and is of the usual size.
pub fn give_back(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        return; // nothing held
    }
    let mut b = std::mem::take(buf);
    if !b.is_empty() {
        *buf = b; // unread bytes stay with their connection
        return;
    }
    b.reserve(SIZE); // reclaims the space before the cursor: no allocation
    if b.capacity() <= 2 * SIZE {
        FREE.with_borrow_mut(|free| {
            if free.len() < KEEP {
                free.push(b);
            }
        });
    }
}

/// Gives `head` a recycled buffer if it has none, so a head written into it grows no
/// allocation: an idle connection keeps no head buffer, and a new one would double its way up
/// (nine reallocations a request, measured, before heads were recycled).
pub fn head_room(head: &mut Vec<u8>) {
    if head.capacity() == 0 {
        *head = FREE_HEADS
            .with_borrow_mut(Vec::pop)
            .unwrap_or_else(|| Vec::with_capacity(SIZE));
    }
}

/// Takes `head` (leaving it without capacity) and keeps it for the next head if it is of the
/// usual size.
pub fn give_back_head(head: &mut Vec<u8>) {
    let mut h = std::mem::take(head);
    if h.capacity() == 0 || h.capacity() > 2 * SIZE {
        return;
    }
    h.clear();
    FREE_HEADS.with_borrow_mut(|free| {
        if free.len() < KEEP {
            free.push(h);
        }
    });
}
