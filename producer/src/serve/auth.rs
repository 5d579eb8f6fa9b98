//! Who may do what on the dashboard: tokens, sessions, the login cookie and CSRF.
//!
//! - Without tokens the dashboard is *open*: it listens on loopback only (checked at start,
//!   [`check_exposure`]), answers only requests whose `Host` is a loopback name (so a DNS
//!   rebinding page cannot reach it), and every session is an admin's, as the local CLI is.
//! - With tokens (`--admin-token-file` / `LABFLEET_WEB_ADMIN_TOKEN`, `--viewer-token-file` /
//!   `LABFLEET_WEB_VIEWER_TOKEN`) a session starts anonymous and logs in with one of them;
//!   a viewer sees the pages, an admin can also retry, tear down and download handouts.
//! - The session id travels in one cookie, `HttpOnly; SameSite=Strict`; sessions live in
//!   memory (a restart logs everyone out). Each session has its own CSRF token, which every
//!   POST must carry in its form ([`Session::check_csrf`]); login rotates the session id.
//!
//! Tokens are compared in constant time and never written anywhere: not in pages, logs or
//! errors.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use shared::secret::Secret;

/// The cookie holding the session id.
pub const COOKIE: &str = "lf_session";
/// How long a session lives without being used.
const IDLE: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most (anonymous ones are made for every cookie-less visitor).
const MAX_SESSIONS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        }
    }
}

/// The tokens the dashboard accepts; none at all means open (loopback only).
#[derive(Debug, Default, Clone)]
pub struct Tokens {
    pub admin: Option<Secret>,
    pub viewer: Option<Secret>,
}

impl Tokens {
    pub fn open(&self) -> bool {
        self.admin.is_none() && self.viewer.is_none()
    }

    /// The role a presented token grants, if any.
    pub fn role_of(&self, presented: &str) -> Option<Role> {
        let matches = |t: &Option<Secret>| {
            t.as_ref()
                .is_some_and(|t| constant_time_eq(t.expose().as_bytes(), presented.as_bytes()))
        };
        // Both are compared, so the time taken does not tell which one matched.
        let (admin, viewer) = (matches(&self.admin), matches(&self.viewer));
        if admin {
            Some(Role::Admin)
        } else if viewer {
            Some(Role::Viewer)
        } else {
            None
        }
    }
}

/// Equality whose time depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a listen address is refused with these tokens (exit 2 at start).
pub fn check_exposure(listen: SocketAddr, tokens: &Tokens) -> Result<(), String> {
    if !listen.ip().is_loopback() && tokens.admin.is_none() {
        return Err(format!(
            "refusing to listen on {listen} without an admin token: off loopback, the dashboard needs --admin-token-file FILE or LABFLEET_WEB_ADMIN_TOKEN (and --viewer-token-file for read-only users); without tokens use a loopback address such as 127.0.0.1:8080"
        ));
    }
    Ok(())
}

/// One browser's session.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    /// `None` until logged in (never `None` on an open dashboard).
    pub role: Option<Role>,
    pub csrf: String,
    /// Whether the response must set the cookie (a new or rotated session).
    pub fresh: bool,
}

impl Session {
    pub fn is_admin(&self) -> bool {
        self.role == Some(Role::Admin)
    }

    /// Whether `presented` is this session's CSRF token.
    pub fn check_csrf(&self, presented: Option<&str>) -> bool {
        presented.is_some_and(|p| constant_time_eq(p.as_bytes(), self.csrf.as_bytes()))
    }
}

struct Stored {
    role: Option<Role>,
    csrf: String,
    seen: Instant,
}

/// The sessions of one server, and the tokens they log in with.
pub struct Auth {
    pub tokens: Tokens,
    sessions: Mutex<HashMap<String, Stored>>,
}

fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

