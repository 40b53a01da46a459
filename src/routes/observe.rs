//! What every request gets on its way in and out, on both listeners: a request id (the caller's
//! `X-Request-Id`, else the trace id of its W3C `traceparent`, else a new one), echoed in the answer, put on
//! the request's span and in problem bodies (`instance`); a count of the requests in flight (for the
//! graceful stop); and its duration in `tokenvault_http_request_duration_seconds` by listener, route and
//! status class.

use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Instant;

use actix_web::HttpMessage;
use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::header::{HeaderName, HeaderValue};

use crate::in_flight::InFlight;

/// The header a request id comes in and goes out with.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Longest caller-chosen request id kept; longer (or oddly spelt) ones are replaced by a new id.
const LONGEST_REQUEST_ID: usize = 128;

/// A request's id, as a request extension (the request's span reads it).
#[derive(Clone, Debug)]
pub struct RequestId(pub Arc<str>);

/// The current request's id, when called while answering one.
pub fn current_request_id() -> Option<RequestId> {
    crate::request_context::current().request_id.map(RequestId)
}

/// Runs `work` as part of answering the request `id` (what the middleware does; tests use it directly).
pub async fn within_request<T>(id: RequestId, work: impl Future<Output = T>) -> T {
    crate::request_context::scope(crate::request_context::Context { request_id: Some(id.0), actor: None }, work).await
}

/// Which listener a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    Public = 0,
    Internal = 1,
}

impl Listener {
    fn label(self) -> &'static str {
        match self {
            Listener::Public => "public",
            Listener::Internal => "internal",
        }
    }
}

/// A caller's id is kept if it is short and of URL-safe characters (it goes into logs and a URN).
fn acceptable(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= LONGEST_REQUEST_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The id for `request`: `X-Request-Id`, else `traceparent`'s trace id, else a new one.
fn request_id(request: &ServiceRequest) -> Arc<str> {
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
    if let Some(id) = header(REQUEST_ID_HEADER).map(str::trim).filter(|id| acceptable(id)) {
        return Arc::from(id);
    }
    // traceparent: version-traceid-parentid-flags (W3C Trace Context), the trace id 32 lower-case hex.
    if let Some(trace_id) = header("traceparent").and_then(|value| value.split('-').nth(1))
        && trace_id.len() == 32
        && trace_id.bytes().all(|b| b.is_ascii_hexdigit())
        && trace_id.bytes().any(|b| b != b'0')
    {
        return Arc::from(trace_id.to_ascii_lowercase());
    }
    new_request_id()
}

/// A fresh id: this process's random prefix and a counter. Unique without a random draw per request
/// (this runs on every request of the hot path), and it tells which replica answered.
fn new_request_id() -> Arc<str> {
    use std::fmt::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    static PREFIX: LazyLock<String> = LazyLock::new(|| uuid::Uuid::new_v4().simple().to_string()[..16].to_owned());
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut id = String::with_capacity(33);
    id.push_str(&PREFIX);
    let _ = write!(id, "{:016x}", COUNTER.fetch_add(1, Ordering::Relaxed));
    Arc::from(id)
}

/// `2xx`, `4xx`, … for a status.
fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Routes without path parameters that answer most requests: the token route, probes and scrapes. A 2xx
/// from one of them was routed there, so its path is its route and needs no lookup (which allocates).
const FREQUENT_ROUTES: [&str; 4] = ["/v1/tokens", "/healthz", "/readyz", "/metrics"];

/// Their 2xx histograms per listener, each registered on first use: a registry lookup per request costs
/// about as much as the rest of a cached token's bookkeeping.
static FREQUENT_OK: [[OnceLock<metrics::Histogram>; FREQUENT_ROUTES.len()]; 2] =
    [const { [const { OnceLock::new() }; FREQUENT_ROUTES.len()] }; 2];

/// The registered 2xx histogram of a frequent route, or `None` for any other path.
fn frequent_ok(listener: Listener, path: &str) -> Option<&'static metrics::Histogram> {
    let route = FREQUENT_ROUTES.iter().position(|route| *route == path)?;
    let slot = &FREQUENT_OK[listener as usize][route];
    Some(slot.get_or_init(|| {
        metrics::histogram!(
            "tokenvault_http_request_duration_seconds",
            "listener" => listener.label(),
            "route" => FREQUENT_ROUTES[route],
            "status_class" => "2xx"
        )
    }))
}

/// The middleware: request id, in-flight count and request duration (see the module docs).
pub fn middleware<S, B>(
    listener: Listener,
    in_flight: InFlight,
) -> impl Transform<S, ServiceRequest, Response = ServiceResponse<BoxBody>, Error = actix_web::Error, InitError = ()>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    actix_web::middleware::from_fn(move |request: ServiceRequest, next: actix_web::middleware::Next<B>| {
        let guard = in_flight.enter();
        let started = Instant::now();
        let id = RequestId(request_id(&request));
        request.extensions_mut().insert(id.clone());
        async move {
            let response = within_request(id.clone(), next.call(request)).await;
            drop(guard);
            let mut response = response?.map_into_boxed_body();
            if let Ok(value) = HeaderValue::from_str(&id.0) {
                response.headers_mut().insert(HeaderName::from_static(REQUEST_ID_HEADER), value);
            }
            let class = status_class(response.status().as_u16());
            let seconds = started.elapsed().as_secs_f64();
            if let Some(histogram) =
                (class == "2xx").then(|| frequent_ok(listener, response.request().path())).flatten()
            {
                histogram.record(seconds);
            } else {
                let route = response.request().match_pattern().unwrap_or_else(|| "unmatched".into());
                metrics::histogram!(
                    "tokenvault_http_request_duration_seconds",
                    "listener" => listener.label(),
                    "route" => route,
                    "status_class" => class
                )
                .record(seconds);
            }
            Ok(response)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callers_id_is_kept_only_when_short_and_url_safe() {
        assert!(acceptable("req-42_a.b:c"));
        for bad in ["", "a b", "a\nb", "é", "a/b", &"x".repeat(129)] {
            assert!(!acceptable(bad), "{bad:?}");
        }
    }

    #[test]
    fn ids_come_from_the_header_else_the_traceparent_else_a_new_one() {
        let with = |headers: &[(&str, &str)]| {
            let mut request = actix_web::test::TestRequest::default();
            for (name, value) in headers {
                request = request.insert_header((*name, *value));
            }
            request_id(&request.to_srv_request()).to_string()
        };
        assert_eq!(with(&[("x-request-id", "abc-1")]), "abc-1");
        let traceparent = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
        assert_eq!(with(&[("traceparent", traceparent)]), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            with(&[("x-request-id", "bad id"), ("traceparent", traceparent)]),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let fresh = with(&[("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01")]);
        assert_eq!(fresh.len(), 32, "an all-zero trace id is invalid: a new id");
        assert!(acceptable(&fresh), "{fresh}");
        assert_ne!(with(&[]), with(&[]));
    }

    #[test]
    fn status_classes() {
        assert_eq!([status_class(204), status_class(404), status_class(503)], ["2xx", "4xx", "5xx"]);
    }
}
