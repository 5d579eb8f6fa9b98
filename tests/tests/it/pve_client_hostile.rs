//! The Proxmox client against a hostile server: a tiny real HTTP/1.1 server started in the
//! test on loopback answers with bodies past the size cap, huge messages in 500s and 400s,
//! and a task whose exit status and log are a megabyte each. The client must stop reading at
//! [`MAX_RESPONSE_BYTES`] and keep at most [`MAX_MESSAGE_BYTES`] of any text from a reply.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use shared::pve::*;
use shared::secret::Secret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// What the hostile server sends for one request.
enum Answer {
    /// A complete response (status line, headers, body) sent as is.
    Raw(Vec<u8>),
    /// A 200 with a chunked body of `chunks` chunks of `chunk` bytes, then the final chunk.
    Chunked { chunk: usize, chunks: usize },
    /// A 200 announcing `Content-Length: declared`, then a few bytes, then silence.
    Declared { declared: u64 },
}

/// What the server saw of a chunked body: bytes written, whether it was sent to its end,
/// and whether sending stopped (at the end or on a failed write).
#[derive(Default)]
struct Seen {
    written: AtomicU64,
    finished: AtomicBool,
    stopped: AtomicBool,
}

/// Starts the server on 127.0.0.1; `answer` gets the request line (`GET /api2/json/x HTTP/1.1`).
async fn hostile(
    answer: impl Fn(&str) -> Answer + Send + Sync + 'static,
) -> (std::net::SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let answer = Arc::new(answer);
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(serve(conn, answer.clone(), s.clone()));
        }
    });
    (addr, seen)
}

