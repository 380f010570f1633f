//! The admin HTTP endpoint on `admin.listen`: `GET /metrics` (Prometheus
//! text), `GET /healthz` (alive), `GET /readyz` (JSON, 200 or 503) and
//! `POST /reload` (JSON, 200 or 422). HTTP/1.1 on hyper; one small task per
//! connection, apart from the sessions' worker threads.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::health;
use super::metrics::{metrics, CONTENT_TYPE};
use super::reload::Reloader;

/// How long one admin connection may stay open (scrapes are short).
const CONNECTION_LIMIT: Duration = Duration::from_secs(30);
/// Admin connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;

/// Serves the admin endpoint until `shutdown` fires.
pub async fn serve(listener: TcpListener, reloader: Arc<Reloader>, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => return,
        };
        let (socket, _) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "admin endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("admin endpoint: too many connections; one closed");
            continue;
        };
        let reloader = reloader.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let reloader = reloader.clone();
                async move { Ok::<_, Infallible>(route(req, &reloader).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service);
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIMIT, conn).await {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

async fn route(req: Request<Incoming>, reloader: &Reloader) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => respond(StatusCode::OK, CONTENT_TYPE, metrics().render()),
        (&Method::GET, "/healthz") => json(StatusCode::OK, &serde_json::json!({"status": "alive"})),
        (&Method::GET, "/readyz") => {
            let readiness = health::readiness(reloader.context(), reloader.last_outcome()).await;
            let status = if readiness.ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(status, &readiness)
        }
        (&Method::POST, "/reload") => match reloader.reload().await {
            Ok(()) => json(StatusCode::OK, &serde_json::json!({"outcome": "ok"})),
            Err(e) => json(
                StatusCode::UNPROCESSABLE_ENTITY,
                &serde_json::json!({"outcome": "error", "error": e.to_string()}),
            ),
        },
        (_, "/metrics" | "/healthz" | "/readyz" | "/reload") => respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".to_owned(),
        ),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    }
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let text = serde_json::to_string(body).unwrap_or_else(|_| "{}".to_owned());
    respond(status, "application/json", text)
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}
