//! `producer validate`: every problem of the three files at once, or a one-line summary.

use shared::config::{self, ConfigError};

use crate::cli::Global;
use crate::exit::{Exit, Failure};
use crate::output::Out;

pub fn run(g: &Global, out: &mut Out) -> Result<Exit, Failure> {
    match config::load(&g.data_paths(), g.cluster.as_deref()) {
        Ok(cfg) => {
            let users = cfg.users.users.len();
            let machines = cfg.deployment.machines.len();
            let vms = cfg.deployment.vm_count(users);
            if g.json {
                out.json(&serde_json::json!({
                    "valid": true,
                    "deployment": cfg.deployment.name,
                    "cluster": cfg.cluster,
                    "users": users,
                    "machines": machines,
                    "vms": vms,
                    "warnings": crate::console::validate_warning(&cfg.deployment.role).into_iter().collect::<Vec<_>>(),
                }));
            } else {
                out.line(format!(
                    "ok: deployment {:?} on cluster {:?}: {users} users, {machines} machines, {vms} VMs to create",
                    cfg.deployment.name, cfg.cluster
                ));
            }
            if let Some(w) = crate::console::validate_warning(&cfg.deployment.role) {
                out.err_line(format!("warning: {w}"));
            }
            Ok(Exit::Ok)
        }
        Err(e) => {
            report(&e, g.json, out);
            Ok(Exit::InvalidConfig)
        }
    }
}

/// Prints every issue as `PATH:LINE:COL: message` + `hint:` (or a JSON list).
pub fn report(e: &ConfigError, json: bool, out: &mut Out) {
    if json {
        out.json(&serde_json::json!({ "valid": false, "issues": e.issues }));
    } else {
        for i in &e.issues {
            out.err_line(i.to_string());
        }
        out.err_line(format!(
            "{} problem{} found",
            e.issues.len(),
            if e.issues.len() == 1 { "" } else { "s" }
        ));
    }
}
