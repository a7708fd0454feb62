//! Bearer-token authentication. Mutating endpoints need the admin token; reads need a token
//! (admin or read) only when `auth.protect_reads` is set. 401 means "who are you?" (no, malformed
//! or unknown token), 403 means "you may not" (the read token on a mutating endpoint). Tokens
//! are compared in constant time and never logged.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::api::error::ApiError;
use crate::config::Tokens;

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Nothing,
    Read,
    Admin,
}

fn need(method: &Method, path: &str, tokens: &Tokens) -> Need {
    if !path.starts_with("/v1/") || path == "/v1/openapi.json" {
        return Need::Nothing;
    }
    match *method {
        Method::GET | Method::HEAD | Method::OPTIONS => {
            if tokens.protect_reads {
                Need::Read
            } else {
                Need::Nothing
            }
        }
        _ => Need::Admin,
    }
}

fn equal(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// The middleware.
pub async fn authenticate(State(tokens): State<Arc<Tokens>>, request: Request, next: Next) -> Response {
    let need = need(request.method(), request.uri().path(), &tokens);
    if need == Need::Nothing {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented.filter(|t| !t.is_empty()) else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing bearer token")
            .into_response();
    };
    let is_admin = equal(presented, &tokens.admin.0);
    let is_reader = tokens.read.as_ref().is_some_and(|r| equal(presented, &r.0));
    match (need, is_admin, is_reader) {
        (_, true, _) | (Need::Read, _, true) => next.run(request).await,
        (Need::Admin, false, true) => {
            ApiError::new(StatusCode::FORBIDDEN, "forbidden", "this token may only read").into_response()
        }
        _ => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "invalid bearer token").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn what_needs_what() {
        let mut t = Tokens { admin: Secret("a".repeat(16)), read: None, protect_reads: false };
        assert_eq!(need(&Method::GET, "/v1/subscriptions", &t), Need::Nothing);
        assert_eq!(need(&Method::POST, "/v1/subscriptions", &t), Need::Admin);
        assert_eq!(need(&Method::DELETE, "/v1/subscriptions/x", &t), Need::Admin);
        assert_eq!(need(&Method::GET, "/v1/openapi.json", &t), Need::Nothing);
        assert_eq!(need(&Method::GET, "/healthz", &t), Need::Nothing);
        t.protect_reads = true;
        assert_eq!(need(&Method::GET, "/v1/workers", &t), Need::Read);
        assert_eq!(need(&Method::GET, "/metrics", &t), Need::Nothing);
    }
}
