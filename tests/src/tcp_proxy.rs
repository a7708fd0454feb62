//! A TCP proxy that cuts connections in the middle of a stream, on demand: in front of
//! nats-server it drops a worker's connection halfway through a publish batch, as a network
//! partition, a load balancer or a server restart would; in front of etcd it drops every open
//! connection of a paused worker, as a NAT or a load balancer forgets an idle one. It can also
//! black-hole what clients send ([`TcpProxy::black_hole`]): in front of etcd, a worker's writes
//! then hang without ever reaching the server, not even after the worker died.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Which connections to cut, and what was cut.
#[derive(Debug, Default)]
struct Cutting {
    /// How many of the next connections to cut.
    remaining: AtomicU64,
    /// After how many bytes from the client.
    after_bytes: AtomicU64,
    /// Connections cut so far.
    cut: AtomicU64,
    /// While set, bytes from clients are read and dropped; a connection that dropped bytes
    /// never forwards again (its stream is broken).
    black_hole: std::sync::atomic::AtomicBool,
}

/// A running proxy; stops when dropped.
pub struct TcpProxy {
    port: u16,
    cutting: Arc<Cutting>,
    stop: CancellationToken,
    /// Parent of every open connection's token; replaced when they are cut.
    open: Arc<Mutex<CancellationToken>>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`
    /// (`host:port`).
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let cutting = Arc::new(Cutting::default());
        let stop = CancellationToken::new();
        let open = Arc::new(Mutex::new(stop.child_token()));
        let upstream = upstream.to_owned();
        let (accept_cutting, accept_stop, accept_open) = (cutting.clone(), stop.clone(), open.clone());
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    _ = accept_stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => continue,
                    },
                };
                let Ok(server) = TcpStream::connect(&upstream).await else { continue };
                let cut_after = accept_cutting
                    .remaining
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .ok()
                    .map(|_| accept_cutting.after_bytes.load(Ordering::SeqCst));
                tokio::spawn(forward(
                    client,
                    server,
                    cut_after,
                    accept_cutting.clone(),
                    accept_open.lock().expect("not poisoned").child_token(),
                ));
            }
        });
        Ok(Self { port, cutting, stop, open })
    }

    /// The proxy's address as a URL of `scheme` (`http` for etcd).
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Closes every connection open now, both ways; later connections are forwarded.
    pub fn cut_open_connections(&self) {
        let mut open = self.open.lock().expect("not poisoned");
        open.cancel();
        *open = self.stop.child_token();
    }

    /// The proxy's address as a NATS URL.
    pub fn nats_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Cuts each of the next `connections` connections once `after_bytes` went from the client
    /// to the server over it.
    pub fn cut_connections(&self, connections: u64, after_bytes: u64) {
        self.cutting.after_bytes.store(after_bytes, Ordering::SeqCst);
        self.cutting.remaining.store(connections, Ordering::SeqCst);
    }

    /// The proxy's address, `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// From now on, drops everything clients send, on open and new connections: requests hang
    /// unanswered, and none of them reaches the server later. Connections that dropped bytes
    /// stay black-holed; [`Self::restore`] lets new ones through again.
    pub fn black_hole(&self) {
        self.cutting.black_hole.store(true, Ordering::SeqCst);
    }

    /// New connections (and those that have not dropped bytes yet) are forwarded again.
    pub fn restore(&self) {
        self.cutting.black_hole.store(false, Ordering::SeqCst);
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> u64 {
        self.cutting.cut.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Copies both ways until either side closes, or until `cut_after` bytes came from the client.
async fn forward(
    client: TcpStream,
    server: TcpStream,
    cut_after: Option<u64>,
    cutting: Arc<Cutting>,
    stop: CancellationToken,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async {
        let mut forwarded = 0u64;
        let mut buffer = vec![0u8; 16 * 1024];
        let mut dropping = false;
        loop {
            let n = match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            dropping |= cutting.black_hole.load(Ordering::SeqCst);
            if dropping {
                continue;
            }
            if let Some(limit) = cut_after
                && forwarded + n as u64 >= limit
            {
                // Half of what crosses the limit is delivered: the cut lands mid-message.
                let keep = ((limit - forwarded) as usize).min(n / 2);
                let _ = server_write.write_all(&buffer[..keep]).await;
                cutting.cut.fetch_add(1, Ordering::SeqCst);
                return;
            }
            if server_write.write_all(&buffer[..n]).await.is_err() {
                return;
            }
            forwarded += n as u64;
        }
    };
    let downstream = async {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
    };
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = upstream => {}
        _ = downstream => {}
    }
}
