//! `/access/*`: ticket login and renewal, users and tokens, ACLs, roles and password change.
//! Groups and TFA are not modelled.
//!
//! One file (over 600 lines): users, tokens, ACLs and roles are one `user.cfg` in Proxmox,
//! written under one lock, and their handlers share its checks.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde_json::{Value, json};

use super::{ApiResult, ok};
use crate::access::{AclEntry, Identity, valid_acl_path};
use crate::auth::{Auth, make_csrf, make_ticket, verify_ticket};
use crate::error::PveError;
use crate::params::{P, Params, Ty};
use crate::state::{Shared, Token, User};

fn token_refused(headers: &HeaderMap, uri: &str) -> Result<(), PveError> {
    let is_token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("PVEAPIToken"));
    if is_token {
        return Err(PveError::forbidden(format!(
            "Permission check failed (URI '{uri}' not available with API token, need proper ticket.)"
        )));
    }
    Ok(())
}

fn valid_userid(u: &str) -> bool {
    let Some((name, realm)) = u.rsplit_once('@') else {
        return false;
    };
    (3..=64).contains(&u.len())
        && !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c == ':' || c == '/')
        && realm.len() >= 2
        && realm.starts_with(|c: char| c.is_ascii_alphabetic())
        && realm
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

fn check_password_len(p: &Params, key: &str) -> Result<(), PveError> {
    if let Some(pw) = p.str(key) {
        if pw.chars().count() < 8 {
            return Err(PveError::param(
                key,
                "value must be at least 8 characters long",
            ));
        }
        if pw.chars().count() > 64 {
            return Err(PveError::param(key, "value may only be 64 characters long"));
        }
    }
    Ok(())
}

pub(super) async fn ticket(
    State(app): State<Arc<Shared>>,
    headers: HeaderMap,
    p: Params,
) -> ApiResult {
    token_refused(&headers, "/access/ticket")?;
    p.check(
        &[
            P("username", Ty::Str, true),
            P("password", Ty::Str, true),
            P("realm", Ty::Str, false),
            P("otp", Ty::Str, false),
            P("tfa-challenge", Ty::Str, false),
            P("path", Ty::Str, false),
            P("privs", Ty::Str, false),
            P("new-format", Ty::Bool, false),
        ],
        |_| false,
    )?;
    let mut user = p.str("username").unwrap_or_default();
    if let Some(r) = p.str("realm")
        && !user.contains('@')
    {
        user = format!("{user}@{r}");
    }
    let password = p.str("password").unwrap_or_default();
    let valid = {
        let st = app.state.lock();
        match st.users.get(&user) {
            Some(u) if u.enable => {
                u.password.as_deref() == Some(password.as_str())
                    || verify_ticket(&app, &password).as_deref() == Some(user.as_str())
            }
            _ => false,
        }
    };
    if !valid {
        if !app.auth_delay.is_zero() {
            tokio::time::sleep(app.auth_delay).await;
        }
        return Err(PveError::with_status(
            StatusCode::UNAUTHORIZED,
            "authentication failure",
        ));
    }
    let now = app.ticket_clock();
    let st = app.state.lock();
    let who = Identity {
        user: user.clone(),
        token: None,
        privsep: false,
    };
    let mut data = json!({
        "username": user,
        "ticket": make_ticket(&app.secret, &user, now),
        "CSRFPreventionToken": make_csrf(&app.secret, &user, now),
        "cap": {
            "vms": privs_map(&st.privs(&who, "/vms")),
            "storage": privs_map(&st.privs(&who, "/storage")),
            "nodes": privs_map(&st.privs(&who, "/nodes")),
            "access": privs_map(&st.privs(&who, "/access")),
            "dc": privs_map(&st.privs(&who, "/")),
        },
    });
    if st.has(&who, "/", "Sys.Audit") {
        data["clustername"] = json!(st.cluster_name);
    }
    ok(data)
}

fn privs_map(p: &std::collections::BTreeSet<String>) -> Value {
    Value::Object(p.iter().map(|k| (k.clone(), json!(1))).collect())
}

fn may_modify_user(st: &crate::state::State, who: &Identity, userid: &str) -> bool {
    let realm = userid.rsplit_once('@').map(|x| x.1).unwrap_or("");
    st.has(who, "/access/groups", "User.Modify")
        || st.has(who, &format!("/access/realm/{realm}"), "Realm.AllocateUser")
}

