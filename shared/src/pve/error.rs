//! `PveError`: every way a Proxmox call can fail, shaped by what the caller must decide.
//!
//! Callers decide by variant (or [`PveError::class`] / [`PveError::is_transient`]), never by
//! message text. Proxmox itself signals most domain errors only as HTTP 500 with a message
//! ("VM is locked (clone)", "... does not exist"), so some text matching is unavoidable;
//! all of it lives here, in one place: [`classify_message`], [`is_vmid_collision`],
//! [`is_in_another_pool`] and, for
//! the transport's own errors, [`classify_transport_text`]. Error texts never contain a
//! secret: the client never puts a ticket, token or password into a message.

use std::collections::BTreeMap;
use std::fmt;

use super::upid::Upid;

/// The coarse class of an error, for exit codes and retry decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    Connect,
    Tls,
    Timeout,
    Auth,
    Permission,
    NotFound,
    AlreadyExists,
    Locked,
    Proxy,
    Param,
    Server,
    TaskFailed,
    Cancelled,
    Decode,
    Config,
}

/// What kind of connection failure happened (for `check-connection` messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The host name did not resolve.
    Dns,
    /// Nothing listens on the port (or a firewall rejects).
    Refused,
    /// Anything else on the way to a response: reset, closed, unreachable...
    Other,
}

/// What a task's exit status says, classified once (see [`classify_message`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// `VM is locked (<lock>)`: a config `lock` property is set.
    ConfigLocked,
    /// `can't lock file ... got timeout`, `got lock request timeout`: contention.
    LockTimeout,
    NotFound,
    AlreadyExists,
    /// `got no worker upid - start worker failed`, `no quorum`: the server had a hiccup.
    ServerBusy,
    /// `unexpected status`: the worker died without a final TASK line.
    UnexpectedStatus,
    Other,
}

impl MessageKind {
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            MessageKind::ConfigLocked
                | MessageKind::LockTimeout
                | MessageKind::ServerBusy
                | MessageKind::UnexpectedStatus
        )
    }
}

/// The one place where Proxmox message texts are interpreted.
pub fn classify_message(msg: &str) -> MessageKind {
    let m = msg.to_ascii_lowercase();
    if m.contains("got timeout")
        || m.contains("got lock request timeout")
        || m.contains("can't lock file")
        || m.contains("-locked command timed out")
    {
        MessageKind::LockTimeout
    } else if m.contains("is locked (") || m.starts_with("vm is locked") {
        MessageKind::ConfigLocked
    } else if m.contains("already exists")
        || m.contains("already a pool member")
        || m.contains("belongs already to pool")
    {
        MessageKind::AlreadyExists
    } else if m.contains("does not exist")
        || m.contains("no such ")
        || m.contains("not a pool member")
        || m.contains("unable to parse worker upid")
    {
        MessageKind::NotFound
    } else if m.contains("got no worker upid")
        || m.contains("no quorum")
        || m.contains("start worker failed")
    {
        MessageKind::ServerBusy
    } else if m.trim() == "unexpected status" {
        MessageKind::UnexpectedStatus
    } else {
        MessageKind::Other
    }
}

/// Whether a failed clone task's message says another guest holds (or took) `vmid`: the
/// target's config exists ("config file already exists", a rename that met "File exists"),
/// or its config lock could not be had.
pub fn is_vmid_collision(msg: &str, vmid: u32) -> bool {
    let m = msg.to_ascii_lowercase();
    (m.contains(&format!("lock-{vmid}.conf")) && classify_message(msg) == MessageKind::LockTimeout)
        || m.contains("file exists")
        || m.contains("already exists")
}

/// Whether a refused pool add says the VM is in another pool (`VM 101 belongs already to
/// pool 'x' and 'allow-move' is not set`), not already in this one (`VM 101 is already a
/// pool member`): both are [`MessageKind::AlreadyExists`].
pub fn is_in_another_pool(msg: &str) -> bool {
    msg.to_ascii_lowercase().contains("belongs already to pool")
}

