//! The HTTPS listener's certificate: loaded at start-up, served to every handshake, and
//! replaced while the proxy runs when its files change.
//!
//! [`ServerTls::watch`] re-reads the certificate and key files every poll interval and
//! on `SIGHUP` (as the tenants file is reloaded). A pair whose bytes changed is parsed
//! and checked (the key must belong to the certificate) before it replaces the served
//! one; a bad pair, e.g. a certificate written before its key, is logged and the old
//! one stays, so rotating both files in any order never interrupts the listener.
//! Handshakes in flight keep the certificate they started with.
//!
//! ALPN offers `h2` and `http/1.1`; the connection is then served by hyper's
//! auto-detecting builder like a plain one.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::tls;

/// One loaded certificate/key pair and the bytes it came from.
struct Loaded {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    certified: Arc<CertifiedKey>,
}

/// The listener's TLS state: the files, the pair served now, the acceptor.
pub struct ServerTls {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: Arc<ArcSwap<Loaded>>,
    acceptor: TlsAcceptor,
}

/// Serves whatever pair is current.
#[derive(Debug)]
struct CurrentCert(Arc<ArcSwap<Loaded>>);

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Loaded")
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.load().certified))
    }
}

impl ServerTls {
    /// Loads the pair; an unreadable file or a key of another certificate is an error
    /// (start-up refuses it).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<ServerTls, String> {
        let loaded = load_pair(cert_path, key_path)?;
        let current = Arc::new(ArcSwap::from_pointee(loaded));
        let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(CurrentCert(Arc::clone(&current))));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            current,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Re-reads the files. `Ok(true)`: a new pair is served; `Ok(false)`: the files are
    /// unchanged; `Err`: the new pair is refused and the old one stays.
    pub fn reload(&self) -> Result<bool, String> {
        let cert_pem = tls::read_pem_file(&self.cert_path)?;
        let key_pem = tls::read_pem_file(&self.key_path)?;
        let now = self.current.load();
        if now.cert_pem == cert_pem && now.key_pem == key_pem {
            return Ok(false);
        }
        let loaded = parse_pair(cert_pem, key_pem)?;
        self.current.store(Arc::new(loaded));
        Ok(true)
    }

    /// Reloads every `poll` and on `SIGHUP`, logging what happened.
    pub fn watch(self: &Arc<Self>, poll: Duration) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            #[cfg(unix)]
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                #[cfg(unix)]
                match hup.as_mut() {
                    Some(h) => tokio::select! {
                        _ = tick.tick() => {},
                        _ = h.recv() => {},
                    },
                    None => {
                        tick.tick().await;
                    }
                }
                #[cfg(not(unix))]
                tick.tick().await;
                match me.reload() {
                    Ok(false) => {}
                    Ok(true) => tracing::info!(
                        tls.cert = %me.cert_path.display(),
                        "tls certificate reloaded"
                    ),
                    Err(e) => tracing::error!(
                        tls.cert = %me.cert_path.display(),
                        error = %e,
                        "tls certificate reload refused; keeping the served certificate"
                    ),
                }
            }
        });
    }
}

fn load_pair(cert_path: &Path, key_path: &Path) -> Result<Loaded, String> {
    let cert_pem = tls::read_pem_file(cert_path)?;
    let key_pem = tls::read_pem_file(key_path)?;
    parse_pair(cert_pem, key_pem)
}

fn parse_pair(cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Result<Loaded, String> {
    let chain = tls::parse_certs(&cert_pem).map_err(|m| format!("certificate: {m}"))?;
    let key = tls::parse_key(&key_pem).map_err(|m| format!("key: {m}"))?;
    let certified =
        CertifiedKey::from_der(chain, key, &tls::provider()).map_err(|e| tls::key_error(&e))?;
    Ok(Loaded {
        cert_pem,
        key_pem,
        certified: Arc::new(certified),
    })
}

/// An accepted connection, plain or TLS, as one type for hyper.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn served(tls: &ServerTls) -> Vec<u8> {
        tls.current.load().certified.cert[0].as_ref().to_vec()
    }

    #[test]
    fn a_changed_pair_replaces_the_served_one_and_a_bad_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let (c1, k1) = pair("one.test");
        std::fs::write(&cert_path, &c1).unwrap();
        std::fs::write(&key_path, &k1).unwrap();
        let tls = ServerTls::load(&cert_path, &key_path).unwrap();
        let first = served(&tls);
        assert!(!tls.reload().unwrap(), "unchanged files are not reloaded");

        // The certificate is written before its key: refused, the old pair stays.
        let (c2, k2) = pair("two.test");
        std::fs::write(&cert_path, &c2).unwrap();
        let e = tls.reload().unwrap_err();
        assert!(e.contains("does not belong"), "{e}");
        assert_eq!(served(&tls), first);

        // Then the key: the new pair is served.
        std::fs::write(&key_path, &k2).unwrap();
        assert!(tls.reload().unwrap());
        let second = served(&tls);
        assert_ne!(second, first);
        assert_eq!(
            second,
            tls::parse_certs(c2.as_bytes()).unwrap()[0]
                .as_ref()
                .to_vec()
        );

        // A broken file and a missing one keep the served pair too.
        std::fs::write(&key_path, "-----BEGIN PRIVATE KEY-----\nAAAA\n").unwrap();
        assert!(tls.reload().is_err());
        std::fs::remove_file(&key_path).unwrap();
        assert!(tls.reload().is_err());
        assert_eq!(served(&tls), second);
    }

    #[test]
    fn start_up_refuses_a_mismatched_pair() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let (c1, _) = pair("one.test");
        let (_, k2) = pair("two.test");
        std::fs::write(&cert_path, &c1).unwrap();
        std::fs::write(&key_path, &k2).unwrap();
        let Err(e) = ServerTls::load(&cert_path, &key_path) else {
            panic!("a key of another certificate was accepted");
        };
        assert!(e.contains("does not belong"), "{e}");
    }
}
