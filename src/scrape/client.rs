//! A minimal HTTP/1.1 client for one endpoint's metrics page.
//!
//! Scraping is one GET per endpoint every 50 ms, thousands per second on a
//! large pool, and a general client's machinery (a connection task and a
//! channel per connection, a request and response object per call) costs
//! more than parsing the page. This client owns one kept-alive TCP stream
//! and two reused buffers, writes a request prepared once, and reads the
//! response in place: no task, no channel, no allocation in steady state.
//! It understands what metrics servers send: `Content-Length` or chunked
//! bodies, or a body ended by closing the connection.
//!
//! The socket is polled, not registered with the runtime's reactor: once
//! connected, the stream is a plain non-blocking `std` socket, and waiting
//! for the answer is a timer (see [`SETTLE`] and [`PollBackoff`]). A
//! registered socket makes every arriving answer an epoll event, and when
//! the scraper's thread is idle each event wakes it: with pods that answer
//! a few milliseconds apart, one wake-up (a context switch and an
//! `epoll_wait`) per scrape cost more than reading the page. Timers of every
//! endpoint's task expire on the same millisecond ticks, so the thread wakes
//! once per tick and reads every answer that came in meanwhile.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use super::ScrapeError;

/// Largest response header block accepted.
const MAX_HEAD: usize = 64 << 10;

/// Pause between sending the request and reading the answer.
const SETTLE: Duration = Duration::from_millis(1);

/// Longest pause between two looks at a socket that has nothing to read:
/// a server that hangs costs a syscall this often until the timeout.
const MAX_POLL: Duration = Duration::from_millis(16);

/// Waits between looks at a socket with nothing ready: 1 ms, then doubling
/// up to [`MAX_POLL`], never past the scrape's deadline.
struct PollBackoff {
    next: Duration,
}

impl PollBackoff {
    fn new() -> Self {
        Self {
            next: Duration::from_millis(1),
        }
    }

    async fn wait(
        &mut self,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<(), ScrapeError> {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(ScrapeError::Timeout(timeout));
        }
        tokio::time::sleep_until((now + self.next).min(deadline)).await;
        self.next = (self.next * 2).min(MAX_POLL);
        Ok(())
    }
}

pub(super) struct MetricsClient {
    addr: SocketAddr,
    path: String,
    /// The request sent, prepared once.
    request: Vec<u8>,
    /// The other request (plain path or metric-name filter) when a filter
    /// was set, swapped with `request` to switch: no allocation per scrape.
    other: Vec<u8>,
    /// `request` is the filtered one.
    filtering: bool,
    stream: Option<TcpStream>,
    /// Raw bytes read from the stream.
    buf: Vec<u8>,
    /// The decoded body (for chunked responses; otherwise a range of `buf`).
    page: Vec<u8>,
    max_page: usize,
}

/// Where the body of the last response is.
enum Body {
    InBuf(usize, usize),
    InPage,
}

impl MetricsClient {
    pub(super) fn new(addr: SocketAddr, path: &str, max_page: usize) -> Self {
        let path = if path.starts_with('/') {
            path
        } else {
            "/metrics"
        };
        Self {
            addr,
            path: path.to_owned(),
            request: request(addr, path, None),
            other: Vec::new(),
            filtering: false,
            stream: None,
            buf: Vec::with_capacity(64 << 10),
            page: Vec::new(),
            max_page,
        }
    }

    /// Prepares the request with `query` added to the target and sends it
    /// from now on. Called once per endpoint: it allocates.
    pub(super) fn set_filter_query(&mut self, query: &str) {
        let filtered = request(self.addr, &self.path, Some(query));
        if self.filtering {
            self.request = filtered;
        } else {
            self.other = std::mem::replace(&mut self.request, filtered);
            self.filtering = true;
        }
    }

    /// Switches between the filtered and the plain request (no allocation);
    /// without a filter query there is only the plain one.
    pub(super) fn use_filter(&mut self, on: bool) {
        if on != self.filtering && !self.other.is_empty() {
            std::mem::swap(&mut self.request, &mut self.other);
            self.filtering = on;
        }
    }

