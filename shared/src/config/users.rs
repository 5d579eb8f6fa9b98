//! `users.yml`: the students, each a `user@realm`, unique and with distinct VM names.

use std::collections::BTreeMap;
use std::path::Path;

use super::convert::{Ctx, hint};
use super::ids::UserId;
use super::issue::Issue;
use super::model::Users;
use super::raw::RawUsers;

pub fn users_from_raw(raw: RawUsers, file: &Path) -> Result<Users, Vec<Issue>> {
    let mut issues = Vec::new();
    let mut cx = Ctx {
        file,
        issues: &mut issues,
    };
    if raw.users.value.is_empty() {
        let i = cx.at(
            &raw.users,
            "`users` is empty: a deployment needs at least one student",
        );
        hint(i, "list the students' Proxmox ids, e.g. - \"student1@pve\"");
    }
    let mut seen: BTreeMap<UserId, u64> = BTreeMap::new();
    let mut labels: BTreeMap<String, (String, u64)> = BTreeMap::new();
    let mut users = Vec::new();
    for u in &raw.users.value {
        let Some(id) = cx.check(
            u,
            Some("write each student as user@realm, e.g. \"student1@pve\""),
            |s| UserId::parse(s),
        ) else {
            continue;
        };
        if let Some(first) = seen.get(&id) {
            let i = cx.at(
                u,
                format!("user {id} is listed twice (first on line {first})"),
            );
            hint(i, "remove the duplicate line");
            continue;
        }
        let label = id.label_part();
        if label.is_empty() {
            let i = cx.at(
                u,
                format!("user {id} has no letter or digit to name its VMs after"),
            );
            hint(i, "use a user part with at least one letter or digit");
            continue;
        }
        if let Some((other, line)) = labels.get(&label) {
            let i = cx.at(u, format!("users {other} (line {line}) and {id} would give their VMs and pools the same name (`{label}`)"));
            hint(
                i,
                "VM names use the user part only; rename one of the users",
            );
            continue;
        }
        seen.insert(id.clone(), u.referenced.line());
        labels.insert(label, (id.to_string(), u.referenced.line()));
        users.push(id);
    }
    if issues.is_empty() {
        Ok(Users { users })
    } else {
        Err(issues)
    }
}
