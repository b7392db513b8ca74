//! The subsystem's one error type.
//!
//! Two kinds of failure, told apart by [`Error::kind`] because the
//! subscriber reacts differently: a payload that does not decode loses one
//! batch (the rank's entries are dropped until events resume), while a
//! transport failure loses the connection (reconnect with backoff, replay the
//! gap). Malformed MessagePack and a schema violation are both "decode";
//! everything on the socket is "transport", and of that, a peer that breaks
//! the protocol (not ZeroMQ, an oversized or stalled message) is counted
//! apart from plain I/O errors.

/// Which counter a failure belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The payload: malformed MessagePack or not a KV-event batch.
    Decode,
    /// The peer broke the protocol (not ZeroMQ, oversized, stalled mid-message).
    Protocol,
    /// The connection: refused, reset, timed out connecting.
    Io,
}

/// What went wrong in KV-event ingest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("malformed msgpack: payload ends inside a value")]
    Truncated,
    #[error("malformed msgpack: expected {expected}, found marker 0x{marker:02x}")]
    Type { expected: &'static str, marker: u8 },
    #[error("malformed msgpack: integer out of range")]
    Range,
    #[error("malformed msgpack: reserved marker 0xc1")]
    Reserved,
    #[error("not a KV-event batch: {0}")]
    Schema(&'static str),
    #[error("connect")]
    Connect(#[source] std::io::Error),
    #[error("i/o")]
    Io(#[from] std::io::Error),
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("peer stalled for {0:?} inside a message")]
    Stalled(std::time::Duration),
    #[error("peer is not a ZeroMQ 3.x socket with NULL security")]
    NotZmtp,
    #[error("message over {0} bytes or {max} frames", max = super::zmtp::MAX_FRAMES)]
    TooLarge(usize),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Truncated
            | Self::Type { .. }
            | Self::Range
            | Self::Reserved
            | Self::Schema(_) => ErrorKind::Decode,
            Self::HandshakeTimeout | Self::Stalled(_) | Self::NotZmtp | Self::TooLarge(_) => {
                ErrorKind::Protocol
            }
            Self::Connect(_) | Self::Io(_) => ErrorKind::Io,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_kinds() {
        let e = Error::Type {
            expected: "array",
            marker: 0xc3,
        };
        assert_eq!(
            e.to_string(),
            "malformed msgpack: expected array, found marker 0xc3"
        );
        assert_eq!(e.kind(), ErrorKind::Decode);
        assert_eq!(
            Error::TooLarge(10).to_string(),
            "message over 10 bytes or 8 frames"
        );
        assert_eq!(Error::NotZmtp.kind(), ErrorKind::Protocol);
        let io = Error::Connect(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(io.kind(), ErrorKind::Io);
        assert!(
            std::error::Error::source(&io).is_some(),
            "the cause stays in the chain"
        );
    }
}