/// What a transport error's text (hyper's, rustls', the resolver's) says when its types do
/// not: a refused certificate, a failed name lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportText {
    Certificate,
    Dns,
    Other,
}

/// Reads a transport error chain's text, lowercased (the only other place labfleet reads
/// an error's words).
pub fn classify_transport_text(text: &str) -> TransportText {
    let t = text.to_ascii_lowercase();
    if t.contains("invalid peer certificate") {
        TransportText::Certificate
    } else if t.contains("dns error") || t.contains("failed to lookup address") {
        TransportText::Dns
    } else {
        TransportText::Other
    }
}

/// Per-parameter messages of a 400 "Parameter verification failed.".
pub type ParamErrors = BTreeMap<String, String>;

/// A failed Proxmox call.
#[derive(Debug, thiserror::Error)]
pub enum PveError {
    /// No HTTP response: DNS, connection refused, reset, server closed.
    #[error("cannot connect to {url}: {message}")]
    Connect {
        kind: ConnectFailure,
        url: String,
        message: String,
    },
    /// The TLS handshake failed. `presented_fingerprint` is the SHA-256 of the certificate
    /// the server showed (`AB:CD:..`), when the client saw one, so it can be pinned.
    #[error("TLS handshake with {url} failed: {message}{}", fp_suffix(.presented_fingerprint))]
    Tls {
        url: String,
        message: String,
        presented_fingerprint: Option<String>,
    },
    /// The request did not finish within the request timeout.
    #[error("request {method} {path} timed out")]
    Timeout { method: String, path: String },
    /// A task was still running at the wait deadline (it may still finish later).
    #[error("task {upid} still running at the deadline")]
    TaskTimeout { upid: Box<Upid> },
    /// 401: bad credentials, or a ticket the server no longer accepts after a fresh login.
    #[error("authentication failed: {message}")]
    Auth { message: String },
    /// 403: `Permission check failed (/vms/100, VM.Clone)`.
    #[error("permission denied: {message}")]
    Permission { message: String },
    #[error("not found: {message}")]
    NotFound { status: u16, message: String },
    #[error("already exists: {message}")]
    AlreadyExists { status: u16, message: String },
    /// `VM is locked (...)` (`lock_timeout: false`) or a lock acquisition timeout.
    #[error("locked: {message}")]
    Locked {
        status: u16,
        message: String,
        lock_timeout: bool,
    },
    /// 595..599: the node Proxmox proxied to did not answer (offline node, busy daemon).
    #[error("proxy error {status}: {message}")]
    Proxy { status: u16, message: String },
    /// 400 with the per-parameter messages.
    #[error("invalid parameters: {message}{}", param_suffix(.errors))]
    Param {
        message: String,
        errors: ParamErrors,
    },
    /// Other 5xx (and unexpected statuses). `transient` is set for known hiccups
    /// ("got no worker upid", "no quorum") and 502..504.
    #[error("server error {status}: {message}")]
    Server {
        status: u16,
        message: String,
        transient: bool,
    },
    /// The task ended with an error exit status. `log_tail` holds its last log lines.
    #[error("task {upid} failed: {exitstatus}")]
    TaskFailed {
        upid: Box<Upid>,
        exitstatus: String,
        kind: MessageKind,
        log_tail: Vec<String>,
    },
    #[error("cancelled")]
    Cancelled,
    /// The response was not what the API documents (a bug here or in the server).
    #[error("cannot decode response of {path}: {message}")]
    Decode { path: String, message: String },
    /// The response body was larger than `limit` bytes ([`MAX_RESPONSE_BYTES`]); the client
    /// stopped reading it there. Permanent: the same call would get the same body.
    #[error(
        "response of {method} {path} is larger than the limit of {limit} bytes; not read further"
    )]
    ResponseTooLarge {
        method: String,
        path: String,
        limit: u64,
    },
    /// The client could not be built (bad CA file, bad TLS setup).
    #[error("invalid client configuration: {0}")]
    Config(String),
}

fn fp_suffix(fp: &Option<String>) -> String {
    match fp {
        Some(fp) => format!(" (server presented certificate with SHA-256 fingerprint {fp})"),
        None => String::new(),
    }
}

