//! The listening sockets of every server (ext_proc, health/admin, metrics):
//! binding, accepting, and TLS for the ext_proc port.
//!
//! Accepting is where someone outside can make the process misbehave at
//! will: a client that exhausts the file descriptors makes every `accept`
//! fail at once. So every listener accepts through [`Listener`], which never
//! hands an accept error to its server (tonic and hyper would retry at once
//! and spin a core); it logs the condition at most once per
//! [`ACCEPT_ERROR_LOG_INTERVAL`] per listener, with the number of failures
//! left out, and waits [`ACCEPT_BACKOFF`] before the next attempt. Accepted
//! connections get TCP_NODELAY: every server here answers small messages
//! whose latency matters more than packet count.

pub mod tls;

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};

use crate::telemetry::log_limit::LogLimiter;

pub use tls::{TlsError, TlsSetup};

/// Pause after a failed accept, so running out of file descriptors does not
/// turn an accept loop into a busy loop.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// At most one accept-failure warning per listener in this interval.
pub const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// A bound TCP listener that accepts without ever failing.
#[derive(Debug)]
pub struct Listener {
    inner: TcpListener,
    /// Names the listener in log lines.
    name: &'static str,
    local: SocketAddr,
    errors: LogLimiter,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Listener {
    pub async fn bind(addr: SocketAddr, name: &'static str) -> Result<Self, BindError> {
        let inner = TcpListener::bind(addr)
            .await
            .map_err(|source| BindError { addr, source })?;
        let local = inner.local_addr().unwrap_or(addr);
        Ok(Self {
            inner,
            name,
            local,
            errors: LogLimiter::new(ACCEPT_ERROR_LOG_INTERVAL),
            backoff: None,
        })
    }

    /// The address actually bound (the port is chosen when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next connection; failures are logged (rate-limited) and retried
    /// after [`ACCEPT_BACKOFF`].
    pub fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<TcpStream> {
        loop {
            if let Some(sleep) = self.backoff.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.backoff = None;
            }
            match self.inner.poll_accept(cx) {
                Poll::Ready(Ok((stream, _))) => {
                    let _ = stream.set_nodelay(true);
                    return Poll::Ready(stream);
                }
                Poll::Ready(Err(error)) => {
                    if let Some(suppressed) = self.errors.allow(Instant::now()) {
                        tracing::warn!(listener = self.name, %error, suppressed, "accept failed");
                    }
                    self.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    pub async fn accept(&mut self) -> TcpStream {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }
}

/// Accepted connections as a stream, for tonic's `serve_with_incoming`.
impl futures_util::Stream for Listener {
    type Item = Result<TcpStream, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_accept(cx).map(|s| Some(Ok(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepts_with_nodelay_and_reports_the_bound_port() {
        let mut l = Listener::bind(SocketAddr::from(([127, 0, 0, 1], 0)), "test")
            .await
            .unwrap();
        let addr = l.local_addr();
        assert_ne!(addr.port(), 0);
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), l.accept());
        client.unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    #[tokio::test]
    async fn binding_a_taken_port_names_the_address() {
        let l = Listener::bind(SocketAddr::from(([127, 0, 0, 1], 0)), "a")
            .await
            .unwrap();
        let e = Listener::bind(l.local_addr(), "b").await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("cannot listen on {}", l.local_addr())
        );
        assert!(std::error::Error::source(&e).is_some());
    }
}
