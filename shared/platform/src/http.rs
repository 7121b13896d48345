//! The HTTP layer every HTTP step shares, as axum extractors and tower layers:
//!
//! * [`AppState`]: the [`Services`] and the [`JwtVerifier`] a router runs over.
//! * [`Caller`]: an extractor that verifies the bearer token into a [`Principal`] and attaches the
//!   caller's break-glass grant from the store (never from the token). A missing or refused token
//!   is a 401 with `WWW-Authenticate: Bearer`, and a `login` audit event ([`crate::login`]).
//! * [`FhirJson`], [`FhirQuery`], [`FhirPath`]: body, query and path extractors whose refusals are
//!   FHIR OperationOutcomes (415 for a wrong content type, 413 for an oversize body, 400 for bad
//!   JSON), never axum's plain-text rejections. Their sentences never echo the input.
//! * `impl IntoResponse for StepError`: the error's status and OperationOutcome as
//!   `application/fhir+json`.
//! * [`with_layers`]: the middleware stack (request id, trace, body limit, timeout, load
//!   shedding, panic catching) and the 404 fallback. Any error response some layer produces with
//!   a bare body (405, 413, 504, ...) is rewritten to an OperationOutcome on its way out.
//!
//! Logs carry method, route template (never the path: it may hold a patient id), status, latency
//! and request id. Never a body, never a query string, never PHI.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRef, FromRequest, FromRequestParts, MatchedPath, Request,
    State,
};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use chrono::{DateTime, Utc};
use rx_domain::fhir::operation_outcome_issues;
use rx_guard::access::{self, Action, Decision, JwtVerifier, Policy, Principal, Resource};
use rx_guard::audit::ResourceRef;
use rx_guard::GuardError;
use rx_store::repo::AuditCtx;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Semaphore;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::Span;

use crate::break_glass;
use crate::clock::{parse_time, TIME_EXPECTED};
use crate::error::StepError;
use crate::flow::person_cx;
use crate::login::LoginFailures;
use crate::services::Services;

/// The media type of every body rxflow answers with.
pub const FHIR_JSON: &str = "application/fhir+json";
/// The request id header, set when the client sent none (or an unusable one) and echoed back.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Limits of the middleware stack.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body accepted (413 above it).
    pub max_body_bytes: usize,
    /// A request still running after this answers 504.
    pub request_timeout: Duration,
    /// Requests in progress at once; more answer 503 with `Retry-After` (fail fast, not queue).
    /// Each holds a blocking-pool thread while it runs.
    pub max_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1024 * 1024,
            request_timeout: Duration::from_secs(10),
            max_in_flight: 256,
        }
    }
}

/// What handlers run over: cheap to clone (three `Arc`s).
#[derive(Clone)]
pub struct AppState {
    pub svc: Arc<Services>,
    pub verifier: Arc<JwtVerifier>,
    /// The callers' break-glass grants, as the extractor attaches them.
    pub grants: Arc<break_glass::GrantCache>,
    /// Refused sign-ins, audited in the deployment's tenant (see [`crate::login`]).
    pub logins: Arc<LoginFailures>,
}

impl AppState {
    /// The state of a service run by `tenant` (the organisation whose auditor reviews refused
    /// sign-ins, which belong to no caller's tenant).
    pub fn new(svc: Services, verifier: JwtVerifier, tenant: &str) -> Self {
        AppState {
            svc: Arc::new(svc),
            verifier: Arc::new(verifier),
            grants: Arc::new(break_glass::GrantCache::default()),
            logins: Arc::new(LoginFailures::new(
                tenant,
                crate::login::DEFAULT_LIMIT,
                crate::login::DEFAULT_TOTAL,
                crate::login::DEFAULT_WINDOW,
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Responses

/// A JSON body as `application/fhir+json`.
pub fn fhir<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, FHIR_JSON)], bytes).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "response body does not serialize");
            outcome(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exception",
                "the response could not be written; the incident is logged",
            )
        }
    }
}

/// An OperationOutcome with one issue.
pub fn outcome(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let severity = if status.is_server_error() {
        "fatal"
    } else {
        "error"
    };
    let body = operation_outcome_issues(&[(severity, code, message.into(), None)]);
    fhir::<Value>(status, &body)
}