fn param_suffix(errors: &ParamErrors) -> String {
    if errors.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = errors
        .iter()
        .map(|(k, v)| format!("{k}: {}", v.trim_end()))
        .collect();
    format!(" ({})", parts.join("; "))
}

impl PveError {
    pub fn class(&self) -> ErrorClass {
        match self {
            PveError::Connect { .. } => ErrorClass::Connect,
            PveError::Tls { .. } => ErrorClass::Tls,
            PveError::Timeout { .. } | PveError::TaskTimeout { .. } => ErrorClass::Timeout,
            PveError::Auth { .. } => ErrorClass::Auth,
            PveError::Permission { .. } => ErrorClass::Permission,
            PveError::NotFound { .. } => ErrorClass::NotFound,
            PveError::AlreadyExists { .. } => ErrorClass::AlreadyExists,
            PveError::Locked { .. } => ErrorClass::Locked,
            PveError::Proxy { .. } => ErrorClass::Proxy,
            PveError::Param { .. } => ErrorClass::Param,
            PveError::Server { .. } => ErrorClass::Server,
            PveError::TaskFailed { .. } => ErrorClass::TaskFailed,
            PveError::Cancelled => ErrorClass::Cancelled,
            PveError::Decode { .. } | PveError::ResponseTooLarge { .. } => ErrorClass::Decode,
            PveError::Config(_) => ErrorClass::Config,
        }
    }

