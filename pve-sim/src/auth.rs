//! Authentication: tickets (`PVE:<user>:<hex time>::<sig>`, HMAC-signed here instead of
//! RSA), CSRF tokens, their 2 h lifetime against the advanceable clock, API token headers,
//! and the `Auth` extractor that answers failures with PVE's empty-body, delayed 401s.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::access::Identity;
use crate::error::PveError;
use crate::state::Shared;

fn sign(secret: &[u8; 32], data: &str) -> String {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("hmac accepts any key length");
    m.update(data.as_bytes());
    STANDARD_NO_PAD.encode(m.finalize().into_bytes())
}

pub(crate) fn make_ticket(secret: &[u8; 32], user: &str, time: i64) -> String {
    let data = format!("PVE:{user}:{:08X}", time as u32);
    format!("{data}::{}", sign(secret, &data))
}

pub(crate) fn make_csrf(secret: &[u8; 32], user: &str, time: i64) -> String {
    let t = format!("{:08X}", time as u32);
    format!("{t}:{}", sign(secret, &format!("{t}:{user}")))
}

fn age_ok(app: &Shared, time: i64) -> bool {
    let age = app.ticket_clock() - time;
    age > -300 && age < app.ticket_lifetime
}

/// Returns the user of a valid, unexpired ticket.
pub(crate) fn verify_ticket(app: &Shared, ticket: &str) -> Option<String> {
    let (data, sig) = ticket.split_once("::")?;
    let rest = data.strip_prefix("PVE:")?;
    let (user, hex) = rest.rsplit_once(':')?;
    let time = i64::from_str_radix(hex, 16).ok()?;
    (hex.len() == 8 && sign(&app.secret, data) == sig && age_ok(app, time))
        .then(|| user.to_string())
}

fn verify_csrf(app: &Shared, token: &str, user: &str) -> bool {
    let Some((hex, _)) = token.split_once(':') else {
        return false;
    };
    let Ok(time) = i64::from_str_radix(hex, 16) else {
        return false;
    };
    token == make_csrf(&app.secret, user, time) && age_ok(app, time)
}

/// The authenticated caller of an API request.
pub(crate) struct Auth(pub Identity);

fn cookie_ticket(headers: &HeaderMap) -> Option<String> {
    for h in headers.get_all(header::COOKIE) {
        let Ok(s) = h.to_str() else { continue };
        for c in s.split(';') {
            if let Some(v) = c.trim().strip_prefix("PVEAuthCookie=") {
                return Some(
                    percent_encoding::percent_decode_str(v)
                        .decode_utf8_lossy()
                        .into_owned(),
                );
            }
        }
    }
    None
}

async fn fail(app: &Shared, msg: &str) -> PveError {
    if !app.auth_delay.is_zero() {
        tokio::time::sleep(app.auth_delay).await;
    }
    PveError::auth(msg)
}

/// Parses `PVEAPIToken=user@realm!id=secret` (a space may replace the first `=`).
fn parse_token_header(v: &str) -> Option<(String, String, String)> {
    let rest = v.strip_prefix("PVEAPIToken")?;
    let rest = rest.strip_prefix('=').or_else(|| rest.strip_prefix(' '))?;
    let (full, secret) = rest.split_once('=')?;
    let (user, id) = full.split_once('!')?;
    Some((
        user.trim().to_string(),
        id.to_string(),
        secret.trim().to_string(),
    ))
}

/// Authenticates a request (token header, or ticket cookie plus CSRF token on writes), or
/// says why not, without the 401 delay. pveproxy does this itself, before it hands a
/// protected call to pvedaemon; the front end uses it to know whether a call will reach
/// an API worker at all.
pub(crate) fn identify(
    app: &Shared,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Identity, &'static str> {
    let authz = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(a) = &authz
        && a.starts_with("PVEAPIToken")
    {
        let Some((user, id, secret)) = parse_token_header(a) else {
            return Err("invalid token value!");
        };
        let found = {
            let st = app.state.lock();
            let enabled = st.users.get(&user).is_some_and(|u| u.enable);
            st.tokens
                .get(&format!("{user}!{id}"))
                .filter(|t| enabled && t.secret == secret)
                .map(|t| t.privsep)
        };
        return match found {
            Some(privsep) => Ok(Identity {
                user,
                token: Some(id),
                privsep,
            }),
            None => Err("invalid token value!"),
        };
    }
    let ticket = cookie_ticket(headers)
        .or_else(|| authz.and_then(|a| a.strip_prefix("PVEAuthCookie=").map(str::to_string)));
    let Some(ticket) = ticket else {
        return Err("No ticket");
    };
    let Some(user) = verify_ticket(app, &ticket) else {
        return Err("permission denied - invalid PVE ticket");
    };
    if !app.state.lock().users.get(&user).is_some_and(|u| u.enable) {
        return Err("permission denied - invalid PVE ticket");
    }
    if method != Method::GET && method != Method::HEAD {
        let ok = headers
            .get("CSRFPreventionToken")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| verify_csrf(app, t, &user));
        if !ok {
            return Err("Permission denied - invalid csrf token");
        }
    }
    Ok(Identity {
        user,
        token: None,
        privsep: false,
    })
}

impl FromRequestParts<Arc<Shared>> for Auth {
    type Rejection = PveError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<Shared>) -> Result<Self, PveError> {
        match identify(app, &parts.method, &parts.headers) {
            Ok(who) => Ok(Auth(who)),
            Err(msg) => Err(fail(app, msg).await),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_header_forms() {
        assert_eq!(
            parse_token_header("PVEAPIToken=root@pam!labfleet=abc-1").unwrap(),
            ("root@pam".into(), "labfleet".into(), "abc-1".into())
        );
        assert!(parse_token_header("PVEAPIToken root@pam!x=s").is_some());
        assert!(parse_token_header("PVEAPIToken=root@pam=s").is_none());
        let t = make_ticket(&[1; 32], "root@pam", 0x66DC5987);
        assert!(t.starts_with("PVE:root@pam:66DC5987::"));
        assert!(make_csrf(&[1; 32], "root@pam", 0x66DC5987).starts_with("66DC5987:"));
    }
}
