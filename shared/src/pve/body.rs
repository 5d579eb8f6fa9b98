//! Reading a Proxmox reply's body under a size cap.
//!
//! reqwest's `Response::bytes` reads whatever the server sends. A broken or hostile server
//! (or something impersonating one on an insecure connection) could send an endless body
//! and take the worker's memory with it, so the client reads the body chunk by chunk and
//! stops as soon as it would pass the cap ([`super::error::MAX_RESPONSE_BYTES`]), with
//! [`PveError::ResponseTooLarge`]. A `Content-Length` above the cap is refused before
//! reading anything. This module does not interpret the body.

use super::error::PveError;

/// Reads the whole body of `resp`, at most `limit` bytes. `transport` turns a read failure
/// (reset, timeout) into the client's error for it.
pub(crate) async fn read_capped(
    mut resp: reqwest::Response,
    method: &str,
    path: &str,
    limit: u64,
    transport: impl FnOnce(reqwest::Error) -> PveError,
) -> Result<Vec<u8>, PveError> {
    let too_large = || PveError::ResponseTooLarge {
        method: method.to_owned(),
        path: path.to_owned(),
        limit,
    };
    let declared = resp.content_length();
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    // Reserve what the server announced (already checked against the cap), else a little.
    let mut body = Vec::with_capacity(declared.unwrap_or(8 << 10) as usize);
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() as u64 + chunk.len() as u64 > limit {
                    // Dropping the response here closes the connection: nothing more is read.
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(transport(e)),
        }
    }
}
