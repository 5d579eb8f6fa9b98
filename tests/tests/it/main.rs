//! labfleet's integration tests, one binary (one link step) with a module per area.
//! Shared support (a real redis-server on a free port, the simulator, binaries) lives in the
//! `labfleet_tests` library (`tests/src`).
mod audit;
mod capacity;
mod classroom;
mod cli;
mod compose;
mod lifecycle;
mod lost_replies;
mod metrics;
mod node_loss;
mod pipeline;
mod pve_client;
mod pve_client_hostile;
mod queue;
mod redis_tls;
mod reliability;
mod schedule;
mod sim;
mod ui;
mod web;