impl Auth {
    pub fn new(tokens: Tokens) -> Arc<Auth> {
        Arc::new(Auth {
            tokens,
            sessions: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Stored>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session: an admin's on an open dashboard, else anonymous.
    fn create(&self, role: Option<Role>) -> Session {
        let id = random_token();
        let csrf = random_token();
        let mut map = self.lock();
        if map.len() >= MAX_SESSIONS {
            let now = Instant::now();
            map.retain(|_, s| now.duration_since(s.seen) < IDLE);
            if map.len() >= MAX_SESSIONS {
                // Anonymous sessions go first; they only hold a login form's CSRF token.
                map.retain(|_, s| s.role.is_some());
            }
        }
        map.insert(
            id.clone(),
            Stored {
                role,
                csrf: csrf.clone(),
                seen: Instant::now(),
            },
        );
        Session {
            id,
            role,
            csrf,
            fresh: true,
        }
    }

    /// The session of this request's cookie, or a new one.
    pub fn session(&self, headers: &HeaderMap) -> Session {
        if let Some(id) = cookie(headers, COOKIE) {
            let mut map = self.lock();
            if let Some(s) = map.get_mut(id)
                && s.seen.elapsed() < IDLE
            {
                s.seen = Instant::now();
                return Session {
                    id: id.to_owned(),
                    role: s.role,
                    csrf: s.csrf.clone(),
                    fresh: false,
                };
            }
            map.remove(id);
        }
        let role = self.tokens.open().then_some(Role::Admin);
        self.create(role)
    }

    /// Logs the session in with `presented`: a new session id with the token's role, or
    /// `None` (the old session stays as it was).
    pub fn login(&self, old: &Session, presented: &str) -> Option<Session> {
        let role = self.tokens.role_of(presented.trim())?;
        self.lock().remove(&old.id);
        Some(self.create(Some(role)))
    }

    /// Ends the session; the browser gets a fresh anonymous one.
    pub fn logout(&self, old: &Session) -> Session {
        self.lock().remove(&old.id);
        let role = self.tokens.open().then_some(Role::Admin);
        self.create(role)
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The `Set-Cookie` value for a session.
pub fn set_cookie(s: &Session) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        s.id,
        IDLE.as_secs()
    ))
    .expect("session ids are hex")
}

/// Whether `Host` names a loopback address (`localhost`, `127.x.x.x`, `[::1]`).
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Middleware: every request gets its [`Session`] (as an extension), and the response sets
/// the cookie when the session is new. An open dashboard refuses non-loopback `Host`s.
pub async fn layer(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    if auth.tokens.open() && !loopback_host(req.headers()) {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            "this dashboard has no tokens and answers only to a loopback host name\n",
        )
            .into_response();
    }
    let session = auth.session(req.headers());
    let fresh = session.fresh.then(|| set_cookie(&session));
    req.extensions_mut().insert(session);
    let mut resp = next.run(req).await;
    // A handler that rotated the session (login, logout) has set its own cookie.
    if let Some(c) = fresh
        && !resp.headers().contains_key(header::SET_COOKIE)
    {
        resp.headers_mut().insert(header::SET_COOKIE, c);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens {
            admin: Some(Secret::new("admin-secret")),
            viewer: Some(Secret::new("viewer-secret")),
        }
    }

    #[test]
    fn tokens_grant_their_role_and_nothing_else() {
        let t = tokens();
        assert_eq!(t.role_of("admin-secret"), Some(Role::Admin));
        assert_eq!(t.role_of("viewer-secret"), Some(Role::Viewer));
        assert_eq!(t.role_of("admin-secreT"), None);
        assert_eq!(t.role_of(""), None);
        assert!(!t.open());
        assert!(Tokens::default().open());
    }

    #[test]
    fn off_loopback_needs_an_admin_token() {
        let lan: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert!(check_exposure(lo, &Tokens::default()).is_ok());
        let e = check_exposure(lan, &Tokens::default()).unwrap_err();
        assert!(e.contains("admin token"), "{e}");
        let viewer_only = Tokens {
            admin: None,
            viewer: Some(Secret::new("v")),
        };
        assert!(check_exposure(lan, &viewer_only).is_err());
        assert!(check_exposure(lan, &tokens()).is_ok());
    }

    #[test]
    fn sessions_log_in_rotate_and_carry_csrf() {
        let auth = Auth::new(tokens());
        let anon = auth.session(&HeaderMap::new());
        assert_eq!(anon.role, None);
        assert!(anon.fresh);
        assert!(auth.login(&anon, "wrong").is_none());
        let admin = auth.login(&anon, "admin-secret").unwrap();
        assert_ne!(admin.id, anon.id, "login rotates the session id");
        assert!(admin.is_admin());
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {COOKIE}={}", admin.id)).unwrap(),
        );
        let again = auth.session(&h);
        assert_eq!(
            (again.id.as_str(), again.role),
            (admin.id.as_str(), admin.role)
        );
        assert!(!again.fresh);
        assert!(again.check_csrf(Some(&admin.csrf)));
        assert!(!again.check_csrf(Some(&anon.csrf)));
        assert!(!again.check_csrf(None));
        let out = auth.logout(&again);
        assert_eq!(out.role, None);
        assert_eq!(auth.session(&h).role, None, "the old cookie is gone");
    }

    #[test]
    fn loopback_hosts() {
        for (h, ok) in [
            ("127.0.0.1:8080", true),
            ("localhost:1", true),
            ("[::1]:8080", true),
            ("evil.example:8080", false),
            ("192.168.1.100", false),
        ] {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, HeaderValue::from_static(h));
            assert_eq!(loopback_host(&m), ok, "{h}");
        }
        assert!(!loopback_host(&HeaderMap::new()));
    }

    #[test]
    fn the_cookie_is_http_only_and_strict() {
        let auth = Auth::new(Tokens::default());
        let s = auth.session(&HeaderMap::new());
        assert_eq!(s.role, Some(Role::Admin), "open dashboards are the admin's");
        let c = set_cookie(&s);
        let c = c.to_str().unwrap();
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict"),
            "{c}"
        );
    }
}
