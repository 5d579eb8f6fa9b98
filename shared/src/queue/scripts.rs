//! The Lua scripts, each prefixed with `lua/lib.lua`. `redis::Script` calls EVALSHA and loads
//! the script on NOSCRIPT, so a restarted Redis needs nothing from us.

use std::sync::LazyLock;

use redis::Script;

const LIB: &str = include_str!("lua/lib.lua");

fn script(body: &str) -> Script {
    Script::new(&format!("{LIB}\n{body}"))
}

/// The prelude of every [`FencedScript`]: nothing runs unless the caller holds the lease.
const FENCE: &str = "if redis.call('HGET', jk(ARGV[2]), 'token') ~= ARGV[3] then return 0 end";

/// A write on behalf of a job, written by a layer above the queue (the pipeline's progress
/// records) and run only while the job's lease holds: `lib.lua`, then a token check that
/// returns 0 when stale, then the body, which must return 1. The body's arguments start at
/// `ARGV[4]`: first the keys it writes (checked by [`super::Queue::eval_fenced`] to be in
/// the queue's slot), then its other arguments.
pub struct FencedScript(pub(crate) Script);

impl FencedScript {
    pub fn new(body: &str) -> FencedScript {
        FencedScript(Script::new(&format!("{LIB}\n{FENCE}\n{body}")))
    }
}

macro_rules! scripts {
    ($($name:ident => $file:literal),* $(,)?) => {
        $(pub(crate) static $name: LazyLock<Script> =
            LazyLock::new(|| script(include_str!(concat!("lua/", $file))));)*
    };
}

scripts! {
    ENQUEUE => "enqueue.lua",
    CLAIM => "claim.lua",
    ACK => "ack.lua",
    FAIL => "fail.lua",
    RELEASE => "release.lua",
    RENEW => "renew.lua",
    FENCED_HSET => "fenced_hset.lua",
    REAP => "reap.lua",
    CANCEL_GROUP => "cancel_group.lua",
    CANCEL_JOBS => "cancel_jobs.lua",
    PURGE_GROUP => "purge_group.lua",
    RETRY_DEAD => "retry_dead.lua",
    SET_CAP => "set_cap.lua",
}
