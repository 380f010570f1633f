//! Running the proxy in production. `metrics` is a leaf every layer counts
//! into; the rest sits above `proxy/` beside the CLI: the admin HTTP
//! endpoint (`/metrics`, `/healthz`, `/readyz`, `POST /reload`), the
//! readiness checks and configuration reload. Nothing here touches SQL,
//! cells or keys.

pub mod admin_http;
pub mod health;
pub mod metrics;
pub mod reload;
