//! The HTTP connectors under aws-sdk-s3.
//!
//! Most endpoints go through reqwest with rustls, the bundled webpki roots and the PEM
//! certificates of [`crate::http::client_builder`]. The SDK's own client always links
//! the platform's certificate store, which on macOS means the Security framework: a
//! binary cross-built without Apple's SDK cannot link it. reqwest with bundled roots
//! needs no system library anywhere, and the `--url` fetch already uses it, so one
//! HTTP stack serves both.
//!
//! An `http://` endpoint reached without a proxy (Garage's own API, which never speaks
//! TLS) goes through [`PlainHttpConnector`] instead, which acknowledges what it
//! receives at once; see there for why.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;

/// The SDK's view of one reqwest client (which pools its connections).
#[derive(Debug, Clone)]
pub struct ReqwestConnector {
    client: reqwest::Client,
}

impl ReqwestConnector {
    /// Wraps a built client; S3 needs HTTP/1.1 only (parallel requests, not streams),
    /// and the SDK sees redirects itself, as its own client would show them (an
    /// `http://` endpoint is never quietly taken to `https://`).
    pub fn new(builder: reqwest::ClientBuilder) -> anyhow::Result<ReqwestConnector> {
        let client = builder
            .http1_only()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| anyhow::anyhow!("cannot set up the HTTP client: {e}"))?;
        Ok(ReqwestConnector { client })
    }
}

impl HttpConnector for ReqwestConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let client = self.client.clone();
        HttpConnectorFuture::new(async move {
            let request = request
                .try_into_http1x()
                .map_err(|e| ConnectorError::user(e.into()))?
                .map(reqwest::Body::wrap);
            let request =
                reqwest::Request::try_from(request).map_err(|e| ConnectorError::user(e.into()))?;
            let response = client.execute(request).await.map_err(connector_error)?;
            let response = http::Response::from(response).map(SdkBody::from_body_1_x);
            HttpResponse::try_from(response).map_err(|e| ConnectorError::other(e.into(), None))
        })
    }
}

impl HttpClient for ReqwestConnector {
    fn http_connector(
        &self,
        _settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        // Timeouts are set on the client from the same configuration the SDK gets.
        SharedHttpConnector::new(self.clone())
    }
}

/// Sorts a reqwest failure the way the SDK's retry logic expects: timeouts and I/O
/// (connect, reset, TLS) are transient, the rest is not.
fn connector_error(e: reqwest::Error) -> ConnectorError {
    if e.is_timeout() {
        ConnectorError::timeout(e.into())
    } else if e.is_connect() || e.is_request() || e.is_body() {
        ConnectorError::io(e.into())
    } else {
        ConnectorError::other(e.into(), None)
    }
}

/// The SDK's view of a hyper client for an `http://` endpoint reached directly, whose
/// sockets ask for what arrives to be acknowledged at once (`TCP_QUICKACK` before each
/// read).
///
/// Garage does not set `TCP_NODELAY`: it writes a response's headers, then its body
/// from the block it read, and Nagle's algorithm holds that second write until the
/// headers are acknowledged. Linux delays the acknowledgement of a lone segment on a
/// connection in request-response use, typically by 40 ms, so every GET of an object
/// Garage keeps in blocks (over 3 KiB: index segments, manifests, small pack ranges)
/// took 44 ms on loopback instead of 1. An immediate acknowledgement releases the body
/// at once. A server that sets `TCP_NODELAY` (Go's servers do by default, MinIO among
/// them) never waits, and the extra acknowledgements cost it nothing that shows.
#[derive(Debug, Clone)]
pub struct PlainHttpConnector {
    client: hyper_util::client::legacy::Client<QuickAckConnect, SdkBody>,
    read_timeout: Duration,
}

