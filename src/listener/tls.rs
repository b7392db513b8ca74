//! TLS for the ext_proc port.
//!
//! The gateway connects with TLS and, by convention, without verifying the
//! certificate, so by default a self-signed certificate is made in process.
//! ALPN must offer `h2`: Envoy's ext_proc client refuses a TLS connection that
//! does not negotiate HTTP/2 (a failure seen on GKE deployments).
//!
//! With `--cert-path`, `tls.crt` and `tls.key` are loaded from that directory;
//! with `--enable-cert-reload` they are re-read when they change (polled, as
//! Kubernetes Secret mounts are updated by symlink swap), and new connections
//! use the new pair while existing ones keep theirs.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{
    ServerConfig,
    crypto::ring::sign::any_supported_type,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{
    net::TcpStream,
    sync::{mpsc, watch},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use super::Listener;
use crate::telemetry::logging::chain;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no usable PEM")]
    Pem {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path}: no certificate found")]
    NoCertificate { path: String },
    #[error("certificate generation failed")]
    Generate(#[source] rcgen::Error),
    #[error("unusable key")]
    Key(#[source] rustls::Error),
}

/// A certificate resolver whose key pair can be swapped at runtime.
pub struct ReloadableCert {
    current: ArcSwap<CertifiedKey>,
}

impl fmt::Debug for ReloadableCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReloadableCert")
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn certified_key(cert_pem: &[u8], key_pem: &[u8], origin: &str) -> Result<CertifiedKey, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Pem {
            path: origin.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: origin.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsError::Pem {
        path: origin.to_owned(),
        source,
    })?;
    let signing = any_supported_type(&key).map_err(TlsError::Key)?;
    Ok(CertifiedKey::new(certs, signing))
}

/// A fresh self-signed certificate for the picker.
pub fn self_signed() -> Result<CertifiedKey, TlsError> {
    let ck = rcgen::generate_simple_self_signed(vec![
        "localhost".to_owned(),
        "epp".to_owned(),
        "127.0.0.1".to_owned(),
    ])
    .map_err(TlsError::Generate)?;
    certified_key(
        ck.cert.pem().as_bytes(),
        ck.signing_key.serialize_pem().as_bytes(),
        "self-signed",
    )
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Loads `tls.crt` and `tls.key` from a directory.
pub fn load_dir(dir: &Path) -> Result<CertifiedKey, TlsError> {
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    certified_key(&read(&crt)?, &read(&key)?, &crt.display().to_string())
}

/// The TLS side of the ext_proc listener.
#[derive(Clone)]
pub struct TlsSetup {
    resolver: Arc<ReloadableCert>,
    acceptor: TlsAcceptor,
}

impl fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsSetup")
    }
}

impl TlsSetup {
    pub fn new(initial: CertifiedKey) -> Result<Self, TlsError> {
        let resolver = Arc::new(ReloadableCert {
            current: ArcSwap::from_pointee(initial),
        });
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(TlsError::Key)?
                .with_no_client_auth()
                .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Replaces the certificate for new connections.
    pub fn replace(&self, key: CertifiedKey) {
        self.resolver.current.store(Arc::new(key));
    }

    /// Accepts TCP connections, completes handshakes concurrently (a slow
    /// client never blocks others) and yields the TLS streams.
    pub fn incoming(
        &self,
        mut listener: Listener,
        mut shutdown: watch::Receiver<bool>,
    ) -> TlsIncoming {
        let (tx, rx) = mpsc::channel(128);
        let acceptor = self.acceptor.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    s = listener.accept() => s,
                    _ = crate::shutdown::requested(&mut shutdown) => return,
                    _ = tx.closed() => return,
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
            }
        });
        TlsIncoming(rx)
    }

    /// Re-reads `dir` every `interval` and swaps the certificate when the
    /// files change and parse; a bad pair keeps the previous one.
    pub async fn reload_loop(
        self,
        dir: PathBuf,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut last = file_stamp(&dir);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = crate::shutdown::requested(&mut shutdown) => return,
            }
            let stamp = file_stamp(&dir);
            if stamp == last {
                continue;
            }
            match load_dir(&dir) {
                Ok(key) => {
                    self.replace(key);
                    last = stamp;
                    tracing::info!(dir = %dir.display(), "TLS certificate reloaded");
                }
                Err(e) => {
                    tracing::warn!(error = %chain(&e), "TLS certificate reload failed; keeping the current one")
                }
            }
        }
    }
}

/// Completed TLS handshakes, as a stream for tonic's `serve_with_incoming`.
pub struct TlsIncoming(mpsc::Receiver<Result<TlsStream<TcpStream>, std::io::Error>>);

impl futures_util::Stream for TlsIncoming {
    type Item = Result<TlsStream<TcpStream>, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// Contents of both files: cheap for PEM files, and robust to symlink swaps
/// that keep modification times.
fn file_stamp(dir: &Path) -> Option<(Vec<u8>, Vec<u8>)> {
    Some((
        std::fs::read(dir.join("tls.crt")).ok()?,
        std::fs::read(dir.join("tls.key")).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_and_directory_certificates() {
        let key = self_signed().unwrap();
        assert_eq!(key.cert.len(), 1);

        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["x".to_owned()]).unwrap();
        std::fs::write(dir.path().join("tls.crt"), ck.cert.pem()).unwrap();
        std::fs::write(dir.path().join("tls.key"), ck.signing_key.serialize_pem()).unwrap();
        assert!(load_dir(dir.path()).is_ok());

        std::fs::write(dir.path().join("tls.key"), "not a key").unwrap();
        assert!(matches!(load_dir(dir.path()), Err(TlsError::Pem { .. })));
        assert!(matches!(
            load_dir(Path::new("/nonexistent")),
            Err(TlsError::Read { .. })
        ));
    }
}
