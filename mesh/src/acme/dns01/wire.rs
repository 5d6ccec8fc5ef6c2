//! DNS on the wire: queries (UDP, TCP when truncated) and TSIG-signed updates (TCP), with
//! hickory-proto building and parsing the messages and a deadline on every exchange.

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{rdata, DNSClass, Name, RData, RecordType, TSigVerifier, TSigner},
    serialize::binary::DecodeError,
    ProtoError,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

use super::{Data, Record, Rtype};

/// What went wrong talking DNS. Each names the server or the value at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Not a DNS name.
    #[error("{0:?} is not a DNS name: {1}")]
    Name(String, #[source] ProtoError),
    /// A CAA value we would write cannot be encoded.
    #[error("CAA value {0:?}: {1}")]
    CaaValue(String, #[source] super::caa::BadParameter),
    /// A record type or tag dstack-mesh never writes.
    #[error("{0} is not written by dstack-mesh")]
    NotOurs(String),
    /// The message could not be encoded or signed.
    #[error("building the message: {0}")]
    Encode(#[from] ProtoError),
    /// The message is longer than DNS over TCP carries.
    #[error("DNS message too long")]
    TooLong,
    /// The socket failed.
    #[error("{server}: {source}")]
    Io {
        /// The server.
        server: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The server did not answer in time.
    #[error("{server} did not answer within {timeout:?}")]
    Timeout {
        /// The server.
        server: SocketAddr,
        /// The deadline.
        timeout: Duration,
    },
    /// The answer is not a DNS message.
    #[error("{server} answered something that is not DNS: {source}")]
    NotDns {
        /// The server.
        server: SocketAddr,
        /// What the decoder said.
        source: DecodeError,
    },
    /// The update was refused, in nsupdate's words (`NOTAUTH (TSIG BADSIG)`) with a hint.
    #[error("{server} answered {mnemonic}{tsig}{hint}")]
    Refused {
        /// The server.
        server: SocketAddr,
        /// The response code as nsupdate prints it.
        mnemonic: String,
        /// ` (TSIG ...)` when the server said why the signature failed.
        tsig: String,
        /// What to check.
        hint: &'static str,
    },
    /// A success that does not carry our TSIG: it may be forged.
    #[error("{server}'s answer is not signed with our TSIG key: {source}")]
    Unsigned {
        /// The server.
        server: SocketAddr,
        /// What the verifier said.
        source: ProtoError,
    },
    /// The server is not authoritative for the name.
    #[error("{server} answered {rcode} for the zone of {owner}: it is not authoritative for it")]
    NotAuthoritative {
        /// The server.
        server: SocketAddr,
        /// Its answer.
        rcode: ResponseCode,
        /// The name asked about.
        owner: String,
    },
    /// The server holds no zone enclosing the name.
    #[error("{server} returned no SOA for {owner}: it holds no zone enclosing it")]
    NoZone {
        /// The server.
        server: SocketAddr,
        /// The name asked about.
        owner: String,
    },
}

/// What a server answered to a query.
#[derive(Debug)]
pub struct Answer {
    /// The response code (`NXDomain` for a name that does not exist).
    pub rcode: ResponseCode,
    /// Records of the asked type (and CNAMEs on the way) from the answer section.
    pub records: Vec<Record>,
}

impl Answer {
    /// The TXT values among the records.
    pub fn txts(&self) -> impl Iterator<Item = &str> {
        self.records.iter().filter_map(|r| match &r.data {
            Data::Txt(v) => Some(v.as_str()),
            _ => None,
        })
    }

    /// The CNAME targets among the records.
    pub fn cnames(&self) -> impl Iterator<Item = &str> {
        self.records.iter().filter_map(|r| match &r.data {
            Data::Cname(t) => Some(t.as_str()),
            _ => None,
        })
    }

    /// The IPv4 addresses (A records) among the records.
    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        self.records.iter().filter_map(|r| match &r.data {
            Data::Other(Rtype::A, ip) => Some(ip.as_str()),
            _ => None,
        })
    }
}

/// A name in hickory's form (fully qualified).
pub fn name(text: &str) -> Result<Name, WireError> {
    let mut n = Name::from_ascii(text).map_err(|e| WireError::Name(text.to_owned(), e))?;
    n.set_fqdn(true);
    Ok(n)
}

/// Our record form of a hickory record, for the types we manage and compare.
pub fn record(r: &hickory_proto::rr::Record) -> Option<Record> {
    let name = r.name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
    let data = match &r.data {
        RData::TXT(txt) => Data::Txt(
            txt.txt_data
                .iter()
                .map(|s| String::from_utf8_lossy(s))
                .collect(),
        ),
        RData::CNAME(c) => Data::Cname(c.0.to_ascii().trim_end_matches('.').to_ascii_lowercase()),
        RData::CAA(caa) => Data::Caa {
            critical: caa.issuer_critical,
            tag: caa.tag.clone(),
            value: String::from_utf8_lossy(&caa.value).into_owned(),
        },
        RData::A(a) => Data::Other(Rtype::A, a.to_string()),
        RData::AAAA(a) => Data::Other(Rtype::Aaaa, a.to_string()),
        _ => return None,
    };
    Some(Record {
        name,
        data,
        ttl: r.ttl,
        id: None,
    })
}

/// A hickory record for one of ours.
pub fn to_hickory(r: &Record) -> Result<hickory_proto::rr::Record, WireError> {
    let owner = name(&r.name)?;
    let data = match &r.data {
        Data::Txt(text) => {
            // A character-string holds 255 bytes; longer values are split, as DNS allows.
            let chunks = text
                .as_bytes()
                .chunks(255)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect();
            RData::TXT(rdata::TXT::new(chunks))
        }
        Data::Cname(target) => RData::CNAME(rdata::CNAME(name(target)?)),
        Data::Caa {
            critical,
            tag,
            value,
        } => {
            let issue = super::caa::IssueValue::parse(value)
                .map_err(|e| WireError::CaaValue(value.clone(), e))?;
            let issuer = match issue.domain.as_str() {
                "" => None,
                d => Some(Name::from_ascii(d).map_err(|e| WireError::Name(d.to_owned(), e))?),
            };
            let params = issue
                .params
                .iter()
                .map(|(k, v)| rdata::caa::KeyValue::new(k.clone(), v.clone()))
                .collect();
            match tag.as_str() {
                "issue" => RData::CAA(rdata::CAA::new_issue(*critical, issuer, params)),
                "issuewild" => RData::CAA(rdata::CAA::new_issuewild(*critical, issuer, params)),
                other => return Err(WireError::NotOurs(format!("CAA tag {other:?}"))),
            }
        }
        Data::Other(t, v) => return Err(WireError::NotOurs(format!("{} {v}", t.as_str()))),
    };
    Ok(hickory_proto::rr::Record::from_rdata(owner, r.ttl, data))
}

fn random_id() -> u16 {
    let mut b = [0u8; 2];
    let _ = aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut b);
    u16::from_le_bytes(b)
}

/// Ask `server` for `rtype` records at `owner`, within `timeout`.
pub async fn query(
    server: SocketAddr,
    owner: &str,
    rtype: Rtype,
    timeout: Duration,
) -> Result<Answer, WireError> {
    let mut msg = Message::query();
    msg.metadata.id = random_id();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name(owner)?, rtype.hickory()));
    msg.edns = Some({
        let mut e = Edns::new();
        e.set_max_payload(1232);
        e
    });
    let bytes = msg.to_vec()?;
    let exchange = async {
        let reply = udp(server, &bytes, msg.metadata.id).await?;
        match reply.metadata.truncation {
            true => tcp(server, &bytes).await,
            false => Ok(reply),
        }
    };
    let reply = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| WireError::Timeout { server, timeout })??;
    Ok(read_answer(&reply))
}