fn user_json(st: &crate::state::State, id: &str, u: &User, full: bool) -> Value {
    let realm = id.rsplit_once('@').map(|x| x.1).unwrap_or("");
    let mut v = json!({
        "userid": id, "enable": u.enable as u8, "expire": u.expire, "groups": "",
        "realm-type": realm,
    });
    for (k, val) in [
        ("comment", &u.comment),
        ("email", &u.email),
        ("firstname", &u.firstname),
        ("lastname", &u.lastname),
    ] {
        if let Some(x) = val {
            v[k] = json!(x);
        }
    }
    if full {
        let toks: Vec<Value> = st
            .tokens
            .iter()
            .filter_map(|(k, t)| {
                let (u, tid) = k.split_once('!')?;
                (u == id).then(|| json!({"tokenid": tid, "privsep": t.privsep as u8, "expire": 0, "comment": t.comment}))
            })
            .collect();
        v["tokens"] = json!(toks);
    }
    v
}

pub(super) async fn list_users(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    p: Params,
) -> ApiResult {
    p.check(
        &[P("enabled", Ty::Bool, false), P("full", Ty::Bool, false)],
        |_| false,
    )?;
    let st = app.state.lock();
    let data: Vec<Value> = st
        .users
        .iter()
        .filter(|(id, _)| **id == who.user || may_modify_user(&st, &who, id))
        .filter(|(_, u)| p.bool("enabled").is_none_or(|e| u.enable == e))
        .map(|(id, u)| user_json(&st, id, u, p.flag("full")))
        .collect();
    ok(Value::Array(data))
}

const USER_FIELDS: &[P] = &[
    P("email", Ty::Str, false),
    P("firstname", Ty::Str, false),
    P("lastname", Ty::Str, false),
    P("comment", Ty::Str, false),
    P("groups", Ty::Str, false),
    P("enable", Ty::Bool, false),
    P("expire", Ty::Int(0, i64::MAX), false),
    P("keys", Ty::Str, false),
];

fn apply_user_fields(u: &mut User, p: &Params) {
    if let Some(e) = p.bool("enable") {
        u.enable = e;
    }
    if let Some(e) = p.int("expire") {
        u.expire = e as u64;
    }
    for (k, slot) in [
        ("comment", &mut u.comment),
        ("email", &mut u.email),
        ("firstname", &mut u.firstname),
        ("lastname", &mut u.lastname),
    ] {
        if let Some(v) = p.str(k) {
            *slot = Some(v);
        }
    }
}

fn no_groups(p: &Params, prefix: &str) -> Result<(), PveError> {
    if let Some(g) = p.str("groups").filter(|g| !g.is_empty()) {
        let first = g.split(',').next().unwrap_or_default();
        return Err(PveError::internal(format!(
            "{prefix}no such group '{first}'"
        )));
    }
    Ok(())
}

pub(super) async fn create_user(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    p: Params,
) -> ApiResult {
    let mut spec = vec![P("userid", Ty::Str, true), P("password", Ty::Str, false)];
    spec.extend(USER_FIELDS.iter().map(|x| P(x.0, x.1, x.2)));
    p.check(&spec, |_| false)?;
    let userid = p.str("userid").unwrap_or_default();
    if !valid_userid(&userid) {
        return Err(PveError::param(
            "userid",
            format!("invalid format - value '{userid}' does not look like a valid user name"),
        ));
    }
    check_password_len(&p, "password")?;
    let realm = userid
        .rsplit_once('@')
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    let _cfg = app
        .user_cfg_lock("create user failed")
        .await
        .map_err(PveError::internal)?;
    let mut st = app.state.lock();
    st.check(
        &who,
        &format!("/access/realm/{realm}"),
        "Realm.AllocateUser",
    )?;
    if st.users.contains_key(&userid) {
        return Err(PveError::internal(format!(
            "create user failed: user '{userid}' already exists"
        )));
    }
    if p.str("password").is_some() && realm != "pve" && realm != "pam" {
        return Err(PveError::internal(format!(
            "create user failed: auth domain '{realm}' does not exist"
        )));
    }
    no_groups(&p, "create user failed: ")?;
    let mut u = User {
        password: p.str("password"),
        enable: true,
        expire: 0,
        comment: None,
        email: None,
        firstname: None,
        lastname: None,
    };
    apply_user_fields(&mut u, &p);
    st.users.insert(userid, u);
    ok(Value::Null)
}

pub(super) async fn get_user(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path(userid): Path<String>,
    p: Params,
) -> ApiResult {
    p.check(&[], |_| false)?;
    let st = app.state.lock();
    if userid != who.user
        && !may_modify_user(&st, &who, &userid)
        && !st.has(&who, "/access", "Sys.Audit")
    {
        return Err(PveError::perm("/access/groups", "User.Modify"));
    }
    let u = st
        .users
        .get(&userid)
        .ok_or_else(|| PveError::internal(format!("no such user ('{userid}')")))?;
    let mut v = user_json(&st, &userid, u, true);
    v["groups"] = json!([]);
    let toks: serde_json::Map<String, Value> = v["tokens"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|t| Some((t["tokenid"].as_str()?.to_string(), t)))
        .collect();
    v["tokens"] = Value::Object(toks);
    ok(v)
}

