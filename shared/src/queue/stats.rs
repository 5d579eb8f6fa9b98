//! What the queue counts, each figure one O(1) Redis read: the queue's, a concurrency key's,
//! a group's.

use std::time::Duration;

/// Counts of one queue; every figure is one O(1) Redis read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Due and waiting for a worker.
    pub ready: u64,
    /// Waiting for a delay or a retry backoff.
    pub scheduled: u64,
    /// Waiting for predecessors (also: blocked behind a dead predecessor).
    pub gated: u64,
    /// Due but parked until a concurrency slot frees.
    pub waiting_for_slot: u64,
    /// Claimed and leased.
    pub in_flight: u64,
    /// Dead letters.
    pub dead: u64,
    /// Jobs finished (a counter: not decremented when a done record expires).
    pub done: u64,
    /// Cancelled.
    pub cancelled: u64,
    /// Acks since the queue was created.
    pub acked_total: u64,
    /// How long the oldest ready job has been due.
    pub oldest_ready_age: Option<Duration>,
}

/// Counts of one concurrency key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotStats {
    /// The cap, if one is set.
    pub cap: Option<u32>,
    /// Jobs holding the key now (running, or kept across a lost lease).
    pub held: u64,
    /// Jobs parked until the key has room.
    pub waiting: u64,
    /// Most holders ever seen at once (recorded atomically at claim).
    pub high_water: u64,
    /// How long the first parked job has been due.
    pub oldest_waiting_age: Option<Duration>,
}

/// Counts of one group, by state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupStats {
    /// Due, waiting for a worker.
    pub ready: u64,
    /// Delayed or backing off.
    pub scheduled: u64,
    /// Waiting for predecessors.
    pub gated: u64,
    /// Parked on a concurrency key.
    pub waiting_for_slot: u64,
    /// Running.
    pub in_flight: u64,
    /// Dead letters.
    pub dead: u64,
    /// Done.
    pub done: u64,
    /// Cancelled.
    pub cancelled: u64,
}

impl GroupStats {
    /// Jobs that may still run: due, delayed, parked on a slot or running.
    pub fn runnable(&self) -> u64 {
        self.ready + self.scheduled + self.in_flight + self.waiting_for_slot
    }

    /// Jobs not finished yet: the runnable ones and those waiting for predecessors.
    pub fn open(&self) -> u64 {
        self.runnable() + self.gated
    }

    /// Adds another group's counts (the teardowns an epoch waits for, summed).
    pub fn add(&mut self, o: &GroupStats) {
        self.ready += o.ready;
        self.scheduled += o.scheduled;
        self.gated += o.gated;
        self.waiting_for_slot += o.waiting_for_slot;
        self.in_flight += o.in_flight;
        self.dead += o.dead;
        self.done += o.done;
        self.cancelled += o.cancelled;
    }
}