async fn udp(server: SocketAddr, bytes: &[u8], id: u16) -> Result<Message, WireError> {
    let io = |source| WireError::Io { server, source };
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
        SocketAddr::V6(_) => ([0u16; 8], 0).into(),
    };
    let socket = UdpSocket::bind(local).await.map_err(io)?;
    socket.connect(server).await.map_err(io)?;
    socket.send(bytes).await.map_err(io)?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = socket.recv(&mut buf).await.map_err(io)?;
        // Anything but our reply (a late answer to an earlier query) is ignored.
        if let Ok(m) = Message::from_vec(&buf[..n]) {
            if m.metadata.id == id && m.metadata.message_type == MessageType::Response {
                return Ok(m);
            }
        }
    }
}

async fn tcp_exchange(server: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>, WireError> {
    let io = |source| WireError::Io { server, source };
    let mut s = TcpStream::connect(server).await.map_err(io)?;
    let len = u16::try_from(bytes.len()).map_err(|_| WireError::TooLong)?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    s.write_all(&framed).await.map_err(io)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.map_err(io)?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut reply).await.map_err(io)?;
    Ok(reply)
}

async fn tcp(server: SocketAddr, bytes: &[u8]) -> Result<Message, WireError> {
    let reply = tcp_exchange(server, bytes).await?;
    Message::from_vec(&reply).map_err(|source| WireError::NotDns { server, source })
}

