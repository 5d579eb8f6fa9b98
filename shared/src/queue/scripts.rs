//! The Lua scripts, each prefixed with `lua/lib.lua`. `redis::Script` calls EVALSHA and loads
//! the script on NOSCRIPT, so a restarted Redis needs nothing from us.

use std::sync::LazyLock;

use redis::Script;

const LIB: &str = include_str!("lua/lib.lua");

fn script(body: &str) -> Script {
    Script::new(&format!("{LIB}\n{body}"))
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
    RETRY_DEAD => "retry_dead.lua",
    SET_CAP => "set_cap.lua",
}
