//! Access control: users, ACLs, pools and roles.
//!
//! Pools are addressed as `/pools/{poolid}` (GET/PUT/DELETE). Proxmox ≥ 8.1 prefers
//! `/pools?poolid=..` and calls the path form deprecated, but the path form works on every
//! version labfleet supports, so it is the one used here. Nested pool ids (`a/b`) are
//! percent-encoded into one segment.

use reqwest::Method;
use serde::Deserialize;

use super::client::{Params, PveClient, seg};
use super::error::PveError;
use super::lenient;
use crate::secret::Secret;

/// One entry of `GET /access/users`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct UserEntry {
    pub userid: String,
    #[serde(default = "yes", deserialize_with = "lenient::bool_")]
    pub enable: bool,
    /// Epoch seconds; 0 = never.
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub expire: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub firstname: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub lastname: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub email: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub comment: Option<String>,
    #[serde(default, deserialize_with = "lenient::string_list")]
    pub groups: Vec<String>,
}

fn yes() -> bool {
    true
}

/// `GET /access/users/{userid}` (no `userid` field in the reply).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct UserInfo {
    #[serde(default = "yes", deserialize_with = "lenient::bool_")]
    pub enable: bool,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub expire: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub firstname: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub lastname: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub email: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub comment: Option<String>,
    #[serde(default, deserialize_with = "lenient::string_list")]
    pub groups: Vec<String>,
}

/// Parameters of `POST /access/users`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserCreate {
    /// `name@realm`; use the `pve` realm for accounts labfleet creates.
    pub userid: String,
    /// 8..64 characters.
    pub password: Option<Secret>,
    pub comment: Option<String>,
    pub email: Option<String>,
    pub firstname: Option<String>,
    pub lastname: Option<String>,
    pub groups: Vec<String>,
    pub enable: Option<bool>,
    /// Epoch seconds; 0 = never.
    pub expire: Option<u64>,
}

/// Parameters of `PUT /access/users/{userid}` (no password: that is `PUT /access/password`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserUpdate {
    pub comment: Option<String>,
    pub email: Option<String>,
    pub firstname: Option<String>,
    pub lastname: Option<String>,
    /// Replaces the groups unless `append`.
    pub groups: Option<Vec<String>>,
    pub append: bool,
    pub enable: Option<bool>,
    pub expire: Option<u64>,
}

/// One entry of `GET /access/acl`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct AclEntry {
    pub path: String,
    /// `user`, `group` or `token`.
    #[serde(rename = "type")]
    pub kind: String,
    pub ugid: String,
    pub roleid: String,
    #[serde(default, deserialize_with = "lenient::bool_")]
    pub propagate: bool,
}

/// Parameters of `PUT /access/acl`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AclUpdate {
    /// `/vms/101`, `/pool/lab`, ...
    pub path: String,
    pub roles: Vec<String>,
    pub users: Vec<String>,
    pub groups: Vec<String>,
    pub tokens: Vec<String>,
    /// `None`: Proxmox's default (1).
    pub propagate: Option<bool>,
    /// Remove these entries instead of adding them.
    pub delete: bool,
}

impl AclUpdate {
    /// Grants `role` to `user` on `path` (`propagate` to sub-paths or not).
    pub fn grant(path: String, role: &str, user: &str, propagate: bool) -> AclUpdate {
        AclUpdate {
            path,
            roles: vec![role.to_owned()],
            users: vec![user.to_owned()],
            propagate: Some(propagate),
            ..AclUpdate::default()
        }
    }
}

/// One entry of `GET /pools`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PoolEntry {
    pub poolid: String,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub comment: Option<String>,
}

/// `GET /pools/{poolid}`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PoolInfo {
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub comment: Option<String>,
    #[serde(default)]
    pub members: Vec<PoolMember>,
}

impl PoolInfo {
    pub fn vmids(&self) -> Vec<u32> {
        self.members.iter().filter_map(|m| m.vmid).collect()
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PoolMember {
    /// `qemu/101` or `storage/<node>/<storage>`.
    pub id: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default, deserialize_with = "lenient::opt_u32")]
    pub vmid: Option<u32>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub node: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub storage: Option<String>,
}

/// Parameters of `PUT /pools/{poolid}`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolUpdate {
    pub vms: Vec<u32>,
    pub storage: Vec<String>,
    /// Remove the listed members instead of adding them.
    pub delete: bool,
    /// Move VMs that are in another pool.
    pub allow_move: bool,
    pub comment: Option<String>,
}

/// One entry of `GET /access/roles`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RoleEntry {
    pub roleid: String,
    /// Comma-separated privileges.
    #[serde(default, deserialize_with = "lenient::string_list")]
    pub privs: Vec<String>,
    #[serde(default, deserialize_with = "lenient::bool_")]
    pub special: bool,
}

impl PveClient {
    /// `GET /access/users`
    pub async fn users(&self) -> Result<Vec<UserEntry>, PveError> {
        self.get("/access/users", Params::new()).await
    }

    /// `GET /access/users/{userid}`; a missing user is [`PveError::NotFound`].
    pub async fn user(&self, userid: &str) -> Result<UserInfo, PveError> {
        self.get(&format!("/access/users/{}", seg(userid)), Params::new())
            .await
    }

