//! A minimal DNS client over real UDP and TCP sockets.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use hickory_proto::serialize::binary::BinEncodable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

pub fn query(name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(rand_id(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_ascii(name).expect("valid name"),
        rtype,
    ));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_bytes().expect("encode query")
}

fn rand_id() -> u16 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        & 0xffff) as u16
}

/// Sends raw bytes over UDP; `None` if nothing came back within 1 s.
pub async fn udp_raw(server: SocketAddr, packet: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
    socket.send_to(packet, server).await.expect("send");
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.truncate(n);
    Some(buf)
}

pub async fn udp(server: SocketAddr, name: &str, rtype: RecordType, edns: Option<u16>) -> Message {
    let packet = query(name, rtype, edns);
    let reply = udp_raw(server, &packet)
        .await
        .unwrap_or_else(|| panic!("no UDP answer for {name} {rtype}"));
    let m = Message::from_vec(&reply).expect("valid DNS response");
    assert_eq!(m.metadata.id, u16::from_be_bytes([packet[0], packet[1]]));
    m
}

pub async fn tcp(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let packet = query(name, rtype, None);
    let mut stream = TcpStream::connect(server).await.expect("connect DNS/TCP");
    stream
        .write_all(&(packet.len() as u16).to_be_bytes())
        .await
        .unwrap();
    stream.write_all(&packet).await.unwrap();
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(3), stream.read_exact(&mut len))
        .await
        .expect("TCP answer in 3s")
        .unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).expect("valid DNS response")
}

/// Address answers, sorted.
pub fn addrs(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

/// Parses a response as strict clients (kdig) do: header, question, then exactly the counted
/// records, and nothing after them.
pub fn strict(bytes: &[u8]) -> Message {
    use hickory_proto::rr::Record;
    use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
    let m = Message::from_vec(bytes).expect("a DNS message");
    let mut d = BinDecoder::new(bytes);
    d.read_slice(12).expect("header");
    for _ in 0..m.queries.len() {
        Query::read(&mut d).expect("question");
    }
    let counted =
        m.answers.len() + m.authorities.len() + m.additionals.len() + usize::from(m.edns.is_some());
    for _ in 0..counted {
        Record::read(&mut d).expect("a whole record");
    }
    assert_eq!(
        d.index(),
        bytes.len(),
        "trailing data after the counted records"
    );
    m
}
