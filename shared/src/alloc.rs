//! Collision-free allocation of VMIDs and private bridge names, in Redis.
//!
//! Proxmox's `/cluster/nextid` reserves nothing, so every tool that trusts it has
//! duplicate-VMID races. labfleet reserves each VMID in Redis for its owner (`<deployment>|
//! <vm key>`) with one atomic script, skipping ids the cluster already uses, so any number of
//! producers and workers can allocate at once. The same scheme names private bridges per
//! (cluster, node). A reservation is idempotent by owner: asking again returns the same id.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use redis::Script;

use crate::queue::{Queue, QueueError};

/// `KEYS[1]` id -> owner, `KEYS[2]` owner -> id. ARGV: owner1, id1, owner2, id2, ...
/// Returns per pair: the id now held by the owner (existing or new), or 0 on conflict.
static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local out = {}
for i = 1, #ARGV, 2 do
  local owner, id = ARGV[i], ARGV[i + 1]
  local have = redis.call('HGET', KEYS[2], owner)
  if have then
    out[#out + 1] = have
  elseif redis.call('HSETNX', KEYS[1], id, owner) == 1 then
    redis.call('HSET', KEYS[2], owner, id)
    out[#out + 1] = id
  else
    out[#out + 1] = '0'
  end
end
return out
"#,
    )
});

/// `KEYS[1]` id -> owner, `KEYS[2]` owner -> id. ARGV: owners. Frees their reservations.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = 0
for i = 1, #ARGV do
  local id = redis.call('HGET', KEYS[2], ARGV[i])
  if id then
    if redis.call('HGET', KEYS[1], id) == ARGV[i] then redis.call('HDEL', KEYS[1], id) end
    redis.call('HDEL', KEYS[2], ARGV[i])
    n = n + 1
  end
end
return n
"#,
    )
});

/// `KEYS[1]` id -> owner, `KEYS[2]` owner -> id. ARGV: from, to, allowed ids. Moves the
/// reservation of `from` to `to` if it is one of the allowed ids; returns it, or 0.
static RENAME: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local id = redis.call('HGET', KEYS[2], ARGV[1])
if not id then return 0 end
for i = 3, #ARGV do
  if ARGV[i] == id then
    redis.call('HSET', KEYS[1], id, ARGV[2])
    redis.call('HSET', KEYS[2], ARGV[2], id)
    redis.call('HDEL', KEYS[2], ARGV[1])
    return tonumber(id)
  end
end
return 0
"#,
    )
});

/// One allocation space (VMIDs of a cluster, or bridges of a node).
pub struct Space {
    ids: String,
    owners: String,
}

impl Space {
    pub fn vmids(q: &Queue, cluster: &str) -> Space {
        Space {
            ids: q.key(&format!("alloc:vmid:{cluster}:ids")),
            owners: q.key(&format!("alloc:vmid:{cluster}:owners")),
        }
    }

    /// The two keys (id -> owner, owner -> id), for a script that frees reservations
    /// together with other writes (the teardown finish job's).
    pub fn keys(&self) -> (&str, &str) {
        (&self.ids, &self.owners)
    }

    pub fn bridges(q: &Queue, cluster: &str, node: &str) -> Space {
        Space {
            ids: q.key(&format!("alloc:bridge:{cluster}:{node}:ids")),
            owners: q.key(&format!("alloc:bridge:{cluster}:{node}:owners")),
        }
    }
}

/// Reserves one number in `min..=max` for each owner, skipping `taken` (what the cluster
/// already has) and every number reserved by anyone. Owners that hold a reservation keep it.
pub async fn reserve(
    q: &Queue,
    space: &Space,
    owners: &[String],
    min: u32,
    max: u32,
    taken: &BTreeSet<u32>,
) -> Result<BTreeMap<String, u32>, AllocError> {
    let mut conn = q.connection();
    let mut result = BTreeMap::new();
    let mut pending: Vec<String> = owners.to_vec();
    let mut cursor = min;
    for _round in 0..8 {
        if pending.is_empty() {
            break;
        }
        // Existing reservations of these owners, and every number reserved by anyone.
        let reserved: Vec<String> = redis::cmd("HKEYS")
            .arg(&space.ids)
            .query_async(&mut conn)
            .await
            .map_err(QueueError::from)?;
        let reserved: BTreeSet<u32> = reserved.iter().filter_map(|s| s.parse().ok()).collect();
        let mut args: Vec<String> = Vec::with_capacity(pending.len() * 2);
        for owner in &pending {
            while cursor <= max && (taken.contains(&cursor) || reserved.contains(&cursor)) {
                cursor += 1;
            }
            if cursor > max {
                return Err(AllocError::Exhausted { min, max });
            }
            args.push(owner.clone());
            args.push(cursor.to_string());
            cursor += 1;
        }
        let mut again = Vec::new();
        for chunk in args.chunks(2000) {
            let got: Vec<String> = RESERVE
                .key(&space.ids)
                .key(&space.owners)
                .arg(chunk)
                .invoke_async(&mut conn)
                .await
                .map_err(QueueError::from)?;
            for (pair, id) in chunk.chunks(2).zip(got) {
                match id.parse::<u32>() {
                    Ok(0) | Err(_) => again.push(pair[0].clone()),
                    Ok(n) => {
                        result.insert(pair[0].clone(), n);
                    }
                }
            }
        }
        pending = again;
        cursor = min;
    }
    if !pending.is_empty() {
        return Err(AllocError::Contended);
    }
    Ok(result)
}

