//! Privileges: the built-in roles of PVE 9, ACL evaluation per path with propagation and
//! pool-derived rights, and token privilege separation. Pure functions over the state; the
//! HTTP handlers for users/ACLs/roles are in `api/access.rs`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

pub(crate) const ALL_PRIVS: &[&str] = &[
    "Datastore.Allocate",
    "Datastore.AllocateSpace",
    "Datastore.AllocateTemplate",
    "Datastore.Audit",
    "Group.Allocate",
    "Mapping.Audit",
    "Mapping.Modify",
    "Mapping.Use",
    "Permissions.Modify",
    "Pool.Allocate",
    "Pool.Audit",
    "Realm.Allocate",
    "Realm.AllocateUser",
    "SDN.Allocate",
    "SDN.Audit",
    "SDN.Use",
    "Sys.AccessNetwork",
    "Sys.Audit",
    "Sys.Console",
    "Sys.Incoming",
    "Sys.Modify",
    "Sys.PowerMgmt",
    "Sys.Syslog",
    "User.Modify",
    "VM.Allocate",
    "VM.Audit",
    "VM.Backup",
    "VM.Clone",
    "VM.Config.CDROM",
    "VM.Config.CPU",
    "VM.Config.Cloudinit",
    "VM.Config.Disk",
    "VM.Config.HWType",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.Options",
    "VM.Console",
    "VM.GuestAgent.Audit",
    "VM.GuestAgent.FileRead",
    "VM.GuestAgent.FileSystemMgmt",
    "VM.GuestAgent.FileWrite",
    "VM.GuestAgent.Unrestricted",
    "VM.Migrate",
    "VM.PowerMgmt",
    "VM.Replicate",
    "VM.Snapshot",
    "VM.Snapshot.Rollback",
];

/// The built-in (special, immutable) roles.
pub(crate) fn builtin_roles() -> BTreeMap<String, BTreeSet<String>> {
    let all = || ALL_PRIVS.iter().map(|s| s.to_string());
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    let mut r = BTreeMap::new();
    r.insert("Administrator".into(), all().collect());
    r.insert("NoAccess".into(), BTreeSet::new());
    let root_only = [
        "Sys.PowerMgmt",
        "Sys.Modify",
        "Sys.Incoming",
        "Sys.AccessNetwork",
        "Realm.Allocate",
        "Permissions.Modify",
        "Mapping.Modify",
    ];
    r.insert(
        "PVEAdmin".into(),
        all().filter(|p| !root_only.contains(&p.as_str())).collect(),
    );
    r.insert(
        "PVEAuditor".into(),
        all().filter(|p| p.ends_with(".Audit")).collect(),
    );
    r.insert(
        "PVEVMAdmin".into(),
        all().filter(|p| p.starts_with("VM.")).collect(),
    );
    let mut vmuser = set(&[
        "VM.Audit",
        "VM.Backup",
        "VM.Config.CDROM",
        "VM.Config.Cloudinit",
        "VM.Console",
        "VM.PowerMgmt",
    ]);
    vmuser.extend(all().filter(|p| p.starts_with("VM.GuestAgent.")));
    r.insert("PVEVMUser".into(), vmuser);
    r.insert("PVETemplateUser".into(), set(&["VM.Audit", "VM.Clone"]));
    r.insert(
        "PVEDatastoreAdmin".into(),
        all().filter(|p| p.starts_with("Datastore.")).collect(),
    );
    r.insert(
        "PVEDatastoreUser".into(),
        set(&["Datastore.AllocateSpace", "Datastore.Audit"]),
    );
    r.insert("PVEPoolAdmin".into(), set(&["Pool.Allocate", "Pool.Audit"]));
    r.insert("PVEPoolUser".into(), set(&["Pool.Audit"]));
    r.insert(
        "PVESDNAdmin".into(),
        set(&["SDN.Allocate", "SDN.Audit", "SDN.Use"]),
    );
    r.insert("PVESDNUser".into(), set(&["SDN.Audit", "SDN.Use"]));
    r.insert(
        "PVEUserAdmin".into(),
        set(&["User.Modify", "Group.Allocate", "Realm.AllocateUser"]),
    );
    r.insert(
        "PVESysAdmin".into(),
        set(&["Sys.Audit", "Sys.Console", "Sys.Syslog"]),
    );
    r.insert(
        "PVEMappingAdmin".into(),
        set(&["Mapping.Audit", "Mapping.Modify", "Mapping.Use"]),
    );
    r.insert(
        "PVEMappingUser".into(),
        set(&["Mapping.Audit", "Mapping.Use"]),
    );
    r
}

/// One ACL entry (`GET /access/acl` shape).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct AclEntry {
    pub path: String,
    /// `user` or `token` (groups are not modelled).
    #[serde(rename = "type")]
    pub kind: String,
    pub ugid: String,
    pub roleid: String,
    pub propagate: u8,
}

/// Who is calling.
#[derive(Clone, Debug)]
pub(crate) struct Identity {
    /// `user@realm`.
    pub user: String,
    /// Token id when authenticated by API token.
    pub token: Option<String>,
    pub privsep: bool,
}

