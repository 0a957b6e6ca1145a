//! HTTP: the client settings shared by the S3 connector and `download --url`, and the
//! `--url` fetch itself (a streamed GET into a temp file, hashed on the way).

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;

use crate::ui::Progress;

/// The usual CA bundle files of Linux distributions (Debian and Ubuntu, Fedora and
/// RHEL, openSUSE, Alpine); the first that exists is the system store.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];
/// Where Linux keeps CA certificates one per file, used when no bundle file exists.
const SYSTEM_CERT_DIR: &str = "/etc/ssl/certs";

/// Certificates trusted on top of the bundled webpki roots, read once per process:
/// `SSL_CERT_FILE` and `SSL_CERT_DIR` (on every platform, as OpenSSL and the Go tool
/// read them) and, on Linux, the system store, so an endpoint behind a company CA the
/// runner trusts works without configuration. Files are read as PEM; nothing links a
/// system library. Unreadable or malformed files are skipped (`-v` says which).
fn system_roots() -> &'static [reqwest::Certificate] {
    static ROOTS: std::sync::OnceLock<Vec<reqwest::Certificate>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut files: Vec<std::path::PathBuf> = Vec::new();
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        if let Some(file) = var("SSL_CERT_FILE") {
            files.push(file.into());
        }
        let mut dirs: Vec<std::path::PathBuf> = var("SSL_CERT_DIR")
            .map(|d| std::env::split_paths(&d).collect())
            .unwrap_or_default();
        if cfg!(target_os = "linux") {
            match SYSTEM_BUNDLES.iter().map(Path::new).find(|p| p.is_file()) {
                Some(bundle) => files.push(bundle.to_path_buf()),
                None => dirs.push(SYSTEM_CERT_DIR.into()),
            }
        }
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut found: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            found.sort();
            files.extend(found.into_iter().filter(|p| p.is_file()));
        }
        let mut roots = Vec::new();
        for file in files {
            match std::fs::read(&file).map(|pem| reqwest::Certificate::from_pem_bundle(&pem)) {
                Ok(Ok(certs)) => roots.extend(certs),
                Ok(Err(e)) => crate::ui::verbose(format!("skipping {}: {e}", file.display())),
                Err(e) => crate::ui::verbose(format!("cannot read {}: {e}", file.display())),
            }
        }
        roots
    })
}

/// Whether requests to `url` never speak TLS: an `http://` URL reached without a
/// proxy (which may itself be an `https://` one).
pub fn plain_http(url: &str) -> bool {
    let proxied = ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|p| !p.is_empty()));
    url.starts_with("http://") && !proxied
}

/// A reqwest client trusting the bundled webpki roots, the system's and
/// `SSL_CERT_FILE`/`SSL_CERT_DIR` certificates ([`system_roots`]) unless `plain_http`
/// (an endpoint that never speaks TLS need not read them: a few milliseconds of every
/// command), and the PEM certificates `ca` (`ca_bundle`).
pub fn client_builder(
    ca: Option<&[u8]>,
    plain_http: bool,
    connect_timeout: Duration,
    read_timeout: Option<Duration>,
) -> anyhow::Result<reqwest::ClientBuilder> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("cacher/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true);
    if let Some(timeout) = read_timeout {
        builder = builder.read_timeout(timeout);
    }
    let system = if plain_http { &[][..] } else { system_roots() };
    for cert in system {
        builder = builder.add_root_certificate(cert.clone());
    }
    if let Some(pem) = ca {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| anyhow::anyhow!("bad ca_bundle: {e}"))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder)
}

/// A fetched URL: the temp file holding it and its sha256.
pub struct Fetched {
    /// The content, in a temp file beside the destination.
    pub file: NamedTempFile,
    /// Lowercase hex sha256 of the content.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// GETs `url` into a temp file beside `dest`, trusting the PEM certificates `ca` on top
/// of the built-in roots. Fails on any non-2xx status, a body shorter than its
/// Content-Length, or a connection that makes no progress for `timeout`.
pub async fn fetch(
    url: &str,
    dest: &Path,
    ca: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<Fetched> {
    // Not plain: a server may redirect to https.
    let client = client_builder(ca, false, Duration::from_secs(15), Some(timeout))?
        .build()
        .context("cannot set up the HTTP client")?;
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("GET {url}: {}", network_cause(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        bail!("GET {url}: HTTP {status}");
    }
    let expected_len = resp.content_length();
    let mut tmp = crate::temp::temp_beside(dest)?;
    let progress = Progress::new(format!("fetching {url}"), expected_len.unwrap_or(0));
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| anyhow::anyhow!("GET {url}: {}", without_url(&e)))?;
        hasher.update(&chunk);
        tmp.write_all(&chunk)
            .with_context(|| format!("cannot write beside {}", dest.display()))?;
        size += chunk.len() as u64;
        progress.add(chunk.len() as u64);
    }
    if let Some(len) = expected_len
        && len != size
    {
        bail!("GET {url}: the body ended after {size} of {len} bytes");
    }
    tmp.flush()?;
    progress.finish("fetched", url, "");
    Ok(Fetched {
        file: tmp,
        sha256: hex::encode(hasher.finalize()),
        size,
    })
}

/// Why a request could not reach its server, in a few plain words (`connection
/// refused`, `cannot resolve the host name`, `invalid peer certificate: UnknownIssuer`,
/// `timed out`), found in the error's causes; never a debug dump.
pub fn network_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut causes: Vec<&(dyn std::error::Error + 'static)> = vec![err];
    while let Some(next) = causes.last().and_then(|e| e.source()) {
        causes.push(next);
    }
    for cause in &causes {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return "connection refused".into(),
                std::io::ErrorKind::ConnectionReset => return "connection reset".into(),
                std::io::ErrorKind::TimedOut => return "timed out".into(),
                _ => {}
            }
        }
    }
    let texts: Vec<String> = causes.iter().map(|c| c.to_string()).collect();
    if let Some(tls) = texts.iter().find_map(|t| {
        t.find("invalid peer certificate")
            .map(|i| t[i..].split(" (").next().unwrap_or_default().to_string())
    }) {
        return tls;
    }
    if texts
        .iter()
        .any(|t| t.contains("dns error") || t.contains("failed to lookup address"))
    {
        return "cannot resolve the host name".into();
    }
    if texts.iter().any(|t| t.contains("timed out")) {
        return "timed out".into();
    }
    // The innermost cause, unless it is a debug rendering.
    let inner = texts
        .iter()
        .rev()
        .find(|t| !t.contains('{') && !t.is_empty())
        .cloned()
        .unwrap_or_else(|| "network error".into());
    inner.chars().take(200).collect()
}

/// reqwest's errors repeat the URL, which the caller already names.
fn without_url(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    if let Some(url) = e.url() {
        msg = msg.replace(&format!(" ({url})"), "");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}
