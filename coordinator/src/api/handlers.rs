//! One function per route. Handlers parse and validate, call the registry, and render views;
//! every failure is an [`ApiError`].

use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_proto::{Cursor, Rewind, SubscriptionId, SubscriptionRecord, SubscriptionState, WorkerId};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use crate::api::error::{ApiError, ErrorBody};
use crate::api::{ApiDoc, AppState};
use crate::registry::{RegistryError, StoredRecord};
use crate::validate::{self, CreateSubscription, RewindRequest};

/// A subscription with its live status.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionView {
    /// Its id.
    pub id: String,
    /// The registered spec (the event always as a JSON ABI fragment).
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
    /// `active` or `paused`.
    #[schema(example = "active")]
    pub state: String,
    /// Subject it publishes to.
    pub subject: String,
    /// Worker that owns it, if assigned.
    pub assigned_worker: Option<String>,
    /// Last block whose logs are all published.
    pub cursor_block: Option<u64>,
    /// Latest head of its chain seen by the coordinator.
    pub chain_head: Option<u64>,
    /// `chain_head - cursor_block`.
    pub lag_blocks: Option<u64>,
    /// Rewind epoch of the latest rewind request (0 = never rewound).
    pub rewind_epoch: u64,
    /// Registration time, Unix seconds.
    pub created_at: u64,
}

/// A page of subscriptions.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionPage {
    /// This page, ordered by id.
    pub items: Vec<SubscriptionView>,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next_after: Option<String>,
}

/// A live worker.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerView {
    /// Its id.
    pub worker_id: String,
    /// Chains it serves.
    pub chains: Vec<u64>,
    /// Announced capacity (0 = unbounded).
    pub capacity: u32,
    /// herald version.
    pub version: String,
    /// Registration time, Unix seconds.
    pub started_at: u64,
    /// Subscriptions assigned to it.
    pub assigned: usize,
    /// Seconds since its lease was last renewed.
    pub last_heartbeat_seconds_ago: Option<i64>,
}

/// A configured chain.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChainView {
    /// EIP-155 chain id.
    pub chain_id: u64,
    /// Latest head read, if any.
    pub head: Option<u64>,
    /// Age of that reading in seconds.
    pub head_age_seconds: Option<u64>,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn registry_error(e: RegistryError) -> ApiError {
    match e {
        RegistryError::IdExists(id) => {
            ApiError::new(StatusCode::CONFLICT, "already_exists", format!("subscription {id} already exists"))
        }
        RegistryError::Duplicate(other) => ApiError::new(
            StatusCode::CONFLICT,
            "duplicate_subscription",
            format!("subscription {other} already subscribes to the same chain, contract, event and filters"),
        ),
        RegistryError::SubjectTaken(other) => ApiError {
            status: StatusCode::CONFLICT,
            code: "subject_taken",
            message: format!("subscription {other} already publishes to this subject"),
            field: Some("subject".into()),
        },
        RegistryError::NotFound(id) => ApiError::not_found(format!("subscription {id}")),
        e => ApiError::unavailable(e),
    }
}

fn view(
    stored: &StoredRecord,
    worker: Option<WorkerId>,
    cursor: Option<Cursor>,
    head: Option<u64>,
) -> SubscriptionView {
    let record = &stored.record;
    let cursor_block = cursor.map(|c| c.block_number);
    SubscriptionView {
        id: record.spec.id.to_string(),
        spec: serde_json::to_value(&record.spec).unwrap_or_default(),
        state: match record.state {
            SubscriptionState::Active => "active".into(),
            SubscriptionState::Paused => "paused".into(),
        },
        subject: record.spec.subject(),
        assigned_worker: worker.map(|w| w.to_string()),
        cursor_block,
        chain_head: head,
        lag_blocks: head.zip(cursor_block).map(|(h, c)| h.saturating_sub(c)),
        rewind_epoch: record.rewind.map_or(0, |r| r.epoch),
        created_at: record.created_at,
    }
}

async fn view_of(state: &AppState, stored: &StoredRecord) -> Result<SubscriptionView, ApiError> {
    let (worker, cursor) = state.registry.status_of(&stored.record.spec.id).await.map_err(registry_error)?;
    Ok(view(stored, worker, cursor, state.heads.get(stored.record.spec.chain_id)))
}

