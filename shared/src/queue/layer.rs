//! `LeaseLayer`: the backend middleware apalis puts outside every user layer. Inside each
//! job's own future it renews the lease, watches for shutdown, and settles the job by the
//! class of its result (ack / fail / release), every settle carrying the lease token.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis_core::error::{AbortError, BoxDynError};
use apalis_core::task::Task;
use apalis_core::worker::context::WorkerContext;
use futures::FutureExt;
use futures::future::BoxFuture;
use tower::{Layer, Service};
use tracing::Instrument;

use super::backend::WorkerShared;
use super::error::{JobError, QueueError, SettleError};
use super::lease::Lease;
use super::queue::{FailOutcome, Settled};

/// Tower layer returned by `LeaseBackend::middleware`; not added by hand.
#[derive(Clone)]
pub struct LeaseLayer {
    shared: Arc<WorkerShared>,
    ctx: WorkerContext,
}

impl LeaseLayer {
    pub(crate) fn new(shared: Arc<WorkerShared>, ctx: WorkerContext) -> Self {
        Self { shared, ctx }
    }
}

impl<S> Layer<S> for LeaseLayer {
    type Service = LeaseService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LeaseService {
            inner,
            shared: self.shared.clone(),
            ctx: self.ctx.clone(),
        }
    }
}

/// The service made by `LeaseLayer`.
#[derive(Clone)]
pub struct LeaseService<S> {
    inner: S,
    shared: Arc<WorkerShared>,
    ctx: WorkerContext,
}

/// Counts a job as running in this worker until its future ends (or is dropped).
struct InflightGuard(Arc<WorkerShared>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.job_finished();
    }
}

impl<S, Args> Service<Task<Args>> for LeaseService<S>
where
    S: Service<Task<Args>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxDynError>,
    S::Response: Send + 'static,
    Args: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxDynError;
    type Future = BoxFuture<'static, Result<S::Response, BoxDynError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, task: Task<Args>) -> Self::Future {
        let guard = InflightGuard(self.shared.clone());
        let lease = task.data().get::<Lease>().cloned();
        let span = match &lease {
            Some(l) => tracing::info_span!(
                "job",
                job_id = l.job_key(),
                kind = l.kind(),
                attempt = l.attempt(),
                group = l.group().unwrap_or("")
            ),
            None => tracing::info_span!("job"),
        };
        let fut = span.in_scope(|| self.inner.call(task));
        let ctx = self.ctx.clone();
        let grace = self.shared.queue.config().shutdown_grace;
        async move {
            let _guard = guard;
            let Some(lease) = lease else {
                return Err(SettleError::NoLease.into());
            };
            let outcome = drive(fut, &lease, &ctx, grace).await;
            settle(&lease, outcome).await
        }
        .instrument(span)
        .boxed()
    }
}

enum Outcome<R> {
    Finished(Result<R, BoxDynError>),
    /// Still running when the shutdown grace period ended: dropped, handed back.
    Abandoned,
}

async fn drive<F, R, E>(fut: F, lease: &Lease, ctx: &WorkerContext, grace: Duration) -> Outcome<R>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxDynError>,
{
    tokio::select! {
        r = fut => Outcome::Finished(r.map_err(Into::into)),
        never = renew_until_lost(lease) => match never {},
        () = shutdown_then_grace(ctx, lease, grace) => Outcome::Abandoned,
    }
}

enum Never {}

async fn renew_until_lost(lease: &Lease) -> Never {
    // A renewal period set apart from the lease (the field written on its own) must still
    // renew in time: never less often than twice per lease.
    let every = lease
        .queue()
        .config()
        .renew_every
        .min(lease.lease_len() / 2);
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(every).await;
        match lease.renew().await {
            Ok(true) => last_ok = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::warn!("lease lost: renewal refused");
                lease.mark_lost();
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease renewal failed");
                if last_ok.elapsed() >= lease.lease_len() {
                    lease.mark_lost();
                    break;
                }
            }
        }
    }
    std::future::pending().await
}

