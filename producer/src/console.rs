//! Console links of the handout: each VM's noVNC console in the Proxmox web UI
//! (`https://HOST:PORT/?console=kvm&novnc=1&vmid=VMID&node=NODE`, HOST and PORT from
//! connections.yml). A student can open it only with `VM.Console` on the VM: the default
//! role (PVEVMUser) has it; a custom role gets links only when `/access/roles` says it
//! grants it.

use shared::config::{DEFAULT_ROLE, HostPort};
use shared::pve::PveClient;

use crate::deploy;
use crate::exit::Failure;

/// The privilege that opens a VM's console.
pub const CONSOLE_PRIV: &str = "VM.Console";

/// Built-in roles known to grant `VM.Console` (Proxmox VE 9), for `validate`'s offline check.
const BUILTIN_WITH_CONSOLE: &[&str] = &["Administrator", "PVEAdmin", "PVEVMAdmin", "PVEVMUser"];

/// The web UI's address: `https://HOST:PORT` (IPv6 in brackets).
pub fn base(host: &HostPort) -> String {
    if host.host.contains(':') {
        format!("https://[{}]:{}", host.host, host.port)
    } else {
        format!("https://{}:{}", host.host, host.port)
    }
}

/// The noVNC console link of VM `vmid` on `node`.
pub fn link(base: &str, vmid: u32, node: &str) -> String {
    format!("{base}/?console=kvm&novnc=1&vmid={vmid}&node={node}")
}

/// Whether `role` grants `VM.Console`, as the cluster's `/access/roles` says.
pub async fn role_grants_console(pve: &PveClient, role: &str) -> Result<bool, Failure> {
    if role == DEFAULT_ROLE {
        return Ok(true);
    }
    let roles = pve
        .roles()
        .await
        .map_err(|e| deploy::DeployError::proxmox("reading the roles (for console links)", e))?;
    Ok(roles
        .iter()
        .any(|r| r.roleid == role && r.privs.iter().any(|p| p == CONSOLE_PRIV)))
}

/// `validate`'s warning for a role that may not open consoles (offline: built-in roles are
/// known, a custom one is checked when the handout is written).
pub fn validate_warning(role: &str) -> Option<String> {
    if BUILTIN_WITH_CONSOLE.contains(&role) {
        return None;
    }
    Some(format!(
        "role {role:?} is not one of the built-in roles that grant VM.Console: the handout gives console links only if /access/roles shows it has VM.Console (students without it cannot open the noVNC console)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_name_the_vm_and_node() {
        let h = HostPort::parse("127.0.0.1:8006").unwrap();
        assert_eq!(
            link(&base(&h), 1001, "pve2"),
            "https://127.0.0.1:8006/?console=kvm&novnc=1&vmid=1001&node=pve2"
        );
        let h6 = HostPort::parse("[::1]:8443").unwrap();
        assert_eq!(base(&h6), "https://[::1]:8443");
        assert!(validate_warning("PVEVMUser").is_none());
        assert!(
            validate_warning("LabStudent")
                .unwrap()
                .contains("VM.Console")
        );
    }
}
