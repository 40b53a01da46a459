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

/// Refuses any content type but `application/json` or `application/*+json`.
pub fn require_json(request: &HttpRequest) -> Result<(), ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or(ApiError::UnsupportedMediaType)?;
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    let is_json = essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"));
    if is_json { Ok(()) } else { Err(ApiError::UnsupportedMediaType) }
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
        let mut body = Zeroizing::new(Vec::new());
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|_| ApiError::InvalidRequest("the request body could not be read".into()))?;
            if body.len() + chunk.len() > limit {
                return Err(ApiError::PayloadTooLarge(limit));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    tokio::time::timeout(BODY_TIMEOUT, read_all)
        .await
        .unwrap_or_else(|_| Err(ApiError::InvalidRequest("the request body arrived too slowly".into())))
}
