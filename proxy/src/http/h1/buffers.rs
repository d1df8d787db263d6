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
/// Buffers kept per thread (256 KiB of 4 KiB buffers); more are freed. What the pool keeps stays
/// resident: keeping 256, with heads pooled alike, took `benches/http/idle_memory.sh` from 1,791
/// to 2,088 bytes per idle connection (HAProxy: 2,023), for 0.8 fewer allocations per HTTP/2
/// request.
const KEEP: usize = 64;
/// Room a head takes at once (a request head, or a response head with its first body bytes):
/// grown from nothing, a head doubled its way up (nine reallocations a request, measured).
const HEAD_ROOM: usize = 1024;

thread_local! {
    static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
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

/// Gives `head` room for a head if it has none. Heads are not pooled: an idle connection frees
/// its heads, and what a pool would keep resident costs more than the allocation it saves.
pub fn head_room(head: &mut Vec<u8>) {
    if head.capacity() == 0 {
        head.reserve(HEAD_ROOM);
    }
}
