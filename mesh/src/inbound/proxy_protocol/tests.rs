use ppp::v2::{Builder, Command, Protocol, Version};
use tokio::io::AsyncWriteExt;

use super::*;

const CLIENT: &str = "203.0.113.7:51234";
const GATEWAY: &str = "10.0.0.1:443";
/// What follows the header on the wire: the start of a TLS record, never to be consumed.
const AFTER: &[u8] = b"\x16\x03\x01rest";

/// Read from `bytes` followed by [`AFTER`]; the result and what was left unread.
async fn read_from(
    bytes: &[u8],
    accept: Accept,
) -> (Result<Option<SocketAddr>, ProxyError>, Vec<u8>) {
    let mut input = bytes.to_vec();
    input.extend_from_slice(AFTER);
    let mut reader: &[u8] = &input;
    let result = read(&mut reader, accept).await;
    (result, reader.to_vec())
}

fn v2_header(command: Command, addresses: ppp::v2::Addresses) -> Vec<u8> {
    Builder::with_addresses(Version::Two | command, Protocol::Stream, addresses)
        .build()
        .unwrap()
}

fn v2_proxy() -> Vec<u8> {
    let pair: (SocketAddr, SocketAddr) = (CLIENT.parse().unwrap(), GATEWAY.parse().unwrap());
    v2_header(Command::Proxy, pair.into())
}

#[tokio::test]
async fn v1_and_v2_give_the_client_and_consume_only_the_header() {
    let v1 = "PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n";
    for (bytes, accept) in [
        (v1.as_bytes().to_vec(), Accept::V1),
        (v1.as_bytes().to_vec(), Accept::Any),
        (v2_proxy(), Accept::V2),
        (v2_proxy(), Accept::Any),
    ] {
        let (result, left) = read_from(&bytes, accept).await;
        assert_eq!(result.unwrap(), Some(CLIENT.parse().unwrap()), "{accept:?}");
        assert_eq!(left, AFTER, "the TLS bytes after the header stay unread");
    }
    let v6 = "PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n";
    let (result, left) = read_from(v6.as_bytes(), Accept::Any).await;
    assert_eq!(
        result.unwrap(),
        Some("[2001:db8::7]:51234".parse().unwrap())
    );
    assert_eq!(left, AFTER);
}

#[tokio::test]
async fn headers_that_name_no_client_keep_the_peer() {
    // The shortest v1 header (15 bytes) is read without touching what follows.
    let (result, left) = read_from(b"PROXY UNKNOWN\r\n", Accept::Any).await;
    assert_eq!(result.unwrap(), None);
    assert_eq!(left, AFTER);
    // A LOCAL command (the proxy's own health check) and an UNSPEC family.
    let local = v2_header(Command::Local, ppp::v2::Addresses::Unspecified);
    assert_eq!(read_from(&local, Accept::V2).await.0.unwrap(), None);
    let unspec = v2_header(Command::Proxy, ppp::v2::Addresses::Unspecified);
    assert_eq!(read_from(&unspec, Accept::V2).await.0.unwrap(), None);
}

