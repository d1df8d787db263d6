use super::*;

fn request(raw: &[u8]) -> (ParsedRequest, String) {
    let mut out = Vec::new();
    let parsed = parse_request(raw, 100, Downstream::plain("10.1.2.3"), &mut out);
    (parsed, String::from_utf8(out).unwrap())
}

#[test]
fn a_usual_request_is_rewritten_in_one_pass() {
    let raw = b"POST /a?b=1 HTTP/1.1\r\nHost: web:80\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\
        Keep-Alive: 5\r\nTE: gzip, trailers\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\n\
        X-Forwarded-Proto: https\r\nContent-Length: 3\r\nVia: 1.0 a\r\n\r\nabcGET";
    let (parsed, out) = request(raw);
    let ParsedRequest::Request(info) = parsed else {
        panic!("{parsed:?}")
    };
    assert_eq!(info.len, raw.len() - 6);
    assert_eq!(info.framing, BodyFraming::Length(3));
    assert_eq!(&raw[info.host.clone()], b"web:80");
    assert_eq!(&raw[info.path.clone()], b"/a?b=1");
    assert!(!info.close && !info.replayable() && !info.idempotent);
    assert_eq!(
        out,
        "POST /a?b=1 HTTP/1.1\r\nhost: web:80\r\nte: trailers\r\n\
         x-forwarded-for: 1.1.1.1, 2.2.2.2, 10.1.2.3\r\nContent-Length: 3\r\nVia: 1.0 a\r\n\
         x-forwarded-proto: http\r\nx-forwarded-host: web:80\r\nvia: 1.1 svcd\r\n\r\n"
    );
}

#[test]
fn partial_heads_wait_and_unusual_ones_go_to_hyper() {
    assert!(matches!(
        request(b"GET / HTTP/1.1\r\nHost: a\r\n").0,
        ParsedRequest::Partial
    ));
    for raw in [
        &b"GET / HTTP/1.0\r\nHost: a\r\n\r\n"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: a,b,c,d,e,f,g,h,i\r\n\r\n",
    ] {
        let parsed = request(raw).0;
        assert!(
            matches!(parsed, ParsedRequest::Unusual),
            "{:?}: {parsed:?}",
            String::from_utf8_lossy(raw)
        );
    }
    // More fields than max_headers: hyper answers 431.
    let mut out = Vec::new();
    let many = b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n";
    assert!(matches!(
        parse_request(many, 2, Downstream::plain("1.1.1.1"), &mut out),
        ParsedRequest::Unusual
    ));
}

#[test]
fn responses_keep_their_framing_and_lose_hop_by_hop_fields() {
    let mut out = Vec::new();
    let raw = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n\
        Transfer-Encoding: chunked\r\n\r\n";
    let ParsedResponse::Response(info) = parse_response(raw, false, false, &mut out) else {
        panic!()
    };
    assert_eq!(info.framing, ResponseFraming::Body(BodyFraming::Chunked));
    assert!(info.reusable);
    assert_eq!(
        String::from_utf8(out.clone()).unwrap(),
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    // HTTP/1.0 without a length: the body ends at close, and so does the client's connection.
    let raw = b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\n";
    let ParsedResponse::Response(info) = parse_response(raw, false, false, &mut out) else {
        panic!()
    };
    assert_eq!(info.framing, ResponseFraming::UntilClose);
    assert!(!info.reusable);
    assert!(out.ends_with(b"connection: close\r\n\r\n"));
    // HEAD and 304 have no body whatever the length says.
    let raw = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n";
    let ParsedResponse::Response(info) = parse_response(raw, false, true, &mut out) else {
        panic!()
    };
    assert_eq!(info.framing, ResponseFraming::Body(BodyFraming::Length(0)));
    assert!(out.ends_with(b"connection: close\r\n\r\n"));
    let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
    assert!(matches!(
        parse_response(raw, false, false, &mut out),
        ParsedResponse::Bad
    ));
}

#[test]
fn arbitrary_heads_never_panic() {
    let mut next = crate::xorshift(0x2545f4914f6cdd1d);
    let pieces: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\n",
        b"HTTP/1.1 200 OK\r\n",
        b"Host: a\r\n",
        b"Connection: close, x\r\n",
        b"Content-Length: 3\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"X-Forwarded-For: 1\r\n",
        b"\r\n",
        b"\xff",
        b" ",
        b":",
    ];
    let mut out = Vec::new();
    for _ in 0..20_000 {
        let mut input = Vec::new();
        for _ in 0..(next() % 10) {
            input.extend_from_slice(pieces[(next() % pieces.len() as u64) as usize]);
        }
        let _ = parse_request(&input, 8, Downstream::plain("::1"), &mut out);
        let _ = parse_response(&input, next() % 2 == 0, next() % 2 == 0, &mut out);
    }
}
