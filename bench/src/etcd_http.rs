//! etcd's JSON gateway (`POST /v3/kv/put`, `/v3/kv/deleterange`) over a plain TCP socket: the
//! bench puts thousands of leases, and times lease propagation from the moment the request
//! leaves, which an `etcdctl` process per key would blur by its own start-up.
//!
//! etcd listens in the cluster's underlay namespace: call these from a thread inside it
//! ([`overlay_tests::NetNs::in_netns`]), where the socket is created.

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Puts `key` = `value`.
pub fn put(etcd: SocketAddrV4, key: &str, value: &str) -> Result<()> {
    let body = serde_json::json!({ "key": B64.encode(key), "value": B64.encode(value) });
    post(etcd, "/v3/kv/put", &body.to_string()).with_context(|| format!("etcd put {key}"))
}

/// Deletes `key`.
pub fn delete(etcd: SocketAddrV4, key: &str) -> Result<()> {
    let body = serde_json::json!({ "key": B64.encode(key) });
    post(etcd, "/v3/kv/deleterange", &body.to_string())
        .with_context(|| format!("etcd delete {key}"))
}

/// One request on a new connection (`Connection: close`); fails unless the status is 200.
fn post(etcd: SocketAddrV4, path: &str, body: &str) -> Result<()> {
    let mut conn = TcpStream::connect_timeout(&etcd.into(), TIMEOUT)
        .with_context(|| format!("connecting to etcd at {etcd}"))?;
    conn.set_read_timeout(Some(TIMEOUT))?;
    conn.set_nodelay(true)?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {etcd}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    conn.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let status = text.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200") {
        bail!("etcd answered {path} with {status:?}: {}", text.trim());
    }
    Ok(())
}