#[tokio::test]
async fn bad_headers_are_refused_with_the_reason() {
    // No header where one is required: the ClientHello itself.
    let (result, _) = read_from(
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00",
        Accept::Any,
    )
    .await;
    assert!(
        matches!(result, Err(ProxyError::Missing(Accept::Any))),
        "{result:?}"
    );
    // A version that is not accepted.
    let (result, _) = read_from(&v2_proxy(), Accept::V1).await;
    assert!(matches!(result, Err(ProxyError::Missing(_))), "{result:?}");
    let (result, _) = read_from(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", Accept::V2).await;
    assert!(matches!(result, Err(ProxyError::Missing(_))), "{result:?}");
    // Malformed v1: bad address, bad port.
    for bad in [
        "PROXY TCP4 1.2.3 10.0.0.1 1 2\r\n",
        "PROXY TCP4 1.2.3.4 10.0.0.1 99999 2\r\n",
        "PROXY SCTP 1.2.3.4 10.0.0.1 1 2\r\n",
    ] {
        let (result, _) = read_from(bad.as_bytes(), Accept::Any).await;
        assert!(
            matches!(result, Err(ProxyError::Malformed(_))),
            "{bad}: {result:?}"
        );
    }
    // Oversized v1: no CRLF within the 107 bytes the protocol allows.
    let long = format!("PROXY TCP4 {}", "1".repeat(200));
    let (result, _) = read_from(long.as_bytes(), Accept::Any).await;
    assert!(
        matches!(result, Err(ProxyError::TooLong(107))),
        "{result:?}"
    );
    // Oversized v2 length field.
    let mut big = V2_SIGNATURE.to_vec();
    big.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    let (result, _) = read_from(&big, Accept::Any).await;
    assert!(matches!(result, Err(ProxyError::TooLong(_))), "{result:?}");
    // A UNIX-socket address: no IP for x-forwarded-for.
    let unix = v2_header(
        Command::Proxy,
        ppp::v2::Addresses::Unix(ppp::v2::Unix::new([1; 108], [2; 108])),
    );
    let (result, _) = read_from(&unix, Accept::Any).await;
    assert!(
        matches!(result, Err(ProxyError::NotIp("UNIX"))),
        "{result:?}"
    );
}

#[tokio::test]
async fn truncated_headers_end_in_an_error_not_a_hang() {
    let full = v2_proxy();
    for cut in [0, 5, 12, 15, full.len() - 1] {
        let mut reader: &[u8] = &full[..cut];
        let result = read(&mut reader, Accept::Any).await;
        assert!(
            matches!(result, Err(ProxyError::Io(_))),
            "{cut}: {result:?}"
        );
    }
    let mut reader: &[u8] = b"PROXY TCP4 1.2.3.4";
    assert!(matches!(
        read(&mut reader, Accept::Any).await,
        Err(ProxyError::Io(_))
    ));
}

#[tokio::test]
async fn a_header_read_byte_by_byte_parses_the_same() {
    // Every prefix arrives in its own read, as a slow client would send it.
    let header = v2_proxy();
    let (mut client, mut server) = tokio::io::duplex(1);
    let writer = tokio::spawn(async move {
        for b in &header {
            client.write_all(&[*b]).await.unwrap();
        }
    });
    let result = read(&mut server, Accept::Any).await.unwrap();
    assert_eq!(result, Some(CLIENT.parse().unwrap()));
    writer.await.unwrap();
}

#[test]
fn settings_parse_as_dstack_ingress_writes_them() {
    for (text, want) in [
        ("off", Accept::Off),
        ("V2", Accept::V2),
        ("v1", Accept::V1),
        ("any", Accept::Any),
        ("true", Accept::Any),
        ("false", Accept::Off),
    ] {
        assert_eq!(text.parse::<Accept>().unwrap(), want, "{text}");
    }
    assert!("v3".parse::<Accept>().is_err());
}

#[test]
fn random_and_mutated_headers_never_panic_nor_read_past_a_header() {
    let seeds = [
        v2_proxy(),
        v2_header(Command::Local, ppp::v2::Addresses::Unspecified),
        b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n".to_vec(),
        b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n".to_vec(),
        b"PROXY UNKNOWN\r\n".to_vec(),
    ];
    let mut rng = ratls::fuzz::Rng(0x005e_ed0f_9a7e_u64);
    for round in 0..20_000 {
        let mut input = seeds[round % seeds.len()].clone();
        match round % 3 {
            // Flip a few bytes.
            0 => {
                for _ in 0..1 + rng.next() % 4 {
                    let i = (rng.next() as usize) % input.len();
                    input[i] = rng.next() as u8;
                }
            }
            // Cut it short, or pad it.
            1 => input.truncate((rng.next() as usize) % (input.len() + 1)),
            // Random bytes behind a real prefix.
            _ => {
                let keep = (rng.next() as usize) % input.len();
                input.truncate(keep);
                input.extend((0..rng.next() % 64).map(|_| rng.next() as u8));
            }
        }
        input.extend_from_slice(AFTER);
        for accept in [Accept::V1, Accept::V2, Accept::Any] {
            let mut rest: &[u8] = &input;
            let _ = read_slice(&mut rest, accept);
            let consumed = input.len() - rest.len();
            assert!(
                consumed <= 16 + V2_MAX_BODY,
                "{round}: read {consumed} bytes"
            );
        }
    }
}