impl PlainHttpConnector {
    /// A client connecting within `connect_timeout` that fails a request whose response
    /// headers do not arrive within `read_timeout` of its start, or whose body then
    /// waits that long for a piece, as reqwest's `read_timeout` does.
    pub fn new(connect_timeout: Duration, read_timeout: Duration) -> PlainHttpConnector {
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        // reqwest's defaults, so a server that vanishes is noticed as soon: idle
        // connections probed every 15 s, unacknowledged data given up after 30 s.
        http.set_keepalive(Some(Duration::from_secs(15)));
        http.set_keepalive_interval(Some(Duration::from_secs(15)));
        http.set_keepalive_retries(Some(3));
        #[cfg(target_os = "linux")]
        http.set_tcp_user_timeout(Some(Duration::from_secs(30)));
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(QuickAckConnect(http));
        PlainHttpConnector {
            client,
            read_timeout,
        }
    }
}

impl HttpConnector for PlainHttpConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let (client, read_timeout) = (self.client.clone(), self.read_timeout);
        HttpConnectorFuture::new(async move {
            let request = request
                .try_into_http1x()
                .map_err(|e| ConnectorError::user(e.into()))?;
            let response = tokio::time::timeout(read_timeout, client.request(request))
                .await
                .map_err(|_| ConnectorError::timeout(timed_out().into()))?
                .map_err(connection_error)?;
            let response = response
                .map(|body| SdkBody::from_body_1_x(ReadTimeoutBody::new(body, read_timeout)));
            HttpResponse::try_from(response).map_err(|e| ConnectorError::other(e.into(), None))
        })
    }
}

/// Sorts a hyper client failure as [`connector_error`] sorts reqwest's: all of them are
/// transient, as connecting, sending and a connection closed or reset under a request
/// are. (Its other failures are about requests it cannot send, a relative URI or an
/// HTTP version it lacks, which the SDK never builds.)
fn connection_error(e: hyper_util::client::legacy::Error) -> ConnectorError {
    ConnectorError::io(e.into())
}

impl HttpClient for PlainHttpConnector {
    fn http_connector(
        &self,
        _settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(self.clone())
    }
}

/// hyper's TCP connector, its connections wrapped in [`QuickAck`].
#[derive(Debug, Clone)]
struct QuickAckConnect(hyper_util::client::legacy::connect::HttpConnector);

type TcpIo = hyper_util::rt::TokioIo<tokio::net::TcpStream>;

impl tower_service::Service<http::Uri> for QuickAckConnect {
    type Response = QuickAck;
    type Error = <hyper_util::client::legacy::connect::HttpConnector as tower_service::Service<
        http::Uri,
    >>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<QuickAck, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move { connecting.await.map(QuickAck) })
    }
}

/// A TCP connection that asks for an immediate acknowledgement before every read (see
/// [`PlainHttpConnector`]). Linux drops the request once the connection looks
/// interactive again, so it is made each time; elsewhere there is no such option.
struct QuickAck(TcpIo);

impl QuickAck {
    fn ask(&self) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let on: libc::c_int = 1;
            // SAFETY: a valid socket, and an int option of the size given. A failure
            // only means the old behaviour, so it is ignored.
            unsafe {
                libc::setsockopt(
                    self.0.inner().as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_QUICKACK,
                    (&raw const on).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
}

impl hyper::rt::Read for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.ask();
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl hyper_util::client::legacy::connect::Connection for QuickAck {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.0.connected()
    }
}

/// A response that made no progress for the read timeout (worded as reqwest words it).
fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "operation timed out")
}

/// A response body that fails once it has been waited on for `timeout` without a
/// piece arriving (as reqwest's: time the reader spends elsewhere does not count).
struct ReadTimeoutBody {
    body: hyper::body::Incoming,
    timeout: Duration,
    /// Armed when a read finds nothing yet, cleared when a piece arrives.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl ReadTimeoutBody {
    fn new(body: hyper::body::Incoming, timeout: Duration) -> ReadTimeoutBody {
        ReadTimeoutBody {
            body,
            timeout,
            deadline: None,
        }
    }
}

impl http_body::Body for ReadTimeoutBody {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            this.deadline = None;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let timeout = this.timeout;
        let deadline = this
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(timed_out().into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