impl IntoResponse for StepError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut res = fhir(status, &self.operation_outcome());
        match status {
            StatusCode::UNAUTHORIZED => {
                res.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer realm="rxflow", error="invalid_token""#),
                );
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                res.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        res
    }
}

/// A 401 with the `WWW-Authenticate` challenge (RFC 6750): `error` is set when a token was sent.
fn unauthorized(error: Option<&'static str>, message: impl Into<String>) -> Response {
    let mut res = outcome(StatusCode::UNAUTHORIZED, "login", message);
    let challenge = match error {
        Some("invalid_token") => r#"Bearer realm="rxflow", error="invalid_token""#,
        _ => r#"Bearer realm="rxflow""#,
    };
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    res
}

// ---------------------------------------------------------------------------------------------
// The caller

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// From the verified token, with the caller's break-glass grant (active, or the latest one
    /// so an expired grant is reported as such) attached from the store.
    pub principal: Principal,
    /// The peer address (the embedded server trusts no forwarding header).
    pub source_ip: Option<String>,
}

fn bearer_token(headers: &HeaderMap) -> Option<Result<&str, ()>> {
    let value = headers.get(header::AUTHORIZATION)?;
    let Ok(text) = value.to_str() else {
        return Some(Err(()));
    };
    let (scheme, token) = text.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    Some(Ok(token.trim()))
}

impl<S> FromRequestParts<S> for Caller
where
    AppState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        let app = AppState::from_ref(state);
        let token = match bearer_token(&parts.headers) {
            None => {
                return Err(refused_sign_in(
                    &app,
                    parts,
                    None,
                    "this endpoint needs a bearer token: send `Authorization: Bearer <token>` (for a local server, mint one with `rxflow token`)",
                )
                .await)
            }
            Some(Err(())) => {
                return Err(refused_sign_in(
                    &app,
                    parts,
                    Some("invalid_token"),
                    "the Authorization header is not readable text",
                )
                .await)
            }
            Some(Ok(t)) => t,
        };
        let principal = match app.verifier.verify(token).await {
            Ok(p) => p,
            Err(GuardError::Unauthenticated(why)) => {
                return Err(refused_sign_in(&app, parts, Some("invalid_token"), &why).await)
            }
            Err(e) => return Err(StepError::from(e).into_response()),
        };
        let grant = app
            .grants
            .latest(&app.svc, &principal)
            .await
            .map_err(IntoResponse::into_response)?;
        let principal = match grant {
            Some(g) => principal.with_break_glass(g),
            None => principal,
        };
        let source_ip = peer_ip(parts);
        Ok(Caller {
            principal,
            source_ip,
        })
    }
}

/// The peer address of the connection (the embedded server trusts no forwarding header).
fn peer_ip(parts: &Parts) -> Option<String> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip().to_string())
}

/// A 401 for a missing or refused token, with its `login` audit event (unless the source is
/// past its limit: [`crate::login`]). If the event cannot be appended the answer is the audit
/// sink's failure (503), as for any access that cannot be audited.
async fn refused_sign_in(
    app: &AppState,
    parts: &Parts,
    error: Option<&'static str>,
    reason: &str,
) -> Response {
    let route = parts
        .extensions
        .get::<MatchedPath>()
        .map_or("(no route)", MatchedPath::as_str);
    let event = app
        .logins
        .event(route, peer_ip(parts), reason, std::time::Instant::now());
    if let Some(ev) = event {
        if let Err(e) = app.svc.vault.audit(&[ev]).await {
            return StepError::from(e).into_response();
        }
    }
    unauthorized(error, reason.to_string())
}

/// Records the refused sign-ins counted and not recorded one by one (those of windows that
/// have passed, or all of them when `all`) as summary `login` events. Returns how many were
/// summarized; if the trail cannot take them they are logged instead.
pub async fn record_counted_logins(app: &AppState, all: bool) -> u64 {
    let counted = app.logins.counted(std::time::Instant::now(), all);
    let total = counted.iter().map(|c| c.count).sum();
    if counted.is_empty() {
        return 0;
    }
    let events: Vec<_> = counted
        .iter()
        .map(|c| app.logins.summary_event(c))
        .collect();
    match app.svc.vault.audit(&events).await {
        Ok(()) => {}
        Err(e) => tracing::error!(
            error = %e,
            refused = total,
            "refused sign-ins counted but not recorded: the audit trail did not take their summary"
        ),
    }
    total
}