    /// GETs the page and returns its body, failing after `timeout`.
    ///
    /// The deadline is only armed on slow paths: a read that finds the
    /// answer already buffered (the usual case, see [`SETTLE`]) needs no
    /// timer, and a timer per scrape shows up in the scraper's profile.
    pub(super) async fn fetch(&mut self, timeout: Duration) -> Result<&[u8], ScrapeError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let body = match self.exchange(deadline, timeout).await {
            Ok(b) => b,
            Err(e) => {
                // A bad status leaves a healthy connection; anything else may not.
                if !matches!(e, ScrapeError::Status(_)) {
                    self.stream = None;
                }
                return Err(e);
            }
        };
        Ok(match body {
            Body::InBuf(start, end) => &self.buf[start..end],
            Body::InPage => &self.page,
        })
    }

    async fn exchange(
        &mut self,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<Body, ScrapeError> {
        if self.buf.capacity() > (4 << 20) {
            self.buf = Vec::with_capacity(64 << 10);
        }
        if self.page.capacity() > (4 << 20) {
            self.page = Vec::new();
        }
        if self.stream.is_none() {
            let s = tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(self.addr))
                .await
                .map_err(|_| ScrapeError::Timeout(timeout))?
                .map_err(ScrapeError::Connect)?;
            let _ = s.set_nodelay(true);
            // Leaves the reactor (see the module header); stays non-blocking.
            self.stream = Some(s.into_std().map_err(ScrapeError::Connect)?);
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err(ScrapeError::Malformed("no connection".into()));
        };
        // A request this small fits the socket buffer: the write normally
        // completes at once; only a full buffer waits (bounded).
        let mut sent = 0;
        let mut backoff = PollBackoff::new();
        while sent < self.request.len() {
            match stream.write(&self.request[sent..]) {
                Ok(0) => return Err(ScrapeError::Closed),
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    backoff.wait(deadline, timeout).await?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ScrapeError::Io(e)),
            }
        }
        // Let the answer arrive before reading. Every endpoint's request of a
        // round goes out at the same tick, so after this one timer (shared by
        // all of them in the timer wheel) the thread finds nearly every
        // response already buffered and reads them in one pass, instead of
        // sleeping and waking once per response, which costs more CPU than
        // the scrape itself. Slower answers are polled for below.
        tokio::time::sleep(SETTLE).await;

        self.buf.clear();
        let head = loop {
            read_more(stream, &mut self.buf, deadline, timeout).await?;
            let mut headers = [httparse::EMPTY_HEADER; 48];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    break Head::from(&resp, len)?;
                }
                Ok(httparse::Status::Partial) if self.buf.len() < MAX_HEAD => continue,
                Ok(httparse::Status::Partial) => {
                    return Err(ScrapeError::Malformed("response headers too large".into()));
                }
                Err(e) => return Err(ScrapeError::Malformed(e.to_string())),
            }
        };

        let body = if let Some(len) = head.content_length {
            if len > self.max_page {
                return Err(ScrapeError::TooLarge);
            }
            while self.buf.len() < head.len + len {
                read_more(stream, &mut self.buf, deadline, timeout).await?;
            }
            Body::InBuf(head.len, head.len + len)
        } else if head.chunked {
            self.read_chunked(head.len, deadline, timeout).await?;
            Body::InPage
        } else {
            // No length: the body ends when the server closes.
            loop {
                if self.buf.len() - head.len > self.max_page {
                    return Err(ScrapeError::TooLarge);
                }
                match read_more(stream, &mut self.buf, deadline, timeout).await {
                    Ok(()) => {}
                    Err(ScrapeError::Closed) => break,
                    Err(e) => return Err(e),
                }
            }
            self.stream = None;
            Body::InBuf(head.len, self.buf.len())
        };
        if head.close {
            self.stream = None;
        }
        if !(200..300).contains(&head.status) {
            return Err(ScrapeError::Status(head.status));
        }
        Ok(body)
    }

    /// Decodes a chunked body starting at `pos` of `buf` into `page`.
    async fn read_chunked(
        &mut self,
        mut pos: usize,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<(), ScrapeError> {
        self.page.clear();
        let Some(stream) = self.stream.as_mut() else {
            return Err(ScrapeError::Malformed("no connection".into()));
        };
        loop {
            // A chunk-size line.
            let line_end = loop {
                if let Some(i) = memchr::memmem::find(&self.buf[pos..], b"\r\n") {
                    break pos + i;
                }
                if self.buf.len() - pos > 1024 {
                    return Err(ScrapeError::Malformed("chunk size line too long".into()));
                }
                read_more(stream, &mut self.buf, deadline, timeout).await?;
            };
            let line = std::str::from_utf8(&self.buf[pos..line_end])
                .map_err(|_| ScrapeError::Malformed("chunk size".into()))?;
            let size_text = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| ScrapeError::Malformed(format!("chunk size {size_text:?}")))?;
            pos = line_end + 2;
            if size == 0 {
                // Trailers (if any) end with an empty line.
                loop {
                    if let Some(i) = memchr::memmem::find(&self.buf[pos..], b"\r\n") {
                        if i == 0 {
                            return Ok(());
                        }
                        pos += i + 2;
                        continue;
                    }
                    if self.buf.len() - pos > MAX_HEAD {
                        return Err(ScrapeError::Malformed("trailers too large".into()));
                    }
                    read_more(stream, &mut self.buf, deadline, timeout).await?;
                }
            }
            // Not `page.len() + size`: a hostile size near usize::MAX would
            // overflow it and slip past the check.
            if size > self.max_page.saturating_sub(self.page.len()) {
                return Err(ScrapeError::TooLarge);
            }
            while self.buf.len() < pos + size + 2 {
                read_more(stream, &mut self.buf, deadline, timeout).await?;
            }
            self.page.extend_from_slice(&self.buf[pos..pos + size]);
            pos += size + 2;
        }
    }
}