async fn serve(
    mut conn: TcpStream,
    answer: Arc<impl Fn(&str) -> Answer + Send + Sync>,
    seen: Arc<Seen>,
) {
    let mut buf = Vec::new();
    loop {
        // Read one request head (the client's requests here carry no body).
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut tmp = [0u8; 4096];
            match conn.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let line = head.lines().next().unwrap_or_default().to_owned();
        match answer(&line) {
            Answer::Raw(bytes) => {
                if conn.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Answer::Chunked { chunk, chunks } => {
                send_chunked(&mut conn, chunk, chunks, &seen).await;
                seen.stopped.store(true, Ordering::Relaxed);
                return;
            }
            Answer::Declared { declared } => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n{{\"data\":\""
                );
                let _ = conn.write_all(head.as_bytes()).await;
                // Never send the rest: a client waiting for it waits until its timeout.
                tokio::time::sleep(Duration::from_secs(60)).await;
                return;
            }
        }
    }
}

async fn send_chunked(conn: &mut TcpStream, chunk: usize, chunks: usize, seen: &Seen) {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json;charset=UTF-8\r\n\
                Transfer-Encoding: chunked\r\n\r\n";
    if conn.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let mut piece = format!("{chunk:x}\r\n").into_bytes();
    piece.extend(std::iter::repeat_n(b'a', chunk));
    piece.extend_from_slice(b"\r\n");
    for _ in 0..chunks {
        if conn.write_all(&piece).await.is_err() {
            return;
        }
        seen.written.fetch_add(chunk as u64, Ordering::Relaxed);
    }
    if conn.write_all(b"0\r\n\r\n").await.is_ok() {
        seen.finished.store(true, Ordering::Relaxed);
    }
}

/// A JSON response with `status`, reason phrase `reason` and `body`.
fn json_reply(status: u16, reason: &str, body: &serde_json::Value) -> Answer {
    let body = body.to_string();
    Answer::Raw(
        format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json;charset=UTF-8\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

fn client(addr: std::net::SocketAddr) -> PveClient {
    let mut cfg = ClientConfig::new(
        "hostile",
        addr.ip().to_string(),
        Auth::Token {
            user: "root@pam".into(),
            token_name: "labfleet".into(),
            secret: Secret::new("00000000-0000-4000-8000-000000000000"),
        },
    );
    cfg.port = addr.port();
    cfg.scheme = Scheme::Http;
    cfg.request_timeout = Duration::from_secs(20);
    cfg.read_retries = 0;
    PveClient::new(cfg).unwrap()
}

/// The marker `bound_message` appends, for a text of `len` bytes.
fn marker(len: usize) -> String {
    format!("... [truncated: {len} bytes in all]")
}

/// A long text whose 2 KiB cut falls inside a two-byte character.
fn long_text(len: usize) -> String {
    let mut s = String::from("x");
    while s.len() + 2 <= len {
        s.push('é');
    }
    s
}

fn assert_bounded(text: &str, full_len: usize) {
    assert!(
        text.len() <= MAX_MESSAGE_BYTES + marker(full_len).len(),
        "{} bytes kept",
        text.len()
    );
    assert!(
        text.ends_with(&marker(full_len)),
        "{}",
        &text[text.len() - 60..]
    );
}

#[tokio::test]
async fn a_body_past_the_cap_is_not_read_to_its_end() {
    // 96 MiB in 1 MiB chunks: finite, so that a client without the cap fails this test
    // (with a decode error after reading it all) instead of eating the machine's memory.
    let (addr, seen) = hostile(|_| Answer::Chunked {
        chunk: 1 << 20,
        chunks: 96,
    })
    .await;
    let err = client(addr).version().await.unwrap_err();
    match &err {
        PveError::ResponseTooLarge {
            method,
            path,
            limit,
        } => {
            assert_eq!((method.as_str(), path.as_str()), ("GET", "/version"));
            assert_eq!(*limit, MAX_RESPONSE_BYTES);
        }
        other => panic!("{other:?}"),
    }
    assert!(!err.is_transient());
    assert_eq!(err.class(), ErrorClass::Decode);
    let text = err.to_string();
    assert!(
        text.contains("/version") && text.contains(&MAX_RESPONSE_BYTES.to_string()),
        "{text}"
    );
    // The client hung up at the cap: the server's writes failed before the end.
    labfleet_tests::wait::wait_for(Duration::from_secs(10), "the server to stop", || {
        let seen = seen.clone();
        async move { seen.stopped.load(Ordering::Relaxed) }
    })
    .await;
    assert!(
        !seen.finished.load(Ordering::Relaxed),
        "the whole 96 MiB body was taken ({} bytes)",
        seen.written.load(Ordering::Relaxed)
    );
}

#[tokio::test]
async fn a_content_length_past_the_cap_is_refused_before_reading() {
    let (addr, _) = hostile(|_| Answer::Declared { declared: 1 << 40 }).await;
    let started = std::time::Instant::now();
    let err = client(addr).version().await.unwrap_err();
    assert!(
        matches!(&err, PveError::ResponseTooLarge { path, .. } if path == "/version"),
        "{err:?}"
    );
    // Refused on the header, not after waiting out the 20 s request timeout.
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_500_with_a_megabyte_message_keeps_2_kib_of_it() {
    let message = long_text(1 << 20);
    let m = message.clone();
    let (addr, _) = hostile(move |_| {
        json_reply(
            500,
            "Internal Server Error",
            &serde_json::json!({"data": null, "message": m}),
        )
    })
    .await;
    let err = client(addr).version().await.unwrap_err();
    assert!(
        matches!(err, PveError::Server { status: 500, .. }),
        "{err:?}"
    );
    assert_bounded(&err.message(), message.len());
    assert!(message.starts_with(err.message().trim_end_matches(&marker(message.len()))));
    assert!(err.to_string().len() < MAX_MESSAGE_BYTES + 100);
}

#[tokio::test]
async fn a_long_reason_phrase_on_an_old_server_is_bounded() {
    // Old servers put the message only in the reason phrase (no `message` field).
    let reason = "y".repeat(3000);
    let r = reason.clone();
    let (addr, _) = hostile(move |_| json_reply(500, &r, &serde_json::json!({"data": null}))).await;
    let err = client(addr).version().await.unwrap_err();
    assert_bounded(&err.message(), reason.len());
}

#[tokio::test]
async fn a_400_with_many_huge_parameter_errors_is_bounded() {
    let value = long_text(100 << 10);
    let v = value.clone();
    let (addr, _) = hostile(move |_| {
        let errors: serde_json::Map<String, serde_json::Value> = (0..40)
            .map(|i| (format!("p{i:02}"), serde_json::json!(v)))
            .collect();
        json_reply(
            400,
            "Parameter verification failed.",
            &serde_json::json!({"data": null, "errors": errors}),
        )
    })
    .await;
    let err = client(addr).version().await.unwrap_err();
    let PveError::Param { errors, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(errors.len(), MAX_PARAM_ERRORS + 1, "{:?}", errors.keys());
    assert_eq!(errors["..."], "24 more parameter errors not kept");
    for (k, v) in errors.iter().filter(|(k, _)| *k != "...") {
        assert!(k.starts_with('p'), "{k}");
        assert_bounded(v, value.len());
    }
}

#[tokio::test]
async fn a_task_with_a_megabyte_exit_status_and_log_line_is_bounded() {
    let upid: Upid = "UPID:pve1:00000001:00000002:66DC5987:qmclone:100:root@pam:"
        .parse()
        .unwrap();
    let exit = format!("VM is locked (backup) {}", long_text(1 << 20));
    let line = long_text(1 << 20);
    let (e, l) = (exit.clone(), line.clone());
    let (addr, _) = hostile(move |req| {
        let data = if req.contains("/status") {
            serde_json::json!({"data": {"status": "stopped", "exitstatus": e, "type": "qmclone"}})
        } else {
            serde_json::json!({"data": [{"n": 1, "t": l}, {"n": 2, "t": "TASK ERROR: x"}], "total": 2})
        };
        json_reply(200, "OK", &data)
    })
    .await;
    let opts = WaitOptions {
        initial_poll: Duration::from_millis(10),
        ..WaitOptions::with_timeout(Duration::from_secs(20), CancellationToken::new())
    };
    let err = client(addr).wait_task(&upid, &opts).await.unwrap_err();
    let PveError::TaskFailed {
        exitstatus,
        kind,
        log_tail,
        ..
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_bounded(exitstatus, exit.len());
    assert_eq!(*kind, MessageKind::ConfigLocked);
    assert!(err.is_transient());
    assert_eq!(log_tail.len(), 2);
    assert_bounded(&log_tail[0], line.len());
    assert_eq!(log_tail[1], "TASK ERROR: x");
}