pub(super) async fn update_user(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path(userid): Path<String>,
    p: Params,
) -> ApiResult {
    let mut spec: Vec<P> = USER_FIELDS.iter().map(|x| P(x.0, x.1, x.2)).collect();
    spec.push(P("append", Ty::Bool, false));
    p.check(&spec, |_| false)?;
    let _cfg = app
        .user_cfg_lock("update user failed")
        .await
        .map_err(PveError::internal)?;
    let mut st = app.state.lock();
    if !may_modify_user(&st, &who, &userid) {
        return Err(PveError::perm("/access/groups", "User.Modify"));
    }
    no_groups(&p, "update user failed: ")?;
    let u = st.users.get_mut(&userid).ok_or_else(|| {
        PveError::internal(format!("update user failed: no such user ('{userid}')"))
    })?;
    apply_user_fields(u, &p);
    ok(Value::Null)
}

pub(super) async fn delete_user(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path(userid): Path<String>,
    p: Params,
) -> ApiResult {
    p.check(&[], |_| false)?;
    let _cfg = app
        .user_cfg_lock("delete user failed")
        .await
        .map_err(PveError::internal)?;
    let mut st = app.state.lock();
    let realm = userid
        .rsplit_once('@')
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    st.check(
        &who,
        &format!("/access/realm/{realm}"),
        "Realm.AllocateUser",
    )?;
    if st.users.remove(&userid).is_none() {
        return Err(PveError::internal(format!(
            "delete user failed: no such user ('{userid}')"
        )));
    }
    let prefix = format!("{userid}!");
    st.tokens.retain(|k, _| !k.starts_with(&prefix));
    st.acls
        .retain(|a| a.ugid != userid && !a.ugid.starts_with(&prefix));
    ok(Value::Null)
}