impl Caller {
    /// The audit context of this caller acting through `function`.
    pub fn cx(&self, function: &'static str, via_break_glass: bool) -> AuditCtx {
        person_cx(
            &self.principal,
            function,
            self.source_ip.clone(),
            via_break_glass,
        )
    }

    /// Decide `action` on `resource` with the embedded policy. On allow, whether the access
    /// comes under break-glass (the caller flags what it audits); on deny, the refusal is
    /// appended to the audit trail (reason code as detail) and returned as 403.
    pub async fn authorize(
        &self,
        svc: &Services,
        action: Action,
        resource: Option<&Resource<'_>>,
        target: ResourceRef,
        patient: Option<&[u8]>,
        function: &str,
    ) -> Result<bool, StepError> {
        let decision = Policy::embedded().decide(&self.principal, action, resource, Utc::now());
        self.enforce(svc, action, decision, target, patient, function)
            .await
    }

    /// Refuses the caller, audited, if their role may not take `action` on any resource (see
    /// [`Policy::role_may`]): a check before the request's body is read. What the role may do
    /// to a given resource is still [`Caller::authorize`]'s to decide.
    pub async fn may_at_all(
        &self,
        svc: &Services,
        action: Action,
        target: ResourceRef,
        function: &str,
    ) -> Result<(), StepError> {
        let decision = Policy::embedded().role_may(&self.principal, action, Utc::now());
        self.enforce(svc, action, decision, target, None, function)
            .await
            .map(|_| ())
    }

    /// Allow (saying whether under break-glass), or refuse with the denial audited.
    async fn enforce(
        &self,
        svc: &Services,
        action: Action,
        decision: Decision,
        target: ResourceRef,
        patient: Option<&[u8]>,
        function: &str,
    ) -> Result<bool, StepError> {
        match decision {
            Decision::Allow { via_break_glass } => Ok(via_break_glass),
            Decision::Deny(why) => {
                let mut ev =
                    access::audit_event(&self.principal, action, &decision, target, function);
                ev.source_ip = self.source_ip.clone();
                ev.patient = patient.map(hex::encode);
                svc.vault.audit(&[ev]).await?;
                Err(StepError::Forbidden(why.sentence()))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Body, query and path extractors

/// A JSON request body (`application/fhir+json` or `application/json`).
#[derive(Debug, Clone)]
pub struct FhirJson<T>(pub T);

fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.eq_ignore_ascii_case(FHIR_JSON)
        || essence.eq_ignore_ascii_case("application/json+fhir")
}

fn json_error(e: &serde_json::Error) -> Response {
    use serde_json::error::Category;
    let at = format!("line {} column {}", e.line(), e.column());
    let message = match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            format!("the request body is not valid JSON (error at {at})")
        }
        // Field names are ours; values never go into the sentence.
        Category::Data => {
            let text = e.to_string();
            if text.starts_with("missing field") || text.starts_with("unknown field") {
                if text.starts_with("missing") {
                    // The name is ours (the endpoint's own field).
                    let field = text.split('`').nth(1).unwrap_or("?");
                    format!("the request body lacks the required field `{field}`")
                } else {
                    // The unknown name is the caller's and may hold anything (PHI included):
                    // name only the fields the endpoint knows.
                    let known = text
                        .split_once("expected ")
                        .map(|(_, k)| k.split(" at line").next().unwrap_or(k).to_string());
                    match known {
                        Some(k) => format!(
                            "the request body has a field this endpoint does not know; expected {k}"
                        ),
                        None => "the request body has a field this endpoint does not know".into(),
                    }
                }
            } else {
                format!("the request body does not have the expected shape (at {at})")
            }
        }
    };
    outcome(StatusCode::BAD_REQUEST, "structure", message)
}

fn too_large() -> Response {
    outcome(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too-costly",
        "the request body is larger than this endpoint accepts (1 MiB); split the Bundle into smaller ones",
    )
}

impl<S, T> FromRequest<S> for FhirJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        if !is_json(req.headers()) {
            return Err(outcome(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not-supported",
                "send the body as application/fhir+json (or application/json)",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large()
            } else {
                outcome(
                    StatusCode::BAD_REQUEST,
                    "structure",
                    "the request body could not be read",
                )
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(FhirJson)
            .map_err(|e| json_error(&e))
    }
}

/// Query parameters; a query string that does not fit is a 400 OperationOutcome.
#[derive(Debug, Clone)]
pub struct FhirQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for FhirQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        let q = axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(q)| FhirQuery(q))
            .map_err(|e| {
                outcome(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    query_refusal(&e.body_text()),
                )
            })?;
        // Checked once the names are known to be the endpoint's own (an unknown one was refused
        // above without being echoed), so naming the parameter tells nothing the caller's
        // endpoint does not.
        match parts.uri.query().and_then(not_utf8) {
            None => Ok(q),
            Some(Some(name)) => Err(bad_parameter(
                &name,
                "is not UTF-8 text once percent-decoded: percent-encode the UTF-8 bytes of the value",
            )
            .into_response()),
            Some(None) => Err(outcome(
                StatusCode::BAD_REQUEST,
                "invalid",
                "a query parameter's name is not UTF-8 text once percent-decoded",
            )),
        }
    }
}