/// The `{id}` path segment; a segment that does not even decode is a 404 in the API's error
/// shape, not axum's plain-text 400.
pub struct IdPath(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        <Path<String> as axum::extract::FromRequestParts<S>>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| IdPath(id))
            .map_err(|_| ApiError::not_found("subscription"))
    }
}

fn parse_id(id: &str) -> Result<SubscriptionId, ApiError> {
    SubscriptionId::new(id).map_err(|_| ApiError::not_found(format!("subscription {id:?}")))
}

/// Reads a JSON body: checks the content type and the size limit.
async fn json_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if essence != "application/json" {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be application/json",
        ));
    }
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body exceeds {limit} bytes"),
        )
    })
}

/// Registers a subscription.
#[utoipa::path(
    post, path = "/v1/subscriptions", tag = "subscriptions",
    request_body = CreateSubscription,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Registered", body = SubscriptionView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Token may not write", body = ErrorBody),
        (status = 409, description = "Id, same subscription or subject exists", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Invalid field", body = ErrorBody),
        (status = 503, description = "Registry unavailable", body = ErrorBody),
    )
)]
pub async fn create_subscription(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = json_body(&headers, body, state.api.max_body_bytes).await?;
    let ctx = validate::Context {
        chains: state.heads.snapshot().into_iter().map(|(c, h)| (c, h.map(|h| h.number))).collect(),
        max_start_block_ahead: state.api.max_start_block_ahead,
        stream_subjects: state.stream_subjects.clone(),
    };
    let spec = validate::create(&body, &ctx)?;
    let fingerprint = spec
        .fingerprint(&spec.compile().map_err(|e| ApiError::invalid("invalid_event", e.field, e.message))?);
    let record = SubscriptionRecord::new(spec, now());
    state.registry.create(&record, &fingerprint).await.map_err(registry_error)?;
    tracing::info!(subscription_id = %record.spec.id, chain_id = record.spec.chain_id, "subscription registered");
    let stored = StoredRecord { record, mod_revision: 0 };
    let view = view(&stored, None, None, state.heads.get(stored.record.spec.chain_id));
    let location = format!("/v1/subscriptions/{}", view.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(view)).into_response())
}

/// Query of `GET /v1/subscriptions`.
#[derive(Debug, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this chain.
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    pub chain_id: Option<u64>,
    /// Only this state: `active` or `paused`.
    #[param(pattern = "^(active|paused)$")]
    pub state: Option<String>,
    /// Page size (1..=max page size).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// Return ids after this one (from `next_after`).
    pub after: Option<String>,
}

/// Chain ids are at most `i64::MAX` (the OpenAPI `int64` range; EIP-2294 bounds them lower).
const MAX_CHAIN_ID: u64 = i64::MAX as u64;

fn parse_list_query(raw: Option<&str>, max_limit: usize) -> Result<ListQuery, ApiError> {
    let bad = |field: &str, message: &str| ApiError {
        status: StatusCode::BAD_REQUEST,
        code: "invalid_query",
        message: message.to_owned(),
        field: Some(field.to_owned()),
    };
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(raw.unwrap_or("")).map_err(|_| bad("", "malformed query string"))?;
    let mut q = ListQuery::default();
    for (key, value) in pairs {
        match key.as_str() {
            "chain_id" => {
                let chain: u64 = value.parse().map_err(|_| bad("chain_id", "must be a chain id"))?;
                if chain > MAX_CHAIN_ID {
                    return Err(bad("chain_id", "must be a chain id (at most 2^63 - 1)"));
                }
                q.chain_id = Some(chain);
            }
            "state" if value == "active" || value == "paused" => q.state = Some(value),
            "state" => return Err(bad("state", "must be active or paused")),
            "limit" => {
                let limit: usize = value.parse().map_err(|_| bad("limit", "must be a number"))?;
                if limit == 0 || limit > max_limit {
                    return Err(bad("limit", &format!("must be between 1 and {max_limit}")));
                }
                q.limit = Some(limit);
            }
            "after" => q.after = Some(value),
            other => return Err(bad(other, "unknown query parameter")),
        }
    }
    Ok(q)
}