async fn shutdown_then_grace(ctx: &WorkerContext, lease: &Lease, grace: Duration) {
    while !ctx.is_shutting_down() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lease.request_stop();
    tokio::time::sleep(grace).await;
    tracing::warn!("shutdown grace period over; handing the job back");
}

enum Action {
    Ack,
    Fail {
        retryable: bool,
        delay: Duration,
        keep_slots: bool,
    },
    Release(Duration),
    ReleaseKeepingSlots(Duration),
}

fn classify(lease: &Lease, e: &BoxDynError) -> Action {
    let retry = |keep_slots| Action::Fail {
        retryable: true,
        delay: lease
            .queue()
            .config()
            .retry_for(lease.kind())
            .backoff(lease.attempt()),
        keep_slots,
    };
    if let Some(j) = e.downcast_ref::<JobError>() {
        return match j {
            JobError::Retry(_) => retry(false),
            JobError::RetryKeepingSlots(_) => retry(true),
            JobError::RetryAfter(d, _) => Action::Fail {
                retryable: true,
                delay: *d,
                keep_slots: false,
            },
            JobError::Permanent(_) => Action::Fail {
                retryable: false,
                delay: Duration::ZERO,
                keep_slots: false,
            },
            JobError::Deferred | JobError::LeaseLost => Action::Release(Duration::ZERO),
            JobError::DeferredFor(d) => Action::Release(*d),
            JobError::DeferredKeepingSlots(d) => Action::ReleaseKeepingSlots(*d),
        };
    }
    if e.downcast_ref::<AbortError>().is_some() {
        return Action::Fail {
            retryable: false,
            delay: Duration::ZERO,
            keep_slots: false,
        };
    }
    retry(false)
}

async fn settle<R>(lease: &Lease, outcome: Outcome<R>) -> Result<R, BoxDynError> {
    let (action, result, message) = match outcome {
        Outcome::Finished(Ok(r)) => (Action::Ack, Ok(r), String::new()),
        Outcome::Finished(Err(e)) => {
            let a = classify(lease, &e);
            let msg = e.to_string();
            (a, Err(e), msg)
        }
        Outcome::Abandoned => (
            Action::Release(Duration::ZERO),
            Err(BoxDynError::from(JobError::Deferred)),
            String::new(),
        ),
    };
    let q = lease.queue();
    let followups = match action {
        Action::Ack => lease.take_followups(),
        _ => Vec::new(),
    };
    let mut backoff = Duration::from_millis(100);
    let mut tries = 0;
    let settled = loop {
        let r: Result<Settled, QueueError> = match &action {
            Action::Ack => q
                .ack_with_followups(lease.job_key(), lease.token(), &followups)
                .await
                .map(|(s, _)| s),
            Action::Fail {
                retryable,
                delay,
                keep_slots,
            } => {
                let outcome = FailOutcome {
                    error: &message,
                    retryable: *retryable,
                    delay: *delay,
                    keep_slots: *keep_slots,
                };
                q.fail(lease.job_key(), lease.token(), lease.worker(), &outcome)
                    .await
            }
            Action::Release(d) => q.release(lease.job_key(), lease.token(), *d).await,
            Action::ReleaseKeepingSlots(d) => {
                q.release_keeping_slots(lease.job_key(), lease.token(), *d)
                    .await
            }
        };
        match r {
            Ok(s) => break s,
            // Every settle script records its token, so a replay is answered AlreadyApplied.
            Err(e) if tries < 4 => {
                tracing::warn!(error = %e, "settle failed; retrying");
                tries += 1;
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Err(source) => {
                return Err(SettleError::Redis {
                    job: lease.job_key().to_owned(),
                    source,
                }
                .into());
            }
        }
    };
    tracing::debug!(?settled, "settled");
    match settled {
        Settled::Stale => {
            lease.mark_lost();
            Err(SettleError::Stale(lease.job_key().to_owned()).into())
        }
        _ => result,
    }
}
