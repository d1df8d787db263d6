use super::*;

fn judge(stream: &[u8]) -> Verdict {
    FramingGuard::new(65536, 100).feed(stream, false)
}

fn judge_bytewise(stream: &[u8]) -> Verdict {
    let mut g = FramingGuard::new(65536, 100);
    for b in stream {
        if g.feed(std::slice::from_ref(b), false) == Verdict::Ambiguous {
            return Verdict::Ambiguous;
        }
    }
    Verdict::Fine
}

fn both(stream: &[u8]) -> Verdict {
    let (whole, bytewise) = (judge(stream), judge_bytewise(stream));
    assert_eq!(whole, bytewise, "{}", String::from_utf8_lossy(stream));
    whole
}

#[test]
fn smuggling_shapes_are_ambiguous() {
    let bad: &[&[u8]] = &[
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: xchunked\r\n\r\n",
    ];
    for s in bad {
        assert_eq!(
            both(s),
            Verdict::Ambiguous,
            "{}",
            String::from_utf8_lossy(s)
        );
    }
}

#[test]
fn clean_pipelines_pass_and_later_heads_are_checked() {
    let ok = b"\r\nPOST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nab\nde\r\n0\r\nX-T: 1\r\n\r\n";
    assert_eq!(both(ok), Verdict::Fine);
    // Body bytes that look like headers are not mistaken for them...
    let body = b"POST / HTTP/1.1\r\nContent-Length: 24\r\n\r\nTransfer-Encoding: x\r\n\r\n";
    assert_eq!(both(body), Verdict::Fine);
    // ...but a third request after two clean ones is still judged.
    let mut third = ok.to_vec();
    third.extend_from_slice(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n");
    assert_eq!(both(&third), Verdict::Ambiguous);
}

#[test]
fn a_refused_upgrade_keeps_the_guard_watching_an_accepted_one_ends_it() {
    let stream = b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
    // No 101: the next request is a request, and it is ambiguous.
    assert_eq!(both(stream), Verdict::Ambiguous);
    // 101 sent (the handler set `upgraded`) before the tunnel's bytes arrive: not HTTP any more.
    let mut g = FramingGuard::new(65536, 100);
    let head = b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
    assert_eq!(g.feed(head, false), Verdict::Fine);
    assert_eq!(
        g.feed(
            b"\x81\x85garbage Content-Length: 1\r\nContent-Length: 2\r\n\r\n",
            true
        ),
        Verdict::Fine
    );
}

#[test]
fn the_h2_preface_ends_watching() {
    assert_eq!(
        judge(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00Content-Length: 1\r\nContent-Length: 2\r\n\r\n"),
        Verdict::Fine
    );
}

#[test]
fn losing_sync_fails_closed() {
    let lost: &[&[u8]] = &[
        // A chunk size that is not hex.
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nGET /smuggled HTTP/1.1\r\n\r\n",
        // A head hyper cannot parse (space before the colon).
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        // Not HTTP.
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    ];
    for s in lost {
        assert_eq!(
            both(s),
            Verdict::Ambiguous,
            "{}",
            String::from_utf8_lossy(s)
        );
    }
    // A head over the limit, and too many headers.
    let mut g = FramingGuard::new(64, 100);
    assert_eq!(g.feed(&[b'a'; 100], false), Verdict::Ambiguous);
    let mut g = FramingGuard::new(65536, 2);
    assert_eq!(
        g.feed(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n", false),
        Verdict::Ambiguous
    );
    // Once failed, everything after is refused.
    assert_eq!(g.feed(b"GET / HTTP/1.1\r\n\r\n", false), Verdict::Ambiguous);
}

#[test]
fn arbitrary_bytes_never_panic() {
    // The same 20,000 inputs every run, fed whole and in random cuts.
    let mut next = crate::xorshift(0x9e3779b97f4a7c15);
    let pieces: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\n",
        b"Host: a\r\n",
        b"Content-Length: 3\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"\r\n",
        b"abc",
        b"5\r\n",
        b"0\r\n\r\n",
        b"Upgrade: x\r\n",
        b"PRI * HTTP/2.0\r\n",
        b"\n",
        b"\xff",
    ];
    for _ in 0..20_000 {
        let mut input = Vec::new();
        for _ in 0..(next() % 12) {
            input.extend_from_slice(pieces[(next() % pieces.len() as u64) as usize]);
        }
        let mut g = FramingGuard::new(1024, 8);
        let mut rest = &input[..];
        while !rest.is_empty() {
            let cut = 1 + (next() as usize % rest.len());
            g.feed(&rest[..cut], next() % 2 == 0);
            rest = &rest[cut..];
        }
    }
}

#[test]
fn chunk_extensions_are_taken_only_in_rfc_9112_form() {
    let head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
    let fine: &[&[u8]] = &[
        b"5\r\nhello\r\n0\r\n\r\n",
        b"5;a\r\nhello\r\n0\r\n\r\n",
        b"5 ; a = b ;c=\"q \\\" x\"\r\nhello\r\n0;last\r\n\r\n",
        b"5;name=tok-en.1\t\r\nhello\r\n0\r\n\r\n",
        b"A\r\n0123456789\r\n0\r\n\r\n",
    ];
    for body in fine {
        let stream = [&head[..], body].concat();
        assert_eq!(
            both(&stream),
            Verdict::Fine,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    let bad: &[&[u8]] = &[
        // A request line hidden in an extension (relayed as is, an instance that reads the
        // body its own way would answer it as a second request).
        b"5;GET / HTTP/1.1\r\nhello\r\n0\r\n\r\n",
        b"5;a=GET /x HTTP/1.1\r\nhello\r\n0\r\n\r\n",
        b"5;\r\nhello\r\n0\r\n\r\n",
        b"5;=b\r\nhello\r\n0\r\n\r\n",
        b"5;a=\r\nhello\r\n0\r\n\r\n",
        b"5;a=\"open\r\nhello\r\n0\r\n\r\n",
        b"5;a=b c\r\nhello\r\n0\r\n\r\n",
        b"5 x\r\nhello\r\n0\r\n\r\n",
        b";a\r\nhello\r\n0\r\n\r\n",
        // Lines end with CRLF only, as hyper reads them.
        b"5\nhello\r\n0\r\n\r\n",
        b"5;a\rb\r\nhello\r\n0\r\n\r\n",
    ];
    for body in bad {
        let stream = [&head[..], body].concat();
        assert_eq!(
            both(&stream),
            Verdict::Ambiguous,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}
