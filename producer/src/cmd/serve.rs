//! `producer serve [--listen ADDR] [--admin-token-file F] [--viewer-token-file F]`: the live
//! web dashboard (`crate::serve`). Reads the tokens, refuses an exposed address without an
//! admin token (exit 2, saying why), binds, prints `dashboard on http://ADDR` and serves
//! until Ctrl-C or SIGTERM.

use std::io::Read;
use std::path::Path;

use shared::secret::Secret;
use tokio_util::sync::CancellationToken;

use crate::cli::{Global, ServeArgs};
use crate::cmd::context;
use crate::exit::{Exit, Failure};
use crate::output::Out;
use crate::serve::{self, ServeConfig, Tokens};

/// A token file is one short line; anything longer is a mistake (a key file, a log).
const MAX_TOKEN_FILE: u64 = 4096;

pub async fn run(g: &Global, a: &ServeArgs, out: &mut Out) -> Result<Exit, Failure> {
    let tokens = Tokens {
        admin: token(
            a.admin_token_file.as_deref(),
            "LABFLEET_WEB_ADMIN_TOKEN",
            "admin",
        )?,
        viewer: token(
            a.viewer_token_file.as_deref(),
            "LABFLEET_WEB_VIEWER_TOKEN",
            "viewer",
        )?,
    };
    if let (Some(ad), Some(v)) = (&tokens.admin, &tokens.viewer)
        && ad.expose() == v.expose()
    {
        return Err(usage(
            "the admin and the viewer token are the same; give them different values",
        ));
    }
    serve::auth::check_exposure(a.listen, &tokens).map_err(usage)?;
    let store = context::store(g).await?;
    let cfg = ServeConfig {
        tokens,
        secret_key: context::secret_key()?,
        ..ServeConfig::default()
    };
    let listener = bind(a.listen).await?;
    announce(&listener, out);
    if cfg.secret_key.is_none() {
        out.err_line("note: LABFLEET_SECRET_KEY is not set: the dashboard serves no handouts");
    }
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        stop.cancel();
    });
    serve::run(store, cfg, listener, shutdown)
        .await
        .map_err(|e| Failure::new(Exit::Usage, anyhow::Error::new(e).context("serving")))?;
    Ok(Exit::Ok)
}

fn usage(msg: impl Into<String>) -> Failure {
    Failure::new(Exit::Usage, anyhow::anyhow!(msg.into()))
}

/// Binds the dashboard's address (exit 2 when it is taken or not ours).
pub async fn bind(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, Failure> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| usage(format!("cannot listen on {addr}: {e}")))
}

/// Prints the line scripts and people wait for.
pub fn announce(listener: &tokio::net::TcpListener, out: &mut Out) {
    if let Ok(a) = listener.local_addr() {
        out.line(format!("dashboard on http://{a}"));
    }
}

/// Ctrl-C or SIGTERM.
pub async fn wait_for_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// A token from its file (which wins) or its environment variable; an empty one is an error.
fn token(file: Option<&Path>, var: &str, what: &str) -> Result<Option<Secret>, Failure> {
    let value = match file {
        Some(p) => {
            let mut s = String::new();
            std::fs::File::open(p)
                .and_then(|f| f.take(MAX_TOKEN_FILE + 1).read_to_string(&mut s))
                .map_err(|e| {
                    usage(format!(
                        "cannot read the {what} token file {}: {e}",
                        p.display()
                    ))
                })?;
            if s.len() as u64 > MAX_TOKEN_FILE {
                return Err(usage(format!(
                    "the {what} token file {} is longer than {MAX_TOKEN_FILE} bytes; it should hold one token",
                    p.display()
                )));
            }
            s
        }
        None => match std::env::var(var) {
            Ok(v) => v,
            Err(_) => return Ok(None),
        },
    };
    let t = value.trim();
    if t.is_empty() {
        return Err(usage(format!("the {what} token is empty")));
    }
    if t.len() < 16 {
        return Err(usage(format!(
            "the {what} token is shorter than 16 characters; use a long random one (e.g. `producer secret keygen`)"
        )));
    }
    Ok(Some(Secret::new(t)))
}
