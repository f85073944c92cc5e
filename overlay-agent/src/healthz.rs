//! flanneld's health endpoints on `--healthz-ip:--healthz-port`: `/healthz` answers 200 while
//! the process runs; `/readyz` answers 200 once the data path is attached and the subnet file is
//! written, 503 before.

use std::net::SocketAddr;

use axum::{Router, extract::State, http::StatusCode, routing::get};
use tokio::{net::TcpListener, sync::watch};

/// Whether the node is ready to carry pod traffic.
pub type Readiness = watch::Receiver<bool>;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen for health checks on {addr}: {source}")]
pub struct HealthzError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds the listener now (so a bad address fails start-up) and returns the serving future.
pub async fn bind(
    addr: SocketAddr,
    ready: Readiness,
) -> Result<impl Future<Output = std::io::Result<()>>, HealthzError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HealthzError { addr, source })?;
    tracing::info!("health endpoints on http://{addr}/healthz and /readyz");
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(ready);
    Ok(async move { axum::serve(listener, app).await })
}

async fn readyz(State(ready): State<Readiness>) -> (StatusCode, &'static str) {
    if *ready.borrow() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: data path or subnet file not in place yet\n",
        )
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    async fn status(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response.lines().next().unwrap_or_default().to_owned()
    }

    #[tokio::test]
    async fn readyz_follows_readiness_and_healthz_is_always_ok() {
        // Port 0 on loopback: the kernel picks a free port; nothing leaves the machine.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let (set_ready, ready) = watch::channel(false);
        let server = tokio::spawn(bind(addr, ready).await.unwrap());
        assert_eq!(status(addr, "/healthz").await, "HTTP/1.1 200 OK");
        assert_eq!(
            status(addr, "/readyz").await,
            "HTTP/1.1 503 Service Unavailable"
        );
        set_ready.send(true).unwrap();
        assert_eq!(status(addr, "/readyz").await, "HTTP/1.1 200 OK");
        server.abort();
    }

    #[tokio::test]
    async fn a_busy_address_names_itself() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind(addr, watch::channel(false).1)
            .await
            .err()
            .expect("bind must fail");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