/// The first parameter of `query` whose name or value is not UTF-8 once percent-decoded, with
/// its name when that is a plain one. The query extractor decodes such bytes lossily (U+FFFD in
/// their place), and the endpoint would then search for, or page from, a value nobody sent.
fn not_utf8(query: &str) -> Option<Option<String>> {
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = String::from_utf8(percent_decoded(name)).ok();
        if name.is_some() && std::str::from_utf8(&percent_decoded(value)).is_ok() {
            return None;
        }
        Some(
            name.filter(|n| {
                !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            }),
        )
    })
}

/// `application/x-www-form-urlencoded` decoding as the query extractor does it (`+` is a space,
/// `%XX` a byte, a `%` without two hex digits itself), to bytes.
fn percent_decoded(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let hex = |i: usize| b.get(i).and_then(|&c| char::from(c).to_digit(16));
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// What a query string that does not fit the endpoint's parameters gets told. A missing or
/// repeated parameter is named (the name is the endpoint's own); an unknown one is not echoed
/// (it may hold anything), but the parameters the endpoint takes are listed.
fn query_refusal(text: &str) -> String {
    if let Some(name) = field_named(text, "missing field `") {
        return format!("the query string needs the parameter `{name}`");
    }
    if let Some(name) = field_named(text, "duplicate field `") {
        return format!("the query string gives the parameter `{name}` more than once");
    }
    if text.contains("unknown field") {
        if text.contains("there are no fields") {
            return "this endpoint takes no query parameters".to_string();
        }
        if let Some((_, known)) = text.split_once("expected ") {
            return format!(
                "the query string has a parameter this endpoint does not know; it takes {known}"
            );
        }
    }
    "the query string has a parameter this endpoint does not know or a value of the wrong form"
        .to_string()
}

/// The field serde names after `marker` (`missing field `patient``), if it is a plain name.
fn field_named<'a>(text: &'a str, marker: &str) -> Option<&'a str> {
    let rest = &text[text.find(marker)? + marker.len()..];
    let name = &rest[..rest.find('`')?];
    name.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
        .then_some(name)
}

/// The query of an endpoint that takes no parameters: any parameter is refused (400), since a
/// filter or a page size it silently ignored would give the caller a wrong picture.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// A query parameter whose value does not fit: a 400 OperationOutcome naming the parameter and
/// saying what it takes (`sentence` follows the name). The value is never quoted: it may hold
/// anything, PHI included.
pub fn bad_parameter(name: &str, sentence: &str) -> StepError {
    StepError::Invalid {
        code: "value",
        message: format!("the query parameter `{name}` {sentence}"),
        expression: Some(name.to_string()),
    }
}