/// One change in an RFC 2136 update.
#[derive(Debug)]
pub enum Change<'a> {
    /// Add this record (a duplicate is ignored by the server).
    Add(&'a Record),
    /// Delete this exact record.
    Delete(&'a Record),
}

/// Send a TSIG-signed update of `zone` to `server` and check the signed answer.
pub async fn update(
    server: SocketAddr,
    zone: &str,
    changes: &[Change<'_>],
    signer: &TSigner,
    timeout: Duration,
) -> Result<(), WireError> {
    let mut msg = Message::new(random_id(), MessageType::Query, OpCode::Update);
    let mut zq = Query::new();
    zq.set_name(name(zone)?)
        .set_query_class(DNSClass::IN)
        .set_query_type(RecordType::SOA);
    msg.add_query(zq);
    for change in changes {
        let mut r = match change {
            Change::Add(r) | Change::Delete(r) => to_hickory(r)?,
        };
        if matches!(change, Change::Delete(_)) {
            // RFC 2136 §2.5.4: class NONE, TTL 0 deletes this RR from the set.
            r.dns_class = DNSClass::NONE;
            r.ttl = 0;
        }
        msg.add_authority(r);
    }
    let now = crate::clock::unix_u64(SystemTime::now());
    let mut verifier = msg.finalize(signer, now)?;
    let bytes = msg.to_vec()?;
    let reply = tokio::time::timeout(timeout, tcp_exchange(server, &bytes))
        .await
        .map_err(|_| WireError::Timeout { server, timeout })??;
    read_update_reply(server, &reply, verifier.as_mut())
}

/// What an update's answer says: success only when it carries our TSIG (when we signed).
pub fn read_update_reply(
    server: SocketAddr,
    reply: &[u8],
    verifier: Option<&mut TSigVerifier>,
) -> Result<(), WireError> {
    let parsed = Message::from_vec(reply).map_err(|source| WireError::NotDns { server, source })?;
    let rcode = parsed.metadata.response_code;
    if rcode != ResponseCode::NoError {
        // The mnemonics nsupdate and BIND's log use, so the error reads the same everywhere.
        let tsig = parsed
            .signature
            .as_ref()
            .and_then(|s| s.data.error.as_ref())
            .map(|e| format!(" (TSIG {})", format!("{e:?}").to_ascii_uppercase()))
            .unwrap_or_default();
        let mnemonic = match rcode {
            ResponseCode::NotAuth => "NOTAUTH".to_owned(),
            ResponseCode::Refused => "REFUSED".to_owned(),
            ResponseCode::NotZone => "NOTZONE".to_owned(),
            ResponseCode::ServFail => "SERVFAIL".to_owned(),
            ResponseCode::FormErr => "FORMERR".to_owned(),
            other => other.to_string(),
        };
        let hint = match rcode {
            ResponseCode::NotAuth => ": the server does not accept this TSIG key for the zone (check the key name, secret and algorithm)",
            ResponseCode::Refused => ": the server refuses updates to this zone from this key (check allow-update / update-policy)",
            ResponseCode::NotZone => ": the name is not in the zone",
            _ => "",
        };
        return Err(WireError::Refused {
            server,
            mnemonic,
            tsig,
            hint,
        });
    }
    // A success we cannot authenticate may be forged: the record might not be there.
    match verifier {
        Some(v) => v
            .verify(reply)
            .map(|_| ())
            .map_err(|source| WireError::Unsigned { server, source }),
        None => Ok(()),
    }
}

/// The zone `server` holds `owner` in: the owner of the SOA record it returns (in the answer
/// at an apex, in the authority section below one). A name a wildcard CNAME covers answers
/// with the CNAME and no SOA: then the parent is asked, up to the top.
pub async fn zone_of(
    server: SocketAddr,
    owner: &str,
    timeout: Duration,
) -> Result<String, WireError> {
    let mut ask = owner.to_owned();
    loop {
        let mut msg = Message::query();
        msg.metadata.id = random_id();
        msg.add_query(Query::query(name(&ask)?, RecordType::SOA));
        let bytes = msg.to_vec()?;
        let reply = tokio::time::timeout(timeout, tcp(server, &bytes))
            .await
            .map_err(|_| WireError::Timeout { server, timeout })??;
        if let Some(zone) = read_soa_reply(server, owner, &reply)? {
            return Ok(zone);
        }
        ask = match ask.split_once('.') {
            Some((_, parent)) if parent.contains('.') => parent.to_owned(),
            _ => {
                return Err(WireError::NoZone {
                    server,
                    owner: owner.to_owned(),
                })
            }
        };
    }
}

/// The zone an answer to an SOA query names, if it holds an SOA (answer or authority section).
pub fn read_soa_reply(
    server: SocketAddr,
    owner: &str,
    reply: &Message,
) -> Result<Option<String>, WireError> {
    let rcode = reply.metadata.response_code;
    if !matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain) {
        return Err(WireError::NotAuthoritative {
            server,
            rcode,
            owner: owner.to_owned(),
        });
    }
    let soa = reply
        .answers
        .iter()
        .chain(reply.authorities.iter())
        .find(|r| r.record_type() == RecordType::SOA);
    Ok(soa.map(|soa| {
        soa.name
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase()
    }))
}

/// What an answer to a query says: its code and the records we read (the asked type and
/// CNAMEs on the way).
pub fn read_answer(reply: &Message) -> Answer {
    Answer {
        rcode: reply.metadata.response_code,
        records: reply.answers.iter().filter_map(record).collect(),
    }
}
