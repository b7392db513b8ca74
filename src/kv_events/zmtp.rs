//! A minimal ZeroMQ (ZMTP 3.0, NULL security) client: the SUB and DEALER
//! sides of what a vLLM publisher serves, over a tokio `TcpStream`.
//!
//! Why our own rather than a crate: the bindings (`zmq`) need libzmq and a C
//! toolchain; the pure-Rust `zeromq` crate trusts a peer's frame length
//! (a non-ZeroMQ peer announcing a 2^40-byte frame makes it reserve that
//! much) and its current release needs a newer Rust than this workspace's.
//! The client side of ZMTP is small: a 64-byte greeting each way, a READY
//! command each way, then frames. We announce version 3.0, whose
//! subscriptions are plain messages (`0x01` + topic), which every ZMTP 3.x
//! publisher accepts. The tests talk to the `zeromq` crate's PUB and ROUTER.
//!
//! Bounds: a frame longer than `max_message`, a message of more than
//! [`MAX_FRAMES`] frames or larger than `max_message` in total is an error
//! (the connection is dropped), so a peer cannot make us buffer more.
//!
//! Stalls: a publisher sends nothing while its engine is idle, so waiting
//! for the first byte of a message has no deadline. Once it has come, the
//! rest of the message (every frame, and any command in front of it) must
//! follow within the connection's timeout, as must the handshake; a peer
//! that stops mid-message is an error ([`Error::Stalled`]) and the
//! connection is dropped, so half a frame never holds a subscription.

use std::{net::SocketAddr, ops::Range, time::Duration};

use super::error::{Error, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter},
    net::TcpStream,
};

/// Frames accepted in one message (vLLM sends 3).
pub const MAX_FRAMES: usize = 8;

/// One connected socket.
#[derive(Debug)]
pub struct Connection {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    max_message: usize,
    /// How long the rest of a message may take once it has begun.
    stall: Duration,
}

/// A received message: its bytes and where each frame lies in them.
#[derive(Debug, Default)]
pub struct Message {
    pub data: Vec<u8>,
    pub frames: Vec<Range<usize>>,
}

impl Message {
    pub fn frame(&self, i: usize) -> Option<&[u8]> {
        self.frames.get(i).map(|r| &self.data[r.clone()])
    }
}

fn greeting() -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[11] = 0;
    g[12..16].copy_from_slice(b"NULL");
    g
}

impl Connection {
    /// Connects and completes the handshake as `socket_type` ("SUB" or
    /// "DEALER") within `timeout`, which then also bounds each message once
    /// begun.
    pub async fn connect(
        addr: SocketAddr,
        socket_type: &str,
        timeout: Duration,
        max_message: usize,
    ) -> Result<Self> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| Error::Connect(std::io::Error::from(std::io::ErrorKind::TimedOut)))?
            .map_err(Error::Connect)?;
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        let mut c = Self {
            reader: BufReader::with_capacity(64 << 10, r),
            writer: BufWriter::new(w),
            max_message,
            stall: timeout,
        };
        tokio::time::timeout(timeout, c.handshake(socket_type))
            .await
            .map_err(|_| Error::HandshakeTimeout)??;
        Ok(c)
    }

    async fn handshake(&mut self, socket_type: &str) -> Result<()> {
        self.writer.write_all(&greeting()).await?;
        self.writer.flush().await?;
        let mut peer = [0u8; 64];
        self.reader.read_exact(&mut peer[..11]).await?;
        if peer[0] != 0xff || peer[9] != 0x7f || peer[10] < 3 {
            return Err(Error::NotZmtp);
        }
        self.reader.read_exact(&mut peer[11..]).await?;
        if &peer[12..16] != b"NULL" || peer[16..32].iter().any(|&b| b != 0) {
            return Err(Error::NotZmtp);
        }
        // READY: name, then properties (name-len u8, name, value-len u32 BE, value).
        let mut body = Vec::with_capacity(32);
        body.push(5);
        body.extend_from_slice(b"READY");
        body.push(11);
        body.extend_from_slice(b"Socket-Type");
        body.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
        body.extend_from_slice(socket_type.as_bytes());
        self.write_frame(0x04, &body).await?;
        self.writer.flush().await?;
        let mut msg = Message::default();
        let command = self.read_frame(&mut msg).await?;
        if command & 0x04 == 0 || msg.frame(0).is_none_or(|f| !f.starts_with(b"\x05READY")) {
            return Err(Error::NotZmtp);
        }
        Ok(())
    }

    async fn write_frame(&mut self, flags: u8, body: &[u8]) -> Result<()> {
        if body.len() > 255 {
            self.writer.write_all(&[flags | 0x02]).await?;
            self.writer
                .write_all(&(body.len() as u64).to_be_bytes())
                .await?;
        } else {
            self.writer.write_all(&[flags, body.len() as u8]).await?;
        }
        self.writer.write_all(body).await?;
        Ok(())
    }

    /// Sends one message.
    pub async fn send(&mut self, frames: &[&[u8]]) -> Result<()> {
        for (i, f) in frames.iter().enumerate() {
            let more = if i + 1 < frames.len() { 0x01 } else { 0 };
            self.write_frame(more, f).await?;
        }
        self.writer.flush().await?;
        Ok(())
    }

    /// Subscribes to messages whose first frame starts with `topic`.
    pub async fn subscribe(&mut self, topic: &[u8]) -> Result<()> {
        let mut m = Vec::with_capacity(topic.len() + 1);
        m.push(1);
        m.extend_from_slice(topic);
        self.send(&[&m]).await
    }

    /// Appends one frame to `msg`; returns its flags.
    async fn read_frame(&mut self, msg: &mut Message) -> Result<u8> {
        let flags = self.reader.read_u8().await?;
        let len = if flags & 0x02 != 0 {
            self.reader.read_u64().await?
        } else {
            u64::from(self.reader.read_u8().await?)
        };
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > self.max_message.saturating_sub(msg.data.len()) || msg.frames.len() >= MAX_FRAMES {
            return Err(Error::TooLarge(self.max_message));
        }
        let start = msg.data.len();
        msg.data.resize(start + len, 0);
        self.reader.read_exact(&mut msg.data[start..]).await?;
        msg.frames.push(start..start + len);
        Ok(flags)
    }

    /// Receives the next message into `msg` (cleared first), skipping
    /// commands (PING and the like). Waits for the first byte of a message
    /// or command as long as it takes; the rest must follow within the
    /// stall timeout.
    pub async fn recv(&mut self, msg: &mut Message) -> Result<()> {
        msg.data.clear();
        msg.frames.clear();
        let stall = self.stall;
        loop {
            if self.reader.fill_buf().await?.is_empty() {
                return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            let complete = tokio::time::timeout(stall, self.recv_rest(msg))
                .await
                .map_err(|_| Error::Stalled(stall))??;
            if complete {
                return Ok(());
            }
        }
    }

    /// Reads one message (true) or one command, dropped (false).
    async fn recv_rest(&mut self, msg: &mut Message) -> Result<bool> {
        loop {
            let flags = self.read_frame(msg).await?;
            if flags & 0x04 != 0 {
                // A command between messages: drop it.
                if let Some(r) = msg.frames.pop() {
                    msg.data.truncate(r.start);
                }
                if msg.frames.is_empty() {
                    return Ok(false);
                }
                continue;
            }
            if flags & 0x01 == 0 {
                return Ok(true);
            }
        }
    }
}
