//! The metrics endpoint (`--metrics ADDR`): a deliberately tiny HTTP/1.1
//! server for two read-only pages, `GET /metrics` (Prometheus text) and
//! `GET /healthz` (200 `ok`, or 503 and the reason). One request per
//! connection, answered and closed; the request head is read with a size
//! cap and a deadline, only its first line is looked at, and at most a few
//! scrapes are served at once — a scraper gets nothing else, and a client
//! that misbehaves gets its connection closed.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::Reading;
use crate::state::State;

/// The longest request head read.
const HEAD_MAX: usize = 8 << 10;
/// How long a client has to send its request and read the answer.
const DEADLINE: Duration = Duration::from_secs(5);
/// Requests served at once; further connections are closed unanswered.
const AT_ONCE: usize = 8;

/// Serves `listener` for as long as the task runs (the server aborts it
/// when the broker ends).
pub async fn serve(listener: TcpListener, state: Arc<State>) {
    let slots = Arc::new(Semaphore::new(AT_ONCE));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(%peer, "metrics: too many requests at once; closed");
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let _slot = slot;
            if tokio::time::timeout(DEADLINE, answer(tcp, &state))
                .await
                .is_err()
            {
                debug!(%peer, "metrics: request not done in time; closed");
            }
        });
    }
}

/// Whether the broker is healthy: serving, and with `--cluster`, connected
/// to NATS; otherwise why not.
pub fn health(state: &State) -> Result<(), String> {
    if !state.serving() {
        return Err("shutting down: no longer accepting connections".into());
    }
    match &state.cluster {
        Some(c) if !c.connected() => Err("cluster unreachable: not connected to NATS".into()),
        _ => Ok(()),
    }
}

/// The gauges' values now.
fn reading(state: &State) -> Reading {
    Reading {
        connections: state.conns.totals(),
        online: state.registry.counts(),
        running: state.transfers.relaying_total(),
        cluster_connected: state.cluster.as_ref().is_some_and(|c| c.connected()),
    }
}

/// Reads one request head and answers it.
async fn answer(mut tcp: TcpStream, state: &State) {
    let Some(head) = read_head(&mut tcp).await else {
        return;
    };
    let (status, kind, body) = match route(&head) {
        Route::Metrics => (
            "200 OK",
            CONTENT_TYPE,
            state.metrics.scrape(&reading(state)).into_bytes(),
        ),
        Route::Health => match health(state) {
            Ok(()) => ("200 OK", TEXT, b"ok\n".to_vec()),
            Err(why) => ("503 Service Unavailable", TEXT, format!("{why}\n").into()),
        },
        Route::NotFound => (
            "404 Not Found",
            TEXT,
            b"only /metrics and /healthz are here\n".to_vec(),
        ),
        Route::Method => ("405 Method Not Allowed", TEXT, b"GET only\n".to_vec()),
        Route::Bad => ("400 Bad Request", TEXT, b"bad request\n".to_vec()),
    };
    let head_only = head.starts_with(b"HEAD ");
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(&body);
    }
    let _ = tcp.write_all(&out).await;
    let _ = tcp.shutdown().await;
}

const TEXT: &str = "text/plain; charset=utf-8";

/// The request head (up to its blank line), or `None` if the client closed
/// first or sent more than [`HEAD_MAX`] without one.
async fn read_head(tcp: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = tcp.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Some(head);
        }
        if head.len() > HEAD_MAX {
            return None;
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    Health,
    NotFound,
    Method,
    Bad,
}

/// What the request line `METHOD TARGET HTTP/1.x` asks for.
fn route(head: &[u8]) -> Route {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return Route::Bad;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::Bad;
    }
    if method != "GET" && method != "HEAD" {
        return Route::Method;
    }
    let path = target.split('?').next().unwrap_or_default();
    match path {
        "/metrics" => Route::Metrics,
        "/healthz" => Route::Health,
        _ => Route::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_two_pages_by_get_are_served() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route(b"HEAD /healthz?x=1 HTTP/1.0\n\n"), Route::Health);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::Method);
        for bad in [
            &b"GET /metrics\r\n\r\n"[..],
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics SPDY/3\r\n\r\n",
            b"\xff\xfe /metrics HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(route(bad), Route::Bad, "{bad:?}");
        }
    }
}