/// Lists subscriptions, by id, a page at a time.
#[utoipa::path(
    get, path = "/v1/subscriptions", tag = "subscriptions",
    params(ListQuery),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "A page", body = SubscriptionPage),
        (status = 400, description = "Invalid query parameter", body = ErrorBody),
        (status = 401, description = "Missing or invalid token (when reads are protected)", body = ErrorBody),
        (status = 503, description = "Registry unavailable", body = ErrorBody),
    )
)]
pub async fn list_subscriptions(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<SubscriptionPage>, ApiError> {
    let q = parse_list_query(raw.as_deref(), state.api.max_page_size)?;
    let limit = q.limit.unwrap_or(state.api.default_page_size);
    // One page read from etcd, never the whole registry: the records after `after` that pass
    // the filters, then the assignments and cursors over the page's span only.
    let wanted = q.state.as_deref().map(|s| s == "paused");
    let keep = |stored: &StoredRecord| {
        q.chain_id.is_none_or(|c| stored.record.spec.chain_id == c)
            && wanted.is_none_or(|paused| (stored.record.state == SubscriptionState::Paused) == paused)
    };
    let (page, more) =
        state.registry.list_page(q.after.as_deref(), limit, keep).await.map_err(registry_error)?;
    let ids: Vec<SubscriptionId> = page.iter().map(|(id, _)| id.clone()).collect();
    let mut statuses = state.registry.statuses(&ids).await.map_err(registry_error)?;
    let items: Vec<SubscriptionView> = page
        .iter()
        .map(|(id, stored)| {
            let (worker, cursor) = statuses.remove(id).unwrap_or_default();
            view(stored, worker, cursor, state.heads.get(stored.record.spec.chain_id))
        })
        .collect();
    let next_after = if more { items.last().map(|v| v.id.clone()) } else { None };
    Ok(Json(SubscriptionPage { items, next_after }))
}

/// One subscription with its live status.
#[utoipa::path(
    get, path = "/v1/subscriptions/{id}", tag = "subscriptions",
    params(("id" = String, Path, description = "Subscription id")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Found", body = SubscriptionView),
        (status = 401, description = "Missing or invalid token (when reads are protected)", body = ErrorBody),
        (status = 404, description = "No such subscription", body = ErrorBody),
        (status = 503, description = "Registry unavailable", body = ErrorBody),
    )
)]
pub async fn get_subscription(
    State(state): State<AppState>,
    IdPath(id): IdPath,
) -> Result<Json<SubscriptionView>, ApiError> {
    let id = parse_id(&id)?;
    let stored = state
        .registry
        .get(&id)
        .await
        .map_err(registry_error)?
        .ok_or_else(|| registry_error(RegistryError::NotFound(id)))?;
    Ok(Json(view_of(&state, &stored).await?))
}

/// Deletes a subscription: it stops, and its assignment and cursor are removed.
#[utoipa::path(
    delete, path = "/v1/subscriptions/{id}", tag = "subscriptions",
    params(("id" = String, Path, description = "Subscription id")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Token may not write", body = ErrorBody),
        (status = 404, description = "No such subscription", body = ErrorBody),
        (status = 503, description = "Registry unavailable", body = ErrorBody),
    )
)]
pub async fn delete_subscription(
    State(state): State<AppState>,
    IdPath(id): IdPath,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    // A record that no longer parses (or compiles) can still be deleted: everything but its
    // fingerprint goes, which is what a new registration of the same logs would collide with.
    let (fingerprint, subject, revision) = match state.registry.get(&id).await {
        Ok(Some(stored)) => {
            let spec = &stored.record.spec;
            let fingerprint = spec.compile().ok().map(|c| spec.fingerprint(&c));
            (fingerprint, Some(spec.subject_fingerprint()), Some(stored.mod_revision))
        }
        Ok(None) => return Err(registry_error(RegistryError::NotFound(id))),
        Err(RegistryError::BadValue { .. }) => (None, None, None),
        Err(e) => return Err(registry_error(e)),
    };
    state
        .registry
        .delete(&id, fingerprint.as_deref(), subject.as_deref(), revision)
        .await
        .map_err(registry_error)?;
    tracing::info!(subscription_id = %id, "subscription deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn set_state(
    state: &AppState,
    id: &str,
    to: SubscriptionState,
) -> Result<Json<SubscriptionView>, ApiError> {
    let id = parse_id(id)?;
    let stored = state.registry.update(&id, |r| r.state = to).await.map_err(registry_error)?;
    tracing::info!(subscription_id = %id, state = ?to, "subscription state changed");
    Ok(Json(view_of(state, &stored).await?))
}

/// Pauses a subscription: its worker stops publishing until it is resumed.
#[utoipa::path(
    post, path = "/v1/subscriptions/{id}/pause", tag = "subscriptions",
    params(("id" = String, Path, description = "Subscription id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Paused", body = SubscriptionView),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Token may not write", body = ErrorBody),
        (status = 404, description = "No such subscription", body = ErrorBody),
        (status = 503, description = "Registry unavailable", body = ErrorBody),
    )
)]
pub async fn pause_subscription(
    State(state): State<AppState>,
    IdPath(id): IdPath,
) -> Result<Json<SubscriptionView>, ApiError> {
    set_state(&state, &id, SubscriptionState::Paused).await
}