impl Identity {
    /// The user field of UPIDs and the `ugid` of token ACLs: `user@realm!token`.
    pub fn full(&self) -> String {
        match &self.token {
            Some(t) => format!("{}!{t}", self.user),
            None => self.user.clone(),
        }
    }
    pub fn is_root_ticket(&self) -> bool {
        self.user == "root@pam" && self.token.is_none()
    }
}

/// Whether `path` is a valid ACL path.
pub(crate) fn valid_acl_path(path: &str) -> bool {
    if path == "/" {
        return true;
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if !path.starts_with('/') || parts.iter().any(|p| p.is_empty()) {
        return false;
    }
    match parts[0] {
        "access" => {
            parts.len() == 1
                || (parts[1] == "groups" && parts.len() <= 3)
                || (parts[1] == "realm" && parts.len() <= 3)
        }
        "nodes" | "storage" => parts.len() <= 2,
        "vms" => parts.len() == 1 || (parts.len() == 2 && parts[1].parse::<u32>().is_ok()),
        "pool" => parts.len() <= 4,
        "sdn" | "mapping" => true,
        _ => false,
    }
}

/// Role ids granted to `ugid` on `path` by walking from `/` down: the most specific level
/// with an entry for `ugid` wins; entries on ancestors count only with propagate.
fn roles_on(acls: &[AclEntry], ugid: &str, path: &str) -> BTreeSet<String> {
    let mut levels = vec!["/".to_string()];
    let mut acc = String::new();
    for part in path
        .trim_start_matches('/')
        .split('/')
        .filter(|p| !p.is_empty())
    {
        acc.push('/');
        acc.push_str(part);
        levels.push(acc.clone());
    }
    let mut roles = BTreeSet::new();
    for level in &levels {
        let last = level == path || (path.is_empty() && level == "/");
        let here: BTreeSet<String> = acls
            .iter()
            .filter(|a| a.ugid == ugid && &a.path == level && (last || a.propagate == 1))
            .map(|a| a.roleid.clone())
            .collect();
        if !here.is_empty() {
            roles = here;
        }
    }
    roles
}

fn privs_of(
    acls: &[AclEntry],
    roles: &BTreeMap<String, BTreeSet<String>>,
    ugid: &str,
    path: &str,
    vm_pool: Option<&str>,
) -> BTreeSet<String> {
    let mut rs = roles_on(acls, ugid, path);
    if let Some(pool) = vm_pool {
        rs.extend(roles_on(acls, ugid, &format!("/pool/{pool}")));
    }
    rs.iter()
        .filter_map(|r| roles.get(r))
        .flatten()
        .cloned()
        .collect()
}

/// Effective privileges of `who` on `path`. `vm_pool` is the pool of the VM when `path`
/// is `/vms/<id>` (pool ACLs apply to member VMs).
pub(crate) fn effective_privs(
    acls: &[AclEntry],
    roles: &BTreeMap<String, BTreeSet<String>>,
    who: &Identity,
    path: &str,
    vm_pool: Option<&str>,
) -> BTreeSet<String> {
    let all = || ALL_PRIVS.iter().map(|s| s.to_string()).collect();
    let user_privs = if who.user == "root@pam" {
        all()
    } else {
        privs_of(acls, roles, &who.user, path, vm_pool)
    };
    match &who.token {
        Some(_) if who.privsep => {
            let tok = privs_of(acls, roles, &who.full(), path, vm_pool);
            user_privs.intersection(&tok).cloned().collect()
        }
        _ => user_privs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(path: &str, ugid: &str, role: &str, prop: u8) -> AclEntry {
        AclEntry {
            path: path.into(),
            kind: "user".into(),
            ugid: ugid.into(),
            roleid: role.into(),
            propagate: prop,
        }
    }

    #[test]
    fn propagation_pools_and_privsep() {
        let roles = builtin_roles();
        let acls = vec![
            acl("/vms/101", "s@pve", "PVEVMUser", 1),
            acl("/pool/lab", "t@pve", "PVEVMAdmin", 1),
            acl("/", "a@pve", "PVEAuditor", 0),
            acl("/", "b@pve", "PVEAuditor", 1),
        ];
        let id = |u: &str| Identity {
            user: u.into(),
            token: None,
            privsep: true,
        };
        let p = effective_privs(&acls, &roles, &id("s@pve"), "/vms/101", None);
        assert!(p.contains("VM.PowerMgmt") && !p.contains("VM.Allocate"));
        assert!(effective_privs(&acls, &roles, &id("s@pve"), "/vms/102", None).is_empty());
        assert!(
            effective_privs(&acls, &roles, &id("t@pve"), "/vms/5", Some("lab"))
                .contains("VM.Allocate")
        );
        assert!(effective_privs(&acls, &roles, &id("a@pve"), "/nodes/pve1", None).is_empty());
        assert!(effective_privs(&acls, &roles, &id("a@pve"), "/", None).contains("Sys.Audit"));
        assert!(
            effective_privs(&acls, &roles, &id("b@pve"), "/nodes/pve1", None).contains("Sys.Audit")
        );
        let tok = Identity {
            user: "root@pam".into(),
            token: Some("x".into()),
            privsep: true,
        };
        assert!(effective_privs(&acls, &roles, &tok, "/", None).is_empty());
        assert!(valid_acl_path("/vms/100") && valid_acl_path("/pool/lab") && !valid_acl_path("/x"));
    }
}