/// The value of the query parameter `name` as a `T`; one that does not parse is a
/// [`bad_parameter`] with `expected` as its sentence.
pub fn query_param<T: std::str::FromStr>(
    name: &str,
    value: Option<&str>,
    expected: &str,
) -> Result<Option<T>, StepError> {
    value
        .map(|v| v.parse::<T>().map_err(|_| bad_parameter(name, expected)))
        .transpose()
}

/// The value of the query parameter `name` as a time ([`crate::clock::parse_time`]); one that
/// does not parse, or lies outside years 0000–9999, is a [`bad_parameter`].
pub fn query_time(name: &str, value: Option<&str>) -> Result<Option<DateTime<Utc>>, StepError> {
    value
        .map(|v| parse_time(v).ok_or_else(|| bad_parameter(name, TIME_EXPECTED)))
        .transpose()
}

/// A search filter's value. Given but empty it is refused: dropping it would silently widen
/// the search to everything.
pub fn query_filter(name: &str, value: Option<String>) -> Result<Option<String>, StepError> {
    match value {
        Some(v) if v.trim().is_empty() => Err(bad_parameter(
            name,
            "is empty: give it a value, or leave the parameter out",
        )),
        other => Ok(other),
    }
}

/// The sentence of a page size that does not parse.
pub const LIMIT_EXPECTED: &str =
    "must be a whole number of entries (0 for as many as a page holds)";

/// The page size a caller asked for: `default` when not given, 0 for as many as one page may
/// hold, never more than `max`.
pub fn page_limit(asked: Option<usize>, default: usize, max: usize) -> usize {
    match asked {
        None => default.min(max),
        Some(0) => max,
        Some(n) => n.min(max),
    }
}

/// Path parameters; a segment that does not fit is a 400 OperationOutcome.
#[derive(Debug, Clone)]
pub struct FhirPath<T>(pub T);

impl<S, T> FromRequestParts<S> for FhirPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(p)| FhirPath(p))
            .map_err(|_| {
                outcome(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    "a path segment of this URL is not of the expected form",
                )
            })
    }
}

// ---------------------------------------------------------------------------------------------
// Layers

/// UUIDv7 request ids (time-ordered, so logs sort by them).
#[derive(Clone, Copy, Default)]
struct MakeRequestUuidV7;

impl MakeRequestId for MakeRequestUuidV7 {
    fn make_request_id<B>(&mut self, _request: &axum::http::Request<B>) -> Option<RequestId> {
        HeaderValue::from_str(&uuid::Uuid::now_v7().to_string())
            .ok()
            .map(RequestId::new)
    }
}

/// A client's request id is kept only if it is a short token (it is logged, so it must not be
/// a place to smuggle text into the logs).
fn usable_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

async fn sanitize_request_id(mut req: Request, next: Next) -> Response {
    if req
        .headers()
        .get(&REQUEST_ID)
        .is_some_and(|v| !usable_request_id(v))
    {
        req.headers_mut().remove(&REQUEST_ID);
    }
    next.run(req).await
}

fn is_fhir(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with(FHIR_JSON))
}

fn code_for(status: StatusCode) -> (&'static str, &'static str) {
    match status.as_u16() {
        400 => ("invalid", "the request is not valid"),
        401 => ("login", "this endpoint needs a valid bearer token"),
        403 => ("forbidden", "the caller may not do this"),
        404 => ("not-found", "there is no such endpoint or record"),
        405 => (
            "not-supported",
            "this endpoint does not accept that HTTP method",
        ),
        408 | 504 => (
            "timeout",
            "the request took too long to answer and may still complete; read what it was to change \
             before trying again (a resubmitted order is recognised as the same one)",
        ),
        409 => ("conflict", "the request conflicts with the current state"),
        413 => (
            "too-costly",
            "the request body is larger than this endpoint accepts (1 MiB)",
        ),
        415 => (
            "not-supported",
            "send the body as application/fhir+json (or application/json)",
        ),
        429 | 503 => (
            "transient",
            "the service is busy or unavailable; retry shortly",
        ),
        500 => (
            "exception",
            "the request failed inside the service; the incident is logged",
        ),
        _ => ("processing", "the request could not be processed"),
    }
}

