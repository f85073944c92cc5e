//! flanneld's health endpoints on `--healthz-ip:--healthz-port`, and our `/metrics`:
//! - `/healthz` answers 200 while the process runs;
//! - `/readyz` answers 200 while the node carries pod traffic as it should, else 503 with the
//!   reason: still starting, the data path detached, the lease renewal overdue, or etcd
//!   unreachable for longer than `--health-etcd-timeout` (see `telemetry`). It turns back to
//!   503 when one of these goes bad, not only before start-up completes;
//! - `/metrics` is the Prometheus text format (see `metrics`), on the same port: one port to
//!   open and scrape, off together with the health endpoints (`--healthz-port 0`).

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::net::TcpListener;

use crate::telemetry::Telemetry;

/// What the endpoints read: the agent's runtime facts and where its maps are pinned.
#[derive(Debug, Clone)]
pub struct Readiness {
    pub telemetry: Arc<Telemetry>,
    pub bpf_dir: PathBuf,
}

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
    tracing::info!("health endpoints on http://{addr}/healthz and /readyz, metrics on /metrics");
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ready);
    Ok(async move { axum::serve(listener, app).await })
}

async fn readyz(State(ready): State<Readiness>) -> (StatusCode, String) {
    match ready.telemetry.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics(State(ready): State<Readiness>) -> impl IntoResponse {
    // Map reads and tcx queries are syscalls: off the async workers.
    let body = tokio::task::spawn_blocking(move || {
        crate::metrics::render(&ready.bpf_dir, &ready.telemetry)
    })
    .await
    .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn readiness() -> Readiness {
        Readiness {
            telemetry: Arc::new(Telemetry::new(std::time::Duration::from_secs(60), vec![])),
            bpf_dir: PathBuf::from("/nonexistent"),
        }
    }

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
        let ready = readiness();
        let telemetry = ready.telemetry.clone();
        let server = tokio::spawn(bind(addr, ready).await.unwrap());
        assert_eq!(status(addr, "/healthz").await, "HTTP/1.1 200 OK");
        assert_eq!(
            status(addr, "/readyz").await,
            "HTTP/1.1 503 Service Unavailable"
        );
        telemetry.started();
        assert_eq!(status(addr, "/readyz").await, "HTTP/1.1 200 OK");
        telemetry.set_datapath_problem(Some("underlay_ingress on eth0: gone".to_owned()));
        assert_eq!(
            status(addr, "/readyz").await,
            "HTTP/1.1 503 Service Unavailable",
            "readiness follows the facts after start-up too"
        );
        assert_eq!(status(addr, "/metrics").await, "HTTP/1.1 200 OK");
        server.abort();
    }

    #[tokio::test]
    async fn a_busy_address_names_itself() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind(addr, readiness()).await.err().expect("bind must fail");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
