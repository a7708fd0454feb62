//! The REST admin API (axum), its OpenAPI document (utoipa, generated from the same types the
//! handlers use) and its error shape.
//!
//! - [`error`]: `ApiError` -> `{"error": {"code", "message", "field"}}`.
//! - [`auth`]: bearer tokens, 401 vs 403.
//! - [`handlers`]: one function per route.

pub mod auth;
pub mod error;
pub mod handlers;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

use crate::config::{ApiConfig, Tokens};
use crate::heads::Heads;
use crate::metrics::Metrics;
use crate::registry::Registry;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// etcd.
    pub registry: Registry,
    /// Chain heads.
    pub heads: Heads,
    /// Limits.
    pub api: ApiConfig,
    /// Subject patterns of the JetStream stream.
    pub stream_subjects: Vec<String>,
    /// Metrics.
    pub metrics: Metrics,
    /// When the process started.
    pub started: Instant,
}

/// The OpenAPI document of `/v1`.
#[derive(OpenApi)]
#[openapi(
    info(title = "herald admin API", description = "Register contract-event subscriptions and operate them."),
    paths(
        handlers::create_subscription,
        handlers::list_subscriptions,
        handlers::get_subscription,
        handlers::delete_subscription,
        handlers::pause_subscription,
        handlers::resume_subscription,
        handlers::rewind_subscription,
        handlers::list_workers,
        handlers::drain_worker,
        handlers::list_chains,
    ),
    components(schemas(error::ErrorBody, error::ErrorDetail)),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The whole HTTP surface.
pub fn router(state: AppState, tokens: Tokens) -> Router {
    let v1 = Router::new()
        .route("/v1/subscriptions", post(handlers::create_subscription).get(handlers::list_subscriptions))
        .route(
            "/v1/subscriptions/{id}",
            get(handlers::get_subscription).delete(handlers::delete_subscription),
        )
        .route("/v1/subscriptions/{id}/pause", post(handlers::pause_subscription))
        .route("/v1/subscriptions/{id}/resume", post(handlers::resume_subscription))
        .route("/v1/subscriptions/{id}/rewind", post(handlers::rewind_subscription))
        .route("/v1/workers", get(handlers::list_workers))
        .route("/v1/workers/{id}/drain", post(handlers::drain_worker))
        .route("/v1/chains", get(handlers::list_chains))
        .route("/v1/openapi.json", get(handlers::openapi))
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/metrics", get(handlers::metrics))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed);
    v1.layer(middleware::from_fn_with_state(Arc::new(tokens), auth::authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let response = next.run(request).await;
    state.metrics.api_requests.with_label_values(&[route.as_str(), response.status().as_str()]).inc();
    response
}