/// Resumes a paused subscription from its cursor: no gap, no repeat.
#[utoipa::path(
    post, path = "/v1/subscriptions/{id}/resume", tag = "subscriptions",
    params(("id" = String, Path, description = "Subscription id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Active", body = SubscriptionView),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Token may not write", body = ErrorBody),
        (status = 404, description = "No such subscription", body = ErrorBody),
        (status = 503, description = "Registry unavailable", body = ErrorBody),
    )
)]
pub async fn resume_subscription(
    State(state): State<AppState>,
    IdPath(id): IdPath,
) -> Result<Json<SubscriptionView>, ApiError> {
    set_state(&state, &id, SubscriptionState::Active).await
}

/// Replays a subscription from a block: the owning worker moves its own cursor, and replayed
/// messages carry a new `rewind_epoch` so JetStream does not drop them as duplicates.
#[utoipa::path(
    post, path = "/v1/subscriptions/{id}/rewind", tag = "subscriptions",
    params(("id" = String, Path, description = "Subscription id")),
    request_body = RewindRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Rewind requested", body = SubscriptionView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Token may not write", body = ErrorBody),
        (status = 404, description = "No such subscription", body = ErrorBody),
        (status = 409, description = "Nothing to rewind yet", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Invalid field", body = ErrorBody),
        (status = 503, description = "Registry unavailable", body = ErrorBody),
    )
)]
pub async fn rewind_subscription(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<SubscriptionView>, ApiError> {
    let id = parse_id(&id)?;
    let body = json_body(&headers, body, state.api.max_body_bytes).await?;
    let request = validate::rewind(&body)?;
    let (_, cursor) = state.registry.status_of(&id).await.map_err(registry_error)?;
    match cursor {
        // Rewinding forward would skip logs that were never published.
        Some(c) if request.from_block > c.next_block() => {
            return Err(ApiError::invalid(
                "invalid_from_block",
                "from_block",
                format!(
                    "block {} is beyond the subscription's progress (next block {}); a rewind can only go back",
                    request.from_block,
                    c.next_block()
                ),
            ));
        }
        Some(_) => {}
        None if state.registry.get(&id).await.map_err(registry_error)?.is_none() => {
            return Err(registry_error(RegistryError::NotFound(id)));
        }
        None => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "not_started",
                "the subscription has not made progress yet; there is nothing to rewind",
            ));
        }
    }
    let stored = state
        .registry
        .update(&id, |r| {
            r.rewind = Some(Rewind { epoch: r.next_rewind_epoch(), from_block: request.from_block })
        })
        .await
        .map_err(registry_error)?;
    tracing::info!(subscription_id = %id, from_block = request.from_block, "rewind requested");
    Ok(Json(view_of(&state, &stored).await?))
}

/// Live workers.
#[utoipa::path(
    get, path = "/v1/workers", tag = "cluster",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Live workers", body = Vec<WorkerView>),
        (status = 401, description = "Missing or invalid token (when reads are protected)", body = ErrorBody),
        (status = 503, description = "Registry unavailable", body = ErrorBody),
    )
)]
pub async fn list_workers(State(state): State<AppState>) -> Result<Json<Vec<WorkerView>>, ApiError> {
    let workers = state.registry.workers().await.map_err(registry_error)?;
    let assignments = state.registry.assignments().await.map_err(registry_error)?;
    let mut out = Vec::with_capacity(workers.len());
    for w in workers {
        let last = state.registry.seconds_since_renewal(w.lease).await.map_err(registry_error)?;
        out.push(WorkerView {
            assigned: assignments.values().filter(|a| **a == w.info.worker_id).count(),
            worker_id: w.info.worker_id.to_string(),
            chains: w.info.chains,
            capacity: w.info.capacity,
            version: w.info.version,
            started_at: w.info.started_at,
            last_heartbeat_seconds_ago: last,
        });
    }
    Ok(Json(out))
}

