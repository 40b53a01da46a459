//! Reading request bodies ourselves, so every failure (too large, too slow, wrong type) is a precise
//! problem+json answer rather than a framework default.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, web};
use futures_util::StreamExt;
use zeroize::Zeroizing;

use crate::error::ApiError;

/// Longest time a client may take to send its body once the headers arrived (slow-loris defence;
/// actix-web's `client_request_timeout` covers the headers).
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes reserved for a body before any of it arrived. Real callbacks and token requests are smaller.
pub const PREALLOCATED_BYTES: u64 = 4096;

/// Refuses any content type but `application/json` or `application/*+json`.
pub fn require_json(request: &HttpRequest) -> Result<(), ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or(ApiError::UnsupportedMediaType)?;
    if is_json(content_type) { Ok(()) } else { Err(ApiError::UnsupportedMediaType) }
}

/// Whether a Content-Type names JSON: `application/json` or `application/*+json`, any case, any
/// parameters. Compared in place, without lowercasing a copy: this runs on every token request.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    let starts = |prefix: &str| essence.get(..prefix.len()).is_some_and(|head| head.eq_ignore_ascii_case(prefix));
    let ends = |suffix: &str| {
        essence
            .len()
            .checked_sub(suffix.len())
            .and_then(|at| essence.get(at..))
            .is_some_and(|t| t.eq_ignore_ascii_case(suffix))
    };
    essence.eq_ignore_ascii_case("application/json") || (starts("application/") && ends("+json"))
}

/// What to reserve for a body that declares `declared` bytes: that much, so the usual body is copied in
/// without reallocating, but at most [`PREALLOCATED_BYTES`], because the length is whatever an
/// unauthenticated client claims: a flood of requests declaring 64 KiB and sending nothing must not
/// reserve 64 KiB each.
fn initial_capacity(declared: Option<u64>) -> usize {
    declared.unwrap_or(0).min(PREALLOCATED_BYTES) as usize
}

/// Reads at most `limit` bytes, with or without a Content-Length (chunked). The buffer is zeroized on
/// drop because callback bodies hold client secrets.
pub async fn read(
    request: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    let declared =
        request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let read_all = async {
        let mut body = Zeroizing::new(Vec::with_capacity(initial_capacity(declared)));
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|_| ApiError::InvalidRequest("the request body could not be read".into()))?;
            if body.len() + chunk.len() > limit {
                return Err(ApiError::PayloadTooLarge(limit));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    // A small body usually came in with the headers: one poll reads it without arming a timer.
    let mut read_all = std::pin::pin!(read_all);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(read_all.as_mut().poll(cx))).await;
    if let std::task::Poll::Ready(read) = first {
        return read;
    }
    tokio::time::timeout(BODY_TIMEOUT, read_all)
        .await
        .unwrap_or_else(|_| Err(ApiError::InvalidRequest("the request body arrived too slowly".into())))
}

#[cfg(test)]
mod tests {
    use super::{PREALLOCATED_BYTES, initial_capacity, is_json};

    #[test]
    fn what_is_reserved_before_the_body_arrives_is_bounded_whatever_is_declared() {
        assert_eq!(initial_capacity(Some(200)), 200);
        assert_eq!(initial_capacity(None), 0);
        assert_eq!(initial_capacity(Some(64 * 1024)), PREALLOCATED_BYTES as usize);
        assert_eq!(initial_capacity(Some(u64::MAX)), PREALLOCATED_BYTES as usize);
    }

    #[test]
    fn json_media_types_in_any_case_with_parameters() {
        for yes in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            " application/json ",
            "application/problem+json",
            "APPLICATION/VND.X+JSON;v=1",
        ] {
            assert!(is_json(yes), "{yes:?}");
        }
        for no in [
            "",
            "text/plain",
            "application/xml",
            "text/json",
            "application/jsonx",
            "application/json-seq",
            "json",
            "application/",
            "é+json",
        ] {
            assert!(!is_json(no), "{no:?}");
        }
    }
}