/// The request, prepared once: `path` plus `query` (joined with `&` when
/// the path already has one).
fn request(addr: SocketAddr, path: &str, query: Option<&str>) -> Vec<u8> {
    let sep = match query {
        None | Some("") => "",
        Some(_) if path.contains('?') => "&",
        Some(_) => "?",
    };
    let query = query.unwrap_or("");
    format!(
        "GET {path}{sep}{query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nUser-Agent: epp-scraper\r\n\r\n"
    )
    .into_bytes()
}

/// Reads at least one more byte into `buf`, polling (until `deadline`) only
/// when nothing is buffered yet. The peer closing gives [`ScrapeError::Closed`].
async fn read_more(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<(), ScrapeError> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 << 10);
    }
    let mut backoff = PollBackoff::new();
    loop {
        let before = buf.len();
        // Bounded by the room already reserved, so reading never grows
        // `buf`; `read_to_end` fills spare capacity without zeroing it and
        // keeps what it read when the socket runs dry (WouldBlock).
        let room = u64::try_from(buf.capacity() - before).unwrap_or(u64::MAX);
        match (&mut *stream).take(room).read_to_end(buf) {
            Ok(_) if buf.len() > before => return Ok(()),
            Ok(_) => return Err(ScrapeError::Closed),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if buf.len() > before {
                    return Ok(());
                }
                backoff.wait(deadline, timeout).await?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ScrapeError::Io(e)),
        }
    }
}

/// What the response head says about the body.
struct Head {
    len: usize,
    status: u16,
    content_length: Option<usize>,
    chunked: bool,
    close: bool,
}