pub(super) async fn create_token(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((userid, tokenid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    p.check(
        &[
            P("expire", Ty::Int(0, i64::MAX), false),
            P("privsep", Ty::Bool, false),
            P("comment", Ty::Str, false),
        ],
        |_| false,
    )?;
    let _cfg = app
        .user_cfg_lock("generating token failed")
        .await
        .map_err(PveError::internal)?;
    let mut st = app.state.lock();
    if userid != who.user && !may_modify_user(&st, &who, &userid) {
        return Err(PveError::perm("/access/groups", "User.Modify"));
    }
    if !st.users.contains_key(&userid) {
        return Err(PveError::internal(format!("no such user ('{userid}')")));
    }
    let full = format!("{userid}!{tokenid}");
    if st.tokens.contains_key(&full) {
        return Err(PveError::param("tokenid", "Token already exists."));
    }
    let secret = st.random_uuid();
    let privsep = p.bool("privsep").unwrap_or(true);
    st.tokens.insert(
        full.clone(),
        Token {
            secret: secret.clone(),
            privsep,
            comment: p.str("comment"),
        },
    );
    ok(
        json!({"full-tokenid": full, "info": {"privsep": privsep as u8, "expire": p.int("expire").unwrap_or(0)}, "value": secret}),
    )
}

pub(super) async fn delete_token(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((userid, tokenid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    p.check(&[], |_| false)?;
    let _cfg = app
        .user_cfg_lock("deleting token failed")
        .await
        .map_err(PveError::internal)?;
    let mut st = app.state.lock();
    if userid != who.user && !may_modify_user(&st, &who, &userid) {
        return Err(PveError::perm("/access/groups", "User.Modify"));
    }
    let full = format!("{userid}!{tokenid}");
    if st.tokens.remove(&full).is_none() {
        return Err(PveError::internal(format!(
            "no such token '{tokenid}' for user '{userid}'"
        )));
    }
    st.acls.retain(|a| a.ugid != full);
    ok(Value::Null)
}

pub(super) async fn get_acl(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    p: Params,
) -> ApiResult {
    p.check(&[], |_| false)?;
    let st = app.state.lock();
    let data: Vec<Value> = st
        .acls
        .iter()
        .filter(|a| st.has_any(&who, &a.path, &["Sys.Audit", "Permissions.Modify"]))
        .map(|a| json!(a))
        .collect();
    ok(Value::Array(data))
}

pub(super) async fn put_acl(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    p: Params,
) -> ApiResult {
    p.check(
        &[
            P("path", Ty::Str, true),
            P("roles", Ty::Str, true),
            P("users", Ty::Str, false),
            P("groups", Ty::Str, false),
            P("tokens", Ty::Str, false),
            P("propagate", Ty::Bool, false),
            P("delete", Ty::Bool, false),
            P("digest", Ty::Str, false),
        ],
        |_| false,
    )?;
    let path = p.str("path").unwrap_or_default();
    let list = |k: &str| -> Vec<String> {
        p.str(k)
            .map(|s| {
                s.split([',', ';', ' '])
                    .filter(|x| !x.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    };
    let (users, groups, tokens, roles) =
        (list("users"), list("groups"), list("tokens"), list("roles"));
    if users.is_empty() && groups.is_empty() && tokens.is_empty() {
        let mut e = BTreeMap::new();
        for k in ["users", "groups", "tokens"] {
            e.insert(
                k.to_string(),
                "either 'users', 'groups' or 'tokens' is required.".to_string(),
            );
        }
        return Err(PveError::params(e));
    }
    if !valid_acl_path(&path) {
        return Err(PveError::param(
            "path",
            format!("invalid ACL path '{path}'"),
        ));
    }
    let _cfg = app
        .user_cfg_lock("ACL update failed")
        .await
        .map_err(PveError::internal)?;
    let mut st = app.state.lock();
    st.check(&who, &path, "Permissions.Modify")?;
    for r in &roles {
        if !st.roles.contains_key(r) {
            return Err(PveError::internal(format!(
                "ACL update failed: role '{r}' does not exist"
            )));
        }
    }
    if let Some(g) = groups.first() {
        return Err(PveError::internal(format!(
            "ACL update failed: group '{g}' does not exist"
        )));
    }
    for u in &users {
        if !st.users.contains_key(u) {
            return Err(PveError::internal(format!(
                "ACL update failed: user '{u}' does not exist"
            )));
        }
    }
    for t in &tokens {
        if !st.tokens.contains_key(t) {
            return Err(PveError::internal(format!(
                "ACL update failed: no such token '{t}'"
            )));
        }
    }
    let propagate = p.bool("propagate").unwrap_or(true) as u8;
    let delete = p.flag("delete");
    let who_list = users
        .iter()
        .map(|u| (u, "user"))
        .chain(tokens.iter().map(|t| (t, "token")));
    for (ugid, kind) in who_list {
        for r in &roles {
            st.acls
                .retain(|a| !(a.path == path && a.ugid == *ugid && a.roleid == *r));
            if !delete {
                st.acls.push(AclEntry {
                    path: path.clone(),
                    kind: kind.into(),
                    ugid: ugid.clone(),
                    roleid: r.clone(),
                    propagate,
                });
            }
        }
    }
    ok(Value::Null)
}

pub(super) async fn roles(State(app): State<Arc<Shared>>, _a: Auth, p: Params) -> ApiResult {
    p.check(&[], |_| false)?;
    let st = app.state.lock();
    let data: Vec<Value> = st
        .roles
        .iter()
        .map(|(id, privs)| json!({"roleid": id, "privs": privs.iter().cloned().collect::<Vec<_>>().join(","), "special": 1}))
        .collect();
    ok(Value::Array(data))
}

pub(super) async fn password(
    State(app): State<Arc<Shared>>,
    headers: HeaderMap,
    Auth(who): Auth,
    p: Params,
) -> ApiResult {
    token_refused(&headers, "/access/password")?;
    p.check(
        &[
            P("userid", Ty::Str, true),
            P("password", Ty::Str, true),
            P("confirmation-password", Ty::Str, false),
        ],
        |_| false,
    )?;
    check_password_len(&p, "password")?;
    let userid = p.str("userid").unwrap_or_default();
    let mut st = app.state.lock();
    if who.user != "root@pam" {
        let Some(conf) = p.str("confirmation-password") else {
            return Err(PveError::param(
                "confirmation-password",
                "password is required to modify user",
            ));
        };
        if st.users.get(&who.user).and_then(|u| u.password.as_deref()) != Some(conf.as_str()) {
            return Err(PveError::with_status(
                StatusCode::UNAUTHORIZED,
                "authentication failure",
            ));
        }
        if userid == "root@pam" || (userid.ends_with("@pam") && userid != who.user) {
            return Err(PveError::perm("/access", "Permissions.Modify"));
        }
        if userid != who.user && !may_modify_user(&st, &who, &userid) {
            return Err(PveError::perm("/access/groups", "User.Modify"));
        }
    }
    let u = st
        .users
        .get_mut(&userid)
        .ok_or_else(|| PveError::internal(format!("no such user ('{userid}')")))?;
    u.password = p.str("password");
    ok(Value::Null)
}