    /// Whether retrying the same call later (with backoff) may succeed.
    ///
    /// Transient: connection failures other than DNS, request timeouts, task deadlines, lock
    /// contention and `VM is locked` (a clone in progress unlocks; a stale lock will exhaust
    /// the caller's retries), proxy errors 595..599, known server hiccups, and task failures
    /// of those kinds. Everything else is permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            PveError::Connect { kind, .. } => *kind != ConnectFailure::Dns,
            PveError::Timeout { .. } | PveError::TaskTimeout { .. } => true,
            PveError::Locked { .. } | PveError::Proxy { .. } => true,
            PveError::Server { transient, .. } => *transient,
            PveError::TaskFailed { kind, .. } => kind.is_transient(),
            PveError::Tls { .. }
            | PveError::Auth { .. }
            | PveError::Permission { .. }
            | PveError::NotFound { .. }
            | PveError::AlreadyExists { .. }
            | PveError::Param { .. }
            | PveError::Cancelled
            | PveError::Decode { .. }
            | PveError::ResponseTooLarge { .. }
            | PveError::Config(_) => false,
        }
    }

    /// The server's message (for API errors), else the Display text.
    pub fn message(&self) -> String {
        match self {
            PveError::Auth { message }
            | PveError::Permission { message }
            | PveError::NotFound { message, .. }
            | PveError::AlreadyExists { message, .. }
            | PveError::Locked { message, .. }
            | PveError::Proxy { message, .. }
            | PveError::Param { message, .. }
            | PveError::Server { message, .. } => message.clone(),
            PveError::TaskFailed { exitstatus, .. } => exitstatus.clone(),
            other => other.to_string(),
        }
    }

    /// The HTTP status for errors that came with one.
    pub fn status(&self) -> Option<u16> {
        match self {
            PveError::Auth { .. } => Some(401),
            PveError::Permission { .. } => Some(403),
            PveError::Param { .. } => Some(400),
            PveError::NotFound { status, .. }
            | PveError::AlreadyExists { status, .. }
            | PveError::Locked { status, .. }
            | PveError::Proxy { status, .. }
            | PveError::Server { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Builds the error for a non-2xx response. `message` is already chosen (JSON
    /// `message`, else reason phrase, else canonical reason); `errors` is the 400 map.
    /// Both are bounded here ([`bound_message`], [`bound_param_errors`]) before anything
    /// reads them.
    pub fn from_response(status: u16, message: &str, errors: ParamErrors) -> PveError {
        let message = bound_message(message.trim_end());
        let errors = bound_param_errors(errors);
        match status {
            401 => return PveError::Auth { message },
            403 => return PveError::Permission { message },
            595..=599 => return PveError::Proxy { status, message },
            _ => {}
        }
        // Classify on the message and on the per-field messages together: a 400 from
        // nextid says "VM 105 already exists" only in `errors.vmid`.
        let mut kind = classify_message(&message);
        if kind == MessageKind::Other {
            for v in errors.values() {
                let k = classify_message(v);
                if k != MessageKind::Other {
                    kind = k;
                    break;
                }
            }
        }
        match kind {
            MessageKind::AlreadyExists => PveError::AlreadyExists {
                status,
                message: with_errors(message, &errors),
            },
            MessageKind::NotFound => PveError::NotFound {
                status,
                message: with_errors(message, &errors),
            },
            MessageKind::ConfigLocked | MessageKind::LockTimeout => PveError::Locked {
                status,
                message: with_errors(message, &errors),
                lock_timeout: kind == MessageKind::LockTimeout,
            },
            _ if status == 400 => PveError::Param { message, errors },
            MessageKind::ServerBusy => PveError::Server {
                status,
                message,
                transient: true,
            },
            _ => PveError::Server {
                status,
                transient: (502..=504).contains(&status),
                message,
            },
        }
    }
}

fn with_errors(message: String, errors: &ParamErrors) -> String {
    bound_message(&format!("{message}{}", param_suffix(errors)))
}

/// Largest body read from a Proxmox reply. `/cluster/resources` of a 10,000-VM cluster is a
/// few MB; anything past this is a broken or hostile server.
pub const MAX_RESPONSE_BYTES: u64 = 64 << 20;

/// Longest text kept from a Proxmox reply (reason phrase, `message`, each per-parameter
/// message, a task's exit status and each log line), in bytes. These texts end up in Redis
/// step records and log lines; Proxmox's own are a line or two.
pub const MAX_MESSAGE_BYTES: usize = 2048;

/// Most per-parameter messages kept from a 400 reply; the rest are counted in one entry.
pub const MAX_PARAM_ERRORS: usize = 16;

/// Longest parameter name kept from a 400 reply's `errors` map, in bytes.
const MAX_PARAM_NAME_BYTES: usize = 128;

/// `text` cut to at most `max` bytes on a UTF-8 character boundary, with a visible marker
/// saying how long it was when cut.
fn bound_to(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}... [truncated: {} bytes in all]",
        &text[..end],
        text.len()
    )
}

/// A text taken from a Proxmox reply, cut to [`MAX_MESSAGE_BYTES`] (UTF-8 safe, with a
/// `... [truncated: N bytes in all]` marker). The one bound every reply text goes through.
pub fn bound_message(text: &str) -> String {
    bound_to(text, MAX_MESSAGE_BYTES)
}

/// A 400's `errors` map with every name and message bounded and at most
/// [`MAX_PARAM_ERRORS`] entries (the first ones by name); a dropped remainder is counted
/// under the name `...`.
pub fn bound_param_errors(errors: ParamErrors) -> ParamErrors {
    let total = errors.len();
    let mut out: ParamErrors = errors
        .into_iter()
        .take(MAX_PARAM_ERRORS)
        .map(|(k, v)| (bound_to(&k, MAX_PARAM_NAME_BYTES), bound_message(&v)))
        .collect();
    if total > MAX_PARAM_ERRORS {
        out.insert(
            "...".to_owned(),
            format!(
                "{} more parameter errors not kept",
                total - MAX_PARAM_ERRORS
            ),
        );
    }
    out
}

impl PveError {
    /// A task that ended with an error exit status: the exit status and each log line
    /// bounded ([`bound_message`]), then classified.
    pub fn task_failed(upid: &Upid, exitstatus: &str, log_tail: Vec<String>) -> PveError {
        let exitstatus = bound_message(exitstatus);
        PveError::TaskFailed {
            upid: Box::new(upid.clone()),
            kind: classify_message(&exitstatus),
            exitstatus,
            log_tail: log_tail.iter().map(|l| bound_message(l)).collect(),
        }
    }

    /// A reply that does not decode; `message` (serde's, which may quote the reply) bounded.
    pub fn decode(path: &str, message: impl fmt::Display) -> PveError {
        PveError::Decode {
            path: path.to_owned(),
            message: bound_message(&message.to_string()),
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(k: &str, v: &str) -> ParamErrors {
        [(k.to_owned(), v.to_owned())].into_iter().collect()
    }

    #[test]
    fn status_classes() {
        let e = PveError::from_response(401, "authentication failure", ParamErrors::new());
        assert_eq!(e.class(), ErrorClass::Auth);
        assert!(!e.is_transient());
        let e = PveError::from_response(
            403,
            "Permission check failed (/vms/9000, VM.Clone)\n",
            ParamErrors::new(),
        );
        assert_eq!(e.class(), ErrorClass::Permission);
        assert_eq!(e.message(), "Permission check failed (/vms/9000, VM.Clone)");
        for s in [595, 596, 597, 598, 599] {
            let e = PveError::from_response(s, "Connection refused", ParamErrors::new());
            assert_eq!(e.class(), ErrorClass::Proxy);
            assert!(e.is_transient());
            assert_eq!(e.status(), Some(s));
        }
    }

    #[test]
    fn message_classes_on_500() {
        let cases = [
            ("VM is locked (clone)", ErrorClass::Locked, true),
            (
                "can't lock file '/var/lock/qemu-server/lock-101.conf' - got timeout",
                ErrorClass::Locked,
                true,
            ),
            (
                "update pools failed: cfs-lock 'file-user_cfg' error: got lock request timeout",
                ErrorClass::Locked,
                true,
            ),
            (
                "Configuration file 'nodes/pve1/qemu-server/123.conf' does not exist",
                ErrorClass::NotFound,
                false,
            ),
            ("no such user ('u@pve')", ErrorClass::NotFound, false),
            (
                "create user failed: user 'u@pve' already exists",
                ErrorClass::AlreadyExists,
                false,
            ),
            (
                "unable to create VM 100: config file already exists",
                ErrorClass::AlreadyExists,
                false,
            ),
            (
                "got no worker upid - start worker failed",
                ErrorClass::Server,
                true,
            ),
            (
                "VM 100 is running - destroy failed",
                ErrorClass::Server,
                false,
            ),
        ];
        for (msg, class, transient) in cases {
            let e = PveError::from_response(500, msg, ParamErrors::new());
            assert_eq!(e.class(), class, "{msg}");
            assert_eq!(e.is_transient(), transient, "{msg}");
        }
        let e = PveError::from_response(502, "Bad Gateway", ParamErrors::new());
        assert!(e.is_transient());
        let e = PveError::from_response(
            501,
            "Method 'GET /nope' not implemented",
            ParamErrors::new(),
        );
        assert_eq!(e.class(), ErrorClass::Server);
        assert!(!e.is_transient());
    }

    #[test]
    fn param_errors_keep_map_and_classify_by_field_text() {
        let e = PveError::from_response(
            400,
            "Parameter verification failed.",
            errs("newid", "value must have a minimum value of 100"),
        );
        match &e {
            PveError::Param { errors, .. } => {
                assert_eq!(errors["newid"], "value must have a minimum value of 100")
            }
            other => panic!("{other:?}"),
        }
        assert!(
            e.to_string()
                .contains("newid: value must have a minimum value of 100")
        );
        let e = PveError::from_response(
            400,
            "Parameter verification failed.",
            errs("vmid", "VM 105 already exists"),
        );
        assert_eq!(e.class(), ErrorClass::AlreadyExists);
        assert!(e.message().contains("VM 105 already exists"));
        let e = PveError::from_response(
            400,
            "Parameter verification failed.",
            errs("upid", "no such task"),
        );
        assert_eq!(e.class(), ErrorClass::NotFound);
    }

    #[test]
    fn task_exit_texts() {
        assert_eq!(
            classify_message(
                "clone failed: can't lock file '/var/lock/pve-manager/pve-storage-local-lvm' - got timeout"
            ),
            MessageKind::LockTimeout
        );
        assert_eq!(
            classify_message("unexpected status"),
            MessageKind::UnexpectedStatus
        );
        assert!(MessageKind::UnexpectedStatus.is_transient());
        assert_eq!(
            classify_message("you can't start a vm if it's a template"),
            MessageKind::Other
        );
        assert!(!MessageKind::Other.is_transient());
        assert_eq!(
            classify_message("VM is locked (backup)"),
            MessageKind::ConfigLocked
        );
    }

    #[test]
    fn reply_texts_are_bounded_on_a_char_boundary_with_a_marker() {
        assert_eq!(
            bound_message("VM is locked (clone)"),
            "VM is locked (clone)"
        );
        let exact = "a".repeat(MAX_MESSAGE_BYTES);
        assert_eq!(bound_message(&exact), exact);
        // 'é' is two bytes: after one ASCII byte the cut at 2048 falls inside a character.
        let long = format!("x{}", "é".repeat(MAX_MESSAGE_BYTES));
        let cut = bound_message(&long);
        let marker = format!("... [truncated: {} bytes in all]", long.len());
        assert!(cut.ends_with(&marker), "{cut}");
        let kept = cut.strip_suffix(&marker).unwrap();
        assert_eq!(kept.len(), MAX_MESSAGE_BYTES - 1);
        assert!(long.starts_with(kept));
        // from_response bounds the message, each parameter error and the map's size.
        let many: ParamErrors = (0..MAX_PARAM_ERRORS + 3)
            .map(|i| (format!("p{i:02}"), long.clone()))
            .collect();
        let e = PveError::from_response(400, &long, many);
        let PveError::Param { message, errors } = &e else {
            panic!("{e:?}")
        };
        assert!(message.ends_with(&marker));
        assert_eq!(errors.len(), MAX_PARAM_ERRORS + 1);
        assert_eq!(errors["..."], "3 more parameter errors not kept");
        assert!(errors["p00"].ends_with(&marker));
        let e = PveError::from_response(
            500,
            &format!("VM is locked (backup){long}"),
            errs("x", &long),
        );
        assert_eq!(e.class(), ErrorClass::Locked);
        assert!(
            e.message().len() <= MAX_MESSAGE_BYTES + 40,
            "{}",
            e.message().len()
        );
    }

    #[test]
    fn tls_error_shows_presented_fingerprint() {
        let e = PveError::Tls {
            url: "https://pve:8006".into(),
            message: "invalid peer certificate".into(),
            presented_fingerprint: Some("AB:CD".into()),
        };
        assert!(e.to_string().contains("AB:CD"));
        assert_eq!(e.class(), ErrorClass::Tls);
        assert!(!e.is_transient());
    }

    #[test]
    fn vmid_collisions_and_transport_texts_are_read_in_one_place() {
        assert!(is_vmid_collision(
            "unable to create VM 1000: config file already exists",
            1000
        ));
        assert!(is_vmid_collision(
            "close (rename) atomic file '/etc/pve/nodes/pve1/qemu-server/1000.conf' failed: File exists",
            1000
        ));
        assert!(is_vmid_collision(
            "can't lock file '/var/lock/qemu-server/lock-1000.conf' - got timeout",
            1000
        ));
        assert!(!is_vmid_collision(
            "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout",
            1000
        ));
        assert!(!is_vmid_collision("storage 'local-lvm' is full", 1000));
        let moved =
            "update pools failed: VM 101 belongs already to pool 'x' and 'allow-move' is not set";
        let member = "update pools failed: VM 101 is already a pool member";
        assert_eq!(classify_message(moved), MessageKind::AlreadyExists);
        assert_eq!(classify_message(member), MessageKind::AlreadyExists);
        assert!(is_in_another_pool(moved) && !is_in_another_pool(member));
        assert_eq!(
            classify_transport_text(
                "error sending request: dns error: failed to lookup address information"
            ),
            TransportText::Dns
        );
        assert_eq!(
            classify_transport_text("invalid peer certificate: UnknownIssuer"),
            TransportText::Certificate
        );
        assert_eq!(
            classify_transport_text("connection reset"),
            TransportText::Other
        );
    }
}
