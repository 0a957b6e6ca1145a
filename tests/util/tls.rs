//! An https front on loopback: a TLS-terminating proxy to any plain TCP server (the S3
//! server, the HTTP server), with a certificate signed by a throwaway CA that `openssl`
//! makes per front, for the `ca_bundle` tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;

/// A running front; it stops with the test process.
pub struct TlsFront {
    /// `https://127.0.0.1:<port>`.
    pub endpoint: String,
    /// The CA certificate (PEM) that signed the front's certificate.
    pub ca_pem: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsFront {
    /// Starts a front forwarding every connection to `upstream` (`http://host:port`).
    pub fn start(upstream: &str) -> TlsFront {
        let dir = tempfile::tempdir().expect("temp dir");
        crate::util::sh(
            r#"set -e
            ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
            openssl req -x509 $ec -keyout ca.key -out ca.pem -days 2 -subj "/CN=cacher test CA" \
              -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
            openssl req $ec -keyout server.key -out server.csr -subj "/CN=127.0.0.1" 2>/dev/null
            printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > ext
            openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
              -out server.pem -days 2 -extfile ext 2>/dev/null"#,
            dir.path(),
        );
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.path().join("server.pem"))
                .expect("server.pem")
                .collect::<Result<_, _>>()
                .expect("server certificate");
        let key = PrivateKeyDer::from_pem_file(dir.path().join("server.key")).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server TLS config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .parse()
            .expect("upstream host:port");

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let endpoint = format!("https://{}", listener.local_addr().expect("addr"));
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                while let Ok((client, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        // A client refusing the certificate ends the handshake: nothing to do.
                        let Ok(mut tls) = acceptor.accept(client).await else {
                            return;
                        };
                        if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                        }
                    });
                }
            });
        });
        TlsFront {
            endpoint,
            ca_pem: dir.path().join("ca.pem"),
            _dir: dir,
        }
    }
}