impl Head {
    fn from(resp: &httparse::Response<'_, '_>, len: usize) -> Result<Self, ScrapeError> {
        let mut head = Self {
            len,
            status: resp.code.unwrap_or(0),
            content_length: None,
            chunked: false,
            close: resp.version == Some(0),
        };
        for h in resp.headers.iter() {
            let value = std::str::from_utf8(h.value).unwrap_or("").trim();
            if h.name.eq_ignore_ascii_case("content-length") {
                head.content_length =
                    Some(value.parse().map_err(|_| {
                        ScrapeError::Malformed(format!("content-length {value:?}"))
                    })?);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                head.chunked = value.to_ascii_lowercase().contains("chunked");
            } else if h.name.eq_ignore_ascii_case("connection") {
                let v = value.to_ascii_lowercase();
                if v.contains("close") {
                    head.close = true;
                } else if v.contains("keep-alive") {
                    head.close = false;
                }
            }
        }
        if head.chunked {
            head.content_length = None;
        }
        Ok(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    const T: Duration = Duration::from_secs(5);

    /// Reads one request head; false once the client has closed.
    async fn read_request(sock: &mut tokio::net::TcpStream) -> bool {
        let mut req = Vec::new();
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut b = [0u8; 1024];
            let n = sock.read(&mut b).await.unwrap();
            if n == 0 {
                return false;
            }
            req.extend_from_slice(&b[..n]);
        }
        true
    }

    /// Serves `responses` in order, one per request on one connection.
    async fn serve(responses: Vec<&'static [u8]>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            for r in responses {
                if !read_request(&mut sock).await {
                    return;
                }
                // Split the answer to exercise partial reads.
                let mid = r.len() / 2;
                sock.write_all(&r[..mid]).await.unwrap();
                sock.flush().await.unwrap();
                tokio::task::yield_now().await;
                sock.write_all(&r[mid..]).await.unwrap();
            }
        });
        addr
    }

    /// The socket is polled, not awaited: an answer whose second half comes
    /// well after the settle pause (several backoff steps later) is still
    /// read whole, on the same connection.
    #[tokio::test]
    async fn an_answer_arriving_in_late_pieces_is_polled_for() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            for _ in 0..2 {
                if !read_request(&mut sock).await {
                    return;
                }
                sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Le")
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(40)).await;
                sock.write_all(b"ngth: 4\r\n\r\nla").await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
                sock.write_all(b"te").await.unwrap();
            }
        });
        let mut c = MetricsClient::new(addr, "/metrics", 1 << 20);
        assert_eq!(c.fetch(T).await.unwrap(), b"late");
        assert_eq!(c.fetch(T).await.unwrap(), b"late");
    }

    #[tokio::test(start_paused = true)]
    async fn polling_backs_off_to_its_cap_and_stops_at_the_deadline() {
        let start = tokio::time::Instant::now();
        let deadline = start + Duration::from_millis(100);
        let mut b = PollBackoff::new();
        let mut waits = Vec::new();
        let mut last = start;
        while b.wait(deadline, Duration::from_millis(100)).await.is_ok() {
            let now = tokio::time::Instant::now();
            waits.push((now - last).as_millis());
            last = now;
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 16, 16, 16, 16, 5]);
        assert_eq!(tokio::time::Instant::now(), deadline);
    }

    #[tokio::test]
    async fn content_length_chunked_and_keep_alive() {
        let addr = serve(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nX-Trailer: 1\r\n\r\n",
            b"HTTP/1.1 500 Oops\r\nContent-Length: 2\r\n\r\nno",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ])
        .await;
        let mut c = MetricsClient::new(addr, "/metrics", 1 << 20);
        assert_eq!(c.fetch(T).await.unwrap(), b"hello");
        assert_eq!(c.fetch(T).await.unwrap(), b"abcdefg");
        assert!(matches!(c.fetch(T).await, Err(ScrapeError::Status(500))));
        assert_eq!(
            c.fetch(T).await.unwrap(),
            b"ok",
            "same connection after a bad status"
        );
    }

    #[tokio::test]
    async fn body_until_close_and_limits() {
        let addr = serve(vec![b"HTTP/1.0 200 OK\r\n\r\nuntil close"]).await;
        let mut c = MetricsClient::new(addr, "/metrics", 1 << 20);
        assert_eq!(c.fetch(T).await.unwrap(), b"until close");
        assert!(
            c.stream.is_none(),
            "connection dropped after a close-delimited body"
        );

        let addr = serve(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nx"]).await;
        let mut c = MetricsClient::new(addr, "/metrics", 10);
        assert!(matches!(c.fetch(T).await, Err(ScrapeError::TooLarge)));

        let addr = serve(vec![b"garbage\r\n\r\n"]).await;
        let mut c = MetricsClient::new(addr, "/metrics", 10);
        assert!(matches!(c.fetch(T).await, Err(ScrapeError::Malformed(_))));
    }

    #[test]
    fn request_target_with_and_without_a_query() {
        let addr: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let first_line = |r: Vec<u8>| {
            String::from_utf8(r)
                .unwrap()
                .lines()
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            first_line(request(addr, "/metrics", None)),
            "GET /metrics HTTP/1.1"
        );
        assert_eq!(
            first_line(request(addr, "/metrics", Some("name%5B%5D=a"))),
            "GET /metrics?name%5B%5D=a HTTP/1.1"
        );
        assert_eq!(
            first_line(request(addr, "/m?x=1", Some("name%5B%5D=a"))),
            "GET /m?x=1&name%5B%5D=a HTTP/1.1"
        );
        let mut c = MetricsClient::new(addr, "/metrics", 10);
        c.set_filter_query("q=1");
        assert_eq!(first_line(c.request.clone()), "GET /metrics?q=1 HTTP/1.1");
        c.use_filter(false);
        assert_eq!(first_line(c.request.clone()), "GET /metrics HTTP/1.1");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = tokio::spawn(async move { listener.accept().await });
        let mut c = MetricsClient::new(addr, "/metrics", 10);
        let err = c.fetch(std::time::Duration::from_millis(50)).await;
        assert!(
            matches!(err, Err(ScrapeError::Timeout(_))),
            "{:?}",
            err.map(|b| b.len())
        );
        hold.abort();
    }
}
