//! The connection-rate load generator (no packaged tool does connect, 1-byte request/response,
//! close in a loop and counts connections): one blocking client and one blocking server, each
//! pinned to a CPU by the caller.
//!
//! The client closes with RST (`SO_LINGER` 0), so neither side keeps a TIME_WAIT socket and the
//! client's ports are reusable at once; the figure is then the cost of a connection through the
//! path (SYN, SYN-ACK, ACK, two data segments, RST), and through NAT the cost of creating flow
//! state, not of port exhaustion.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The client's report, one JSON line on stdout.
#[derive(Debug, Serialize, Deserialize)]
pub struct CrrReport {
    /// Completed connections (request answered).
    pub connections: u64,
    /// Failed attempts (connect, send or receive error or timeout).
    pub errors: u64,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// Measured seconds.
    pub secs: f64,
}

/// Per-step limit: a lost SYN costs a retransmission (1 s), counted as an error.
const STEP_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves forever (the bench kills it): accept, read 1 byte, write 1 byte, read until the
/// client's close.
pub fn server(port: u16) -> Result<()> {
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
        .with_context(|| format!("binding TCP port {port}"))?;
    let mut buf = [0u8; 1];
    loop {
        let Ok((mut conn, _)) = listener.accept() else {
            continue;
        };
        let _ = conn.set_nodelay(true);
        let _ = conn.set_read_timeout(Some(STEP_TIMEOUT));
        if conn.read_exact(&mut buf).is_ok() && conn.write_all(&buf).is_ok() {
            // Wait for the client's RST (or FIN) so that the server never closes first.
            let _ = conn.read(&mut buf);
        }
    }
}

/// Runs connections to `to` for `secs` seconds and prints a [`CrrReport`].
pub fn client(to: SocketAddrV4, secs: f64) -> Result<()> {
    anyhow::ensure!(
        secs > 0.0 && secs <= 600.0,
        "--secs {secs}: must be in (0, 600]"
    );
    let addr = SocketAddr::V4(to);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let (mut connections, mut errors, mut first_error) = (0u64, 0u64, None);
    let mut buf = [0u8; 1];
    while Instant::now() < deadline {
        match one_connection(&addr, &mut buf) {
            Ok(()) => connections += 1,
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    let report = CrrReport {
        connections,
        errors,
        first_error,
        secs: start.elapsed().as_secs_f64(),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn one_connection(addr: &SocketAddr, buf: &mut [u8; 1]) -> Result<()> {
    let mut conn = TcpStream::connect_timeout(addr, STEP_TIMEOUT).context("connect")?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(STEP_TIMEOUT))?;
    conn.write_all(b"x").context("send")?;
    conn.read_exact(buf).context("receive")?;
    reset_on_close(&conn)?;
    Ok(())
}

/// `SO_LINGER` {on, 0}: `close` sends RST and frees the socket at once.
fn reset_on_close(conn: &TcpStream) -> Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a pointer to a properly sized, initialised linger struct.
    let rc = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            libc::socklen_t::try_from(size_of::<libc::linger>())?,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setsockopt(SO_LINGER)");
    }
    Ok(())
}