    /// `POST /access/users`; an existing user is [`PveError::AlreadyExists`].
    pub async fn create_user(&self, p: &UserCreate) -> Result<(), PveError> {
        let mut params = Params::new()
            .str("userid", p.userid.clone())
            .opt_str("comment", p.comment.as_deref())
            .opt_str("email", p.email.as_deref())
            .opt_str("firstname", p.firstname.as_deref())
            .opt_str("lastname", p.lastname.as_deref())
            .list("groups", &p.groups)
            .opt_bool("enable", p.enable)
            .opt_num("expire", p.expire);
        if let Some(pw) = &p.password {
            params = params.secret("password", pw);
        }
        self.call_null(Method::POST, "/access/users", params).await
    }

    /// `PUT /access/users/{userid}`
    pub async fn update_user(&self, userid: &str, p: &UserUpdate) -> Result<(), PveError> {
        let mut params = Params::new()
            .opt_str("comment", p.comment.as_deref())
            .opt_str("email", p.email.as_deref())
            .opt_str("firstname", p.firstname.as_deref())
            .opt_str("lastname", p.lastname.as_deref())
            .flag("append", p.append)
            .opt_bool("enable", p.enable)
            .opt_num("expire", p.expire);
        if let Some(groups) = &p.groups {
            params = params.str("groups", groups.join(","));
        }
        self.call_null(
            Method::PUT,
            &format!("/access/users/{}", seg(userid)),
            params,
        )
        .await
    }

    /// `GET /access/acl`
    pub async fn acl(&self) -> Result<Vec<AclEntry>, PveError> {
        self.get("/access/acl", Params::new()).await
    }

    /// `PUT /access/acl`
    pub async fn update_acl(&self, p: &AclUpdate) -> Result<(), PveError> {
        let params = Params::new()
            .str("path", p.path.clone())
            .str("roles", p.roles.join(","))
            .list("users", &p.users)
            .list("groups", &p.groups)
            .list("tokens", &p.tokens)
            .opt_bool("propagate", p.propagate)
            .flag("delete", p.delete);
        self.call_null(Method::PUT, "/access/acl", params).await
    }

    /// `GET /pools`
    pub async fn pools(&self) -> Result<Vec<PoolEntry>, PveError> {
        self.get("/pools", Params::new()).await
    }

    /// `GET /pools/{poolid}`: comment and members.
    pub async fn pool(&self, poolid: &str) -> Result<PoolInfo, PveError> {
        self.get(&format!("/pools/{}", seg(poolid)), Params::new())
            .await
    }

    /// `POST /pools`; an existing pool is [`PveError::AlreadyExists`].
    pub async fn create_pool(&self, poolid: &str, comment: Option<&str>) -> Result<(), PveError> {
        let params = Params::new()
            .str("poolid", poolid)
            .opt_str("comment", comment);
        self.call_null(Method::POST, "/pools", params).await
    }

    /// `PUT /pools/{poolid}`: add (or with `delete`, remove) members.
    pub async fn update_pool(&self, poolid: &str, p: &PoolUpdate) -> Result<(), PveError> {
        let vms: Vec<String> = p.vms.iter().map(u32::to_string).collect();
        let params = Params::new()
            .list("vms", &vms)
            .list("storage", &p.storage)
            .flag("delete", p.delete)
            .flag("allow-move", p.allow_move)
            .opt_str("comment", p.comment.as_deref());
        self.call_null(Method::PUT, &format!("/pools/{}", seg(poolid)), params)
            .await
    }

    /// `DELETE /pools/{poolid}` (only empty pools).
    pub async fn delete_pool(&self, poolid: &str) -> Result<(), PveError> {
        self.call_null(
            Method::DELETE,
            &format!("/pools/{}", seg(poolid)),
            Params::new(),
        )
        .await
    }

    /// `GET /access/roles`
    pub async fn roles(&self) -> Result<Vec<RoleEntry>, PveError> {
        self.get("/access/roles", Params::new()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_roles_decode() {
        let u: Vec<UserEntry> = serde_json::from_str(
            r#"[{"userid":"root@pam","enable":1,"expire":0},{"userid":"s1@pve","enable":0,"groups":"a,b"},{"userid":"s2@pve"}]"#,
        )
        .unwrap();
        assert!(u[0].enable);
        assert!(!u[1].enable);
        assert_eq!(u[1].groups, ["a", "b"]);
        assert!(u[2].enable);
        let i: UserInfo = serde_json::from_str(r#"{"enable":1,"groups":["g"]}"#).unwrap();
        assert_eq!(i.groups, ["g"]);
        let r: RoleEntry = serde_json::from_str(
            r#"{"roleid":"PVETemplateUser","privs":"VM.Audit,VM.Clone","special":1}"#,
        )
        .unwrap();
        assert_eq!(r.privs, ["VM.Audit", "VM.Clone"]);
        assert!(r.special);
        let p: PoolInfo = serde_json::from_str(
            r#"{"comment":"x","members":[{"id":"qemu/101","type":"qemu","vmid":101,"node":"pve1"},{"id":"storage/pve1/local","type":"storage","storage":"local"}]}"#,
        )
        .unwrap();
        assert_eq!(p.vmids(), [101]);
    }

    #[test]
    fn user_create_debug_hides_password() {
        let u = UserCreate {
            userid: "s1@pve".into(),
            password: Some(Secret::new("initial-pw-778")),
            ..UserCreate::default()
        };
        assert!(!format!("{u:?}").contains("initial-pw-778"));
    }
}