/// Answer to a drain request.
#[derive(Debug, Serialize, ToSchema)]
pub struct DrainView {
    /// The worker asked to drain.
    pub worker_id: String,
    /// Always true: the worker finishes its block ranges, commits its cursors, releases its
    /// subscriptions and exits.
    pub draining: bool,
}

/// Asks a worker to drain gracefully, as SIGTERM does: it finishes its in-flight block ranges,
/// commits its cursors, releases its subscriptions (which move at once) and exits.
#[utoipa::path(
    post, path = "/v1/workers/{id}/drain", tag = "cluster",
    params(("id" = String, Path, description = "Worker id")),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Drain requested", body = DrainView),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Token may not write", body = ErrorBody),
        (status = 404, description = "No such live worker", body = ErrorBody),
        (status = 503, description = "Registry unavailable", body = ErrorBody),
    )
)]
pub async fn drain_worker(State(state): State<AppState>, IdPath(id): IdPath) -> Result<Response, ApiError> {
    let worker = WorkerId::new(id.clone()).map_err(|_| ApiError::not_found(format!("worker {id:?}")))?;
    if !state.registry.request_drain(&worker).await.map_err(registry_error)? {
        return Err(ApiError::not_found(format!("live worker {worker}")));
    }
    tracing::info!(worker_id = %worker, "drain requested");
    let view = DrainView { worker_id: worker.to_string(), draining: true };
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

/// Configured chains and their heads.
#[utoipa::path(
    get, path = "/v1/chains", tag = "cluster",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Chains", body = Vec<ChainView>),
        (status = 401, description = "Missing or invalid token (when reads are protected)", body = ErrorBody),
    )
)]
pub async fn list_chains(State(state): State<AppState>) -> Json<Vec<ChainView>> {
    Json(
        state
            .heads
            .snapshot()
            .into_iter()
            .map(|(chain_id, head)| ChainView {
                chain_id,
                head: head.map(|h| h.number),
                head_age_seconds: head.map(|h| h.at.elapsed().as_secs()),
            })
            .collect(),
    )
}

/// The OpenAPI document, with this deployment's facts filled in: the configured chain ids as
/// the only acceptable `chain_id` values, and links from a created subscription to the
/// operations on it.
pub async fn openapi(State(state): State<AppState>) -> Response {
    let chains: Vec<u64> = state.heads.snapshot().keys().copied().collect();
    let document = document_with(&chains);
    ([(header::CONTENT_TYPE, "application/json")], document.to_string()).into_response()
}

/// The OpenAPI document for a coordinator serving `chains`.
pub fn document_with(chains: &[u64]) -> serde_json::Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    if let Some(chain_id) = doc.pointer_mut("/components/schemas/CreateSubscription/properties/chain_id") {
        chain_id["enum"] = serde_json::json!(chains);
    }
    let operations = [
        ("GetSubscription", "get_subscription"),
        ("DeleteSubscription", "delete_subscription"),
        ("PauseSubscription", "pause_subscription"),
        ("ResumeSubscription", "resume_subscription"),
        ("RewindSubscription", "rewind_subscription"),
    ];
    if let Some(created) = doc.pointer_mut("/paths/~1v1~1subscriptions/post/responses/201") {
        let links: serde_json::Map<String, serde_json::Value> = operations
            .iter()
            .map(|(name, op)| {
                let link = serde_json::json!({"operationId": op, "parameters": {"id": "$response.body#/id"}});
                ((*name).to_owned(), link)
            })
            .collect();
        created["links"] = serde_json::Value::Object(links);
    }
    doc
}

/// Liveness.
pub async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: etcd answers.
pub async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    state.registry.ping().await.map_err(ApiError::unavailable)?;
    Ok("ready")
}

/// Prometheus metrics.
pub async fn metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

/// Unknown route.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// Known route, wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
}