/// Reserves exactly `id` for `owner` (deterministic VMIDs). Returns the owner's id, which
/// differs from `id` when the owner already held another, or `None` when `id` is someone else's.
pub async fn reserve_exact(
    q: &Queue,
    space: &Space,
    owner: &str,
    id: u32,
) -> Result<Option<u32>, AllocError> {
    let mut conn = q.connection();
    let got: Vec<String> = RESERVE
        .key(&space.ids)
        .key(&space.owners)
        .arg(owner)
        .arg(id.to_string())
        .invoke_async(&mut conn)
        .await
        .map_err(QueueError::from)?;
    Ok(got.first().and_then(|s| s.parse().ok()).filter(|n| *n != 0))
}

/// What [`reserve`] would most likely hand out, without reserving anything (for `plan`):
/// owners keep what they hold; the others get the next numbers from `min` that `taken`
/// does not contain. One round trip, whatever the number of owners.
pub async fn preview(
    q: &Queue,
    space: &Space,
    owners: &[String],
    min: u32,
    taken: &BTreeSet<u32>,
) -> Result<BTreeMap<String, u32>, AllocError> {
    let mut out = BTreeMap::new();
    if owners.is_empty() {
        return Ok(out);
    }
    let mut conn = q.connection();
    let held: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(&space.owners)
        .arg(owners)
        .query_async(&mut conn)
        .await
        .map_err(QueueError::from)?;
    let mut next = min;
    for (owner, held) in owners.iter().zip(held) {
        if let Some(n) = held.and_then(|s| s.parse().ok()) {
            out.insert(owner.clone(), n);
            continue;
        }
        while taken.contains(&next) {
            next += 1;
        }
        out.insert(owner.clone(), next);
        next += 1;
    }
    Ok(out)
}

/// The reservation an owner holds, if any.
/// Who holds the reservation of `id`, if anyone.
pub async fn owner_of(q: &Queue, space: &Space, id: u32) -> Result<Option<String>, AllocError> {
    let mut c = q.connection();
    let o: Option<String> = redis::AsyncCommands::hget(&mut c, &space.ids, id)
        .await
        .map_err(QueueError::from)?;
    Ok(o)
}

pub async fn lookup(q: &Queue, space: &Space, owner: &str) -> Result<Option<u32>, AllocError> {
    let mut conn = q.connection();
    let v: Option<String> = redis::cmd("HGET")
        .arg(&space.owners)
        .arg(owner)
        .query_async(&mut conn)
        .await
        .map_err(QueueError::from)?;
    Ok(v.and_then(|s| s.parse().ok()))
}

/// Moves an owner to a new number (its old one stays reserved, so it is never reused: the
/// caller quarantines or frees it explicitly).
pub async fn replace(
    q: &Queue,
    space: &Space,
    owner: &str,
    min: u32,
    max: u32,
    taken: &BTreeSet<u32>,
) -> Result<u32, AllocError> {
    let mut conn = q.connection();
    let old: Option<String> = redis::cmd("HGET")
        .arg(&space.owners)
        .arg(owner)
        .query_async(&mut conn)
        .await
        .map_err(QueueError::from)?;
    if let Some(old) = old {
        // Keep the old id reserved under a tombstone owner, then free the owner's slot.
        let _: () = redis::pipe()
            .atomic()
            .hset(&space.ids, &old, format!("{owner}#retired"))
            .hdel(&space.owners, owner)
            .query_async(&mut conn)
            .await
            .map_err(QueueError::from)?;
    }
    let got = reserve(q, space, &[owner.to_owned()], min, max, taken).await?;
    Ok(got[owner])
}

/// Hands the reservation `from` holds to `to`, only if it is one of `allowed` (so a retry
/// never hands over a number `from` was given since). Returns the number handed over.
pub async fn rename(
    q: &Queue,
    space: &Space,
    from: &str,
    to: &str,
    allowed: &[u32],
) -> Result<Option<u32>, AllocError> {
    let mut conn = q.connection();
    let mut inv = RENAME.key(&space.ids);
    inv.key(&space.owners).arg(from).arg(to);
    for a in allowed {
        inv.arg(*a);
    }
    let n: u32 = inv
        .invoke_async(&mut conn)
        .await
        .map_err(QueueError::from)?;
    Ok((n != 0).then_some(n))
}

/// Frees the reservations of `owners`.
pub async fn release(q: &Queue, space: &Space, owners: &[String]) -> Result<u64, AllocError> {
    if owners.is_empty() {
        return Ok(0);
    }
    let mut conn = q.connection();
    let n: u64 = RELEASE
        .key(&space.ids)
        .key(&space.owners)
        .arg(owners)
        .invoke_async(&mut conn)
        .await
        .map_err(QueueError::from)?;
    Ok(n)
}

#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error("no free number left in {min}-{max}")]
    Exhausted { min: u32, max: u32 },
    #[error("allocation kept colliding with concurrent allocations; try again")]
    Contended,
    #[error(transparent)]
    Queue(#[from] QueueError),
}