/// Rewrites an error response with a bare body (from a layer or axum itself) into an
/// OperationOutcome, keeping its status and headers.
async fn outcome_for_bare_errors(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) || is_fhir(res.headers()) {
        return res;
    }
    let (mut parts, _bare) = res.into_parts();
    let (code, sentence) = code_for(status);
    let (_, body) = outcome(status, code, sentence).into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    if status == StatusCode::UNAUTHORIZED && !parts.headers.contains_key(header::WWW_AUTHENTICATE) {
        parts.headers.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Bearer realm="rxflow""#),
        );
    }
    Response::from_parts(parts, body)
}

/// A request's place among the `max_in_flight`: held by [`shed_load`] until the answer and by
/// [`off_the_reactor`] until the handler ends, whichever is later. A handler still running after
/// its 504 (it is on the blocking pool; the timeout cannot stop it) keeps its place, so work the
/// clients have given up on still counts against the limit.
#[derive(Clone)]
struct Slot(#[allow(dead_code)] Arc<tokio::sync::OwnedSemaphorePermit>);

/// Fail fast under overload: past `max_in_flight` requests in progress, answer 503.
async fn shed_load(State(slots): State<Arc<Semaphore>>, mut req: Request, next: Next) -> Response {
    match slots.try_acquire_owned() {
        Ok(permit) => {
            let slot = Slot(Arc::new(permit));
            req.extensions_mut().insert(slot.clone());
            let res = next.run(req).await;
            drop(slot);
            res
        }
        Err(_) => {
            let mut res = outcome(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "the service is at capacity; retry shortly",
            );
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            res
        }
    }
}

/// Answers only once everything the request did is durable. Under group commit the change sets
/// a handler made (its writes, its audit events, its denials) become durable at the next sync:
/// this layer syncs before the response leaves. If that fails, or a group commit that may have
/// held this request's work failed while it ran, the caller gets 503 and no success whose
/// record could be lost. A store that commits durably each time makes this free.
pub async fn durable_before_answer(
    State(svc): State<Arc<Services>>,
    req: Request,
    next: Next,
) -> Response {
    let store = svc.vault.store.clone();
    let lost = store.lost_commits();
    let res = next.run(req).await;
    let synced = store.durable().await;
    if synced.is_ok() && store.lost_commits() == lost {
        return res;
    }
    if let Err(e) = synced {
        tracing::error!(error = %e, "could not make a request's changes durable");
    } else {
        tracing::error!("a group commit failed while the request ran");
    }
    outcome(
        StatusCode::SERVICE_UNAVAILABLE,
        "transient",
        "the service could not store the request's changes durably; nothing was accepted, \
         try again",
    )
}

/// Runs the rest of the request (extractors, handler) on the blocking pool. The embedded store
/// does its SQLite work synchronously behind a lock inside its async methods; on a runtime
/// worker that would stall every connection the worker serves while it waits for the lock (at
/// 1,000 requests/s on two cores: 560 answered, p50 30 ms). On a blocking thread only this
/// request waits, and the workers keep accepting and reading. Bounded by `max_in_flight`.
async fn off_the_reactor(req: Request, next: Next) -> Response {
    use tracing::Instrument;
    let rt = tokio::runtime::Handle::current();
    // Keep the request's span (route, request id) on what the handler logs.
    let span = Span::current();
    let slot = req.extensions().get::<Slot>().cloned();
    match tokio::task::spawn_blocking(move || {
        let res = rt.block_on(next.run(req).instrument(span));
        drop(slot);
        res
    })
    .await
    {
        Ok(res) => res,
        Err(_) => {
            tracing::error!("a request task failed");
            outcome(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exception",
                "the request failed inside the service; the incident is logged",
            )
        }
    }
}

fn panic_response(_payload: Box<dyn std::any::Any + Send + 'static>) -> Response<Body> {
    // The payload may quote data; it is not logged.
    tracing::error!("a request handler panicked");
    outcome(
        StatusCode::INTERNAL_SERVER_ERROR,
        "exception",
        "the request failed inside the service; the incident is logged",
    )
}

/// The 404 for paths no route matches (the path is not echoed: it may carry an identifier).
pub async fn unknown_route() -> Response {
    outcome(
        StatusCode::NOT_FOUND,
        "not-found",
        "there is no endpoint at this path; see the API list in the README",
    )
}

fn request_span(req: &Request) -> Span {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
        .unwrap_or("(unmatched)");
    let request_id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!("http", method = %req.method(), route, request_id)
}

fn log_response<B>(res: &axum::http::Response<B>, latency: Duration, _span: &Span) {
    let status = res.status().as_u16();
    let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    if status >= 500 {
        tracing::warn!(status, latency_us, "request failed");
    } else {
        tracing::info!(status, latency_us, "request served");
    }
}

/// Wraps `router` in the shared stack, outermost first: request-id hygiene and generation,
/// tracing, request-id propagation, OperationOutcome for bare errors, load shedding, timeout
/// (504), body limit (413), the move to the blocking pool, panic catching (500); and the 404
/// fallback.
pub fn with_layers(router: Router, limits: &Limits) -> Router {
    let slots = Arc::new(Semaphore::new(limits.max_in_flight));
    // `Router::layer` wraps what is there already: the last call is the outermost layer.
    router
        .fallback(unknown_route)
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn(off_the_reactor))
        .layer(RequestBodyLimitLayer::new(limits.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            limits.request_timeout,
        ))
        .layer(middleware::from_fn_with_state(slots, shed_load))
        .layer(middleware::from_fn(outcome_for_bare_errors))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span as fn(&Request) -> Span)
                .on_request(())
                .on_response(log_response)
                .on_failure(()),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuidV7))
        .layer(middleware::from_fn(sanitize_request_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use tower::ServiceExt;

    #[tokio::test]
    async fn an_unknown_field_name_is_not_echoed() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Body {
            decision: String,
        }
        let e =
            serde_json::from_str::<Body>(r#"{"decision":"approve","Alex Sample 999-12-3456":1}"#)
                .unwrap_err();
        let resp = json_error(&e);
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("Alex") && !text.contains("999-12"), "{text}");
        assert!(
            text.contains("decision"),
            "names the fields it knows: {text}"
        );
    }

    #[test]
    fn a_query_value_that_is_not_utf8_once_decoded_is_found_and_named() {
        assert_eq!(not_utf8("patient=%FF"), Some(Some("patient".into())));
        assert_eq!(not_utf8("from=x&user=a%FEb"), Some(Some("user".into())));
        assert_eq!(not_utf8("%FF=1"), Some(None));
        for fine in [
            "patient=p-1",
            "user=J%C3%BCrgen+M",
            "a=100%",
            "a=%zz",
            "",
            "a",
        ] {
            assert_eq!(not_utf8(fine), None, "{fine}");
        }
        assert_eq!(percent_decoded("a+b%2Bc%4"), b"a b+c%4");
    }

    fn app(limits: Limits) -> Router {
        let r = Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    "late"
                }),
            )
            .route(
                "/panic",
                get(|| async {
                    if true {
                        panic!("boom with Jane Doe inside");
                    }
                    "never"
                }),
            )
            .route(
                "/echo",
                post(|FhirJson(v): FhirJson<Value>| async move { fhir(StatusCode::OK, &v) }),
            )
            .route(
                "/refused",
                get(|| async { StepError::Forbidden("no".into()) }),
            );
        with_layers(r, &limits)
    }

    async fn call(app: Router, req: axum::http::Request<Body>) -> (StatusCode, HeaderMap, Value) {
        let res = app.oneshot(req).await.expect("infallible");
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .expect("body");
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, v)
    }

    fn get_req(uri: &str) -> axum::http::Request<Body> {
        axum::http::Request::get(uri).body(Body::empty()).unwrap()
    }

    fn assert_outcome(headers: &HeaderMap, v: &Value) {
        assert_eq!(headers[header::CONTENT_TYPE], FHIR_JSON);
        assert_eq!(v["resourceType"], "OperationOutcome", "{v}");
    }

    #[tokio::test]
    async fn slow_handler_times_out_as_504_operation_outcome() {
        let limits = Limits {
            request_timeout: Duration::from_millis(20),
            ..Limits::default()
        };
        let (status, h, v) = call(app(limits), get_req("/slow")).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_outcome(&h, &v);
        assert_eq!(v["issue"][0]["code"], "timeout");
    }

    #[tokio::test]
    async fn requests_past_the_in_flight_limit_are_shed_with_503_and_retry_after() {
        let limits = Limits {
            max_in_flight: 1,
            ..Limits::default()
        };
        let app = app(limits);
        let slow = tokio::spawn(call(app.clone(), get_req("/slow")));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (status, h, v) = call(app, get_req("/refused")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_outcome(&h, &v);
        assert_eq!(h[header::RETRY_AFTER], "1");
        let (status, _, _) = slow.await.expect("slow request");
        assert_eq!(status, StatusCode::OK);
    }

    /// A handler still running after its 504 keeps its place among the `max_in_flight`: the
    /// limit bounds the work in progress, not only the answers still owed (before, the place
    /// was free at the 504 and abandoned work piled up without bound).
    #[tokio::test]
    async fn a_handler_running_on_after_its_504_keeps_its_slot() {
        let limits = Limits {
            max_in_flight: 1,
            request_timeout: Duration::from_millis(20),
            ..Limits::default()
        };
        let app = app(limits);
        let (status, _, _) = call(app.clone(), get_req("/slow")).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        let (status, _, _) = call(app.clone(), get_req("/refused")).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "the slow handler still runs"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (status, _, _) = call(app, get_req("/refused")).await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "its slot is free once it ended"
        );
    }

    #[tokio::test]
    async fn panicking_handler_answers_500_without_the_panic_text() {
        let (status, h, v) = call(app(Limits::default()), get_req("/panic")).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_outcome(&h, &v);
        assert!(!v.to_string().contains("Jane"));
    }

    #[tokio::test]
    async fn wrong_method_and_unknown_route_are_operation_outcomes() {
        let (status, h, v) = call(app(Limits::default()), get_req("/echo")).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_outcome(&h, &v);
        let (status, h, v) = call(app(Limits::default()), get_req("/patients/Jane-Doe")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_outcome(&h, &v);
        assert!(!v.to_string().contains("Jane"));
    }

    #[tokio::test]
    async fn body_errors_are_400_413_415_operation_outcomes() {
        let post = |ct: Option<&str>, body: Vec<u8>| {
            let mut b = axum::http::Request::post("/echo");
            if let Some(ct) = ct {
                b = b.header(header::CONTENT_TYPE, ct);
            }
            b.body(Body::from(body)).unwrap()
        };
        let (s, h, v) = call(
            app(Limits::default()),
            post(Some(FHIR_JSON), b"{\"a\":".to_vec()),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_outcome(&h, &v);
        let (s, h, v) = call(
            app(Limits::default()),
            post(Some("text/plain"), b"{}".to_vec()),
        )
        .await;
        assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_outcome(&h, &v);
        let big = vec![b' '; 1024 * 1024 + 10];
        let (s, h, v) = call(app(Limits::default()), post(Some(FHIR_JSON), big)).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
        assert_outcome(&h, &v);
        let (s, _, v) = call(
            app(Limits::default()),
            post(
                Some("application/fhir+json; charset=utf-8"),
                b"{\"a\":1}".to_vec(),
            ),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["a"], 1);
    }

    #[tokio::test]
    async fn step_error_keeps_its_status_and_request_ids_are_set_and_kept() {
        let (s, h, v) = call(app(Limits::default()), get_req("/refused")).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        assert_outcome(&h, &v);
        assert!(h.contains_key(&REQUEST_ID));
        let req = axum::http::Request::get("/refused")
            .header(&REQUEST_ID, "abc-123")
            .body(Body::empty())
            .unwrap();
        let (_, h, _) = call(app(Limits::default()), req).await;
        assert_eq!(h[&REQUEST_ID], "abc-123");
        let req = axum::http::Request::get("/refused")
            .header(&REQUEST_ID, "Jane Doe <script>")
            .body(Body::empty())
            .unwrap();
        let (_, h, _) = call(app(Limits::default()), req).await;
        assert_ne!(h[&REQUEST_ID], "Jane Doe <script>");
    }
}
