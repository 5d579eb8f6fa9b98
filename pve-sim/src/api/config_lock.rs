//! The config `lock` property through `PUT/POST /nodes/{node}/qemu/{vmid}/config`
//! (`qm set --lock backup`): its values (qemu-server's schema enum) and who may set or
//! delete it. qemu-server's `check_vm_modify_config_perm` lets `root@pam` change any key
//! and refuses `lock` to everyone else (tokens included, root's too) with
//! `only root can set 'lock' config`. The lock check itself (`VM is locked (..)` unless
//! `skiplock`) is the config update's, in `qemu.rs`.

use serde_json::Value;

use crate::access::Identity;
use crate::error::{PveError, PveResult};

/// qemu-server's `lock` enum.
const LOCK_VALUES: &[&str] = &[
    "backup",
    "clone",
    "create",
    "migrate",
    "rollback",
    "snapshot",
    "snapshot-delete",
    "suspending",
    "suspended",
];

/// Checks a config update's `lock` value (400) and, if it sets or deletes `lock`, that the
/// caller is root@pam with a ticket (500).
pub(super) fn check(who: &Identity, set: &[(String, Value)], delete: &[String]) -> PveResult<()> {
    if let Some((_, v)) = set.iter().find(|(k, _)| k == "lock") {
        let text = v
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| v.to_string());
        if !LOCK_VALUES.contains(&text.as_str()) {
            return Err(PveError::param(
                "lock",
                format!(
                    "value '{text}' does not have a value in the enumeration '{}'",
                    LOCK_VALUES.join(", ")
                ),
            ));
        }
    }
    let touches = set.iter().any(|(k, _)| k == "lock") || delete.iter().any(|k| k == "lock");
    if touches && !who.is_root_ticket() {
        return Err(PveError::internal("only root can set 'lock' config"));
    }
    Ok(())
}
