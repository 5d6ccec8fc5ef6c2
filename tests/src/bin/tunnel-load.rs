//! tunnel-load: the TCP load client and sink for `scripts/tunnel-bench`. Speaks plain TCP to
//! whatever is in front of the sink (the sink itself, a dstack-mesh tunnel port, an stunnel
//! client), so every setup carries the same bytes.
//!
//! The sink's protocol: a connection whose first byte is `h` or `p` is answered with that byte
//! at once, then read to its end (held, or a ping); any other is read to its end (the client's
//! half-close) and answered with the byte count (8 bytes, little-endian).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark tool: a failure is a failed run

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

#[derive(Parser)]
#[command(about = "TCP load client and sink for scripts/tunnel-bench")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the sink; prints `listening <addr>`.
    Sink {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// One connection: send `mib` MiB, half-close, read the count. Prints MiB/s.
    Throughput {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1024)]
        mib: u64,
    },
    /// New connections, one byte each way, for `duration` seconds. Prints connections/s and
    /// how many failed.
    Connections {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 10)]
        duration: u64,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Open `count` connections through to the sink and hold them; prints the RSS each of
    /// `pids` gained per connection (KiB).
    Hold {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, value_delimiter = ',')]
        pids: Vec<u32>,
    },
}

#[tokio::main]
async fn main() {
    match Cli::parse().command {
        Cmd::Sink { listen } => sink(listen).await,
        Cmd::Throughput { target, mib } => {
            let mut tcp = TcpStream::connect(target).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let chunk = vec![b'x'; 256 << 10];
            let started = Instant::now();
            let total = mib << 20;
            let mut sent = 0u64;
            while sent < total {
                tcp.write_all(&chunk).await.unwrap();
                sent += chunk.len() as u64;
            }
            tcp.shutdown().await.unwrap();
            let count = tcp.read_u64_le().await.unwrap();
            let secs = started.elapsed().as_secs_f64();
            assert_eq!(count, sent, "the sink received every byte");
            println!(
                "{}",
                serde_json::json!({ "mib_per_s": (sent as f64 / 1048576.0) / secs })
            );
        }
        Cmd::Connections {
            target,
            duration,
            concurrency,
        } => {
            let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            let end = Instant::now() + Duration::from_secs(duration);
            let workers: Vec<_> = (0..concurrency)
                .map(|_| {
                    let (done, failed) = (done.clone(), failed.clone());
                    tokio::spawn(async move {
                        while Instant::now() < end {
                            match one_byte(target).await {
                                Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                                Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                            };
                        }
                    })
                })
                .collect();
            let started = Instant::now();
            for w in workers {
                w.await.unwrap();
            }
            let secs = started.elapsed().as_secs_f64();
            let (done, failed) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
            println!(
                "{}",
                serde_json::json!({ "per_s": done as f64 / secs, "failed": failed })
            );
        }
        Cmd::Hold {
            target,
            count,
            pids,
        } => {
            let before: Vec<u64> = pids
                .iter()
                .map(|p| e2e::proc_status_kib(*p, "VmRSS"))
                .collect();
            let mut held = Vec::with_capacity(count);
            for _ in 0..count {
                let mut tcp = TcpStream::connect(target).await.unwrap();
                tcp.write_all(b"h").await.unwrap();
                assert_eq!(
                    tcp.read_u8().await.unwrap(),
                    b'h',
                    "held through to the sink"
                );
                held.push(tcp);
            }
            // Let allocators settle before reading.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after: Vec<u64> = pids
                .iter()
                .map(|p| e2e::proc_status_kib(*p, "VmRSS"))
                .collect();
            let per: Vec<f64> = before
                .iter()
                .zip(&after)
                .map(|(b, a)| a.saturating_sub(*b) as f64 / count as f64)
                .collect();
            println!("{}", serde_json::json!({ "kib_per_connection": per }));
        }
    }
}

/// One connection through to the sink and back: one byte each way, then close (no
/// half-close: how a relay passes one on is not what this measures).
async fn one_byte(target: SocketAddr) -> std::io::Result<()> {
    let mut tcp = TcpStream::connect(target).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(b"p").await?;
    match tcp.read_u8().await? {
        b'p' => Ok(()),
        b => Err(std::io::Error::other(format!("the sink answered {b}"))),
    }
}

async fn sink(listen: SocketAddr) {
    let listener = TcpListener::bind(listen).await.unwrap();
    println!("listening {}", listener.local_addr().unwrap());
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let mut first = [0u8; 1];
            if tcp.read_exact(&mut first).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 256 << 10];
            let mut count = 1u64;
            let answered = matches!(first[0], b'h' | b'p');
            if answered {
                let _ = tcp.write_all(&first).await;
            }
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => count += n as u64,
                    Err(_) => return,
                }
            }
            if !answered {
                let _ = tcp.write_all(&count.to_le_bytes()).await;
            }
            let _ = tcp.shutdown().await;
        });
    }
}
