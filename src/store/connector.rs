//! The HTTP connector under aws-sdk-s3: reqwest with rustls, the bundled webpki roots
//! and the PEM certificates of [`crate::http::client_builder`].
//!
//! The SDK's own client always links the platform's certificate store, which on macOS
//! means the Security framework: a binary cross-built without Apple's SDK cannot link
//! it. reqwest with bundled roots needs no system library anywhere, and the `--url`
//! fetch already uses it, so one HTTP stack serves both.

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
