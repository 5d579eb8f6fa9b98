//! Host network: `/nodes/{node}/network[/{iface}]`. Writes go to the pending file
//! (`interfaces.new`); `PUT /nodes/{node}/network` applies it in a `srvreload` task that
//! renames the file at its start and brings the interfaces up (`active`) at its end;
//! `DELETE` reverts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use serde_json::{Value, json};

use super::{ApiResult, envelope, ok};
use crate::auth::Auth;
use crate::error::PveError;
use crate::params::{P, Params, Ty};
use crate::state::{Iface, Shared, State as St};
use crate::tasks::{Outcome, TaskCtx, start_task};

/// Interface types, in the order of pve-manager's schema.
const TYPES: &[&str] = &[
    "bridge",
    "bond",
    "eth",
    "alias",
    "vlan",
    "fabric",
    "OVSBridge",
    "OVSBond",
    "OVSPort",
    "OVSIntPort",
    "vnet",
    "unknown",
];

/// `GET /nodes/{node}/network?type=`: the types plus the bridge groups.
const LIST_TYPES: &[&str] = &[
    "bridge",
    "bond",
    "eth",
    "alias",
    "vlan",
    "fabric",
    "OVSBridge",
    "OVSBond",
    "OVSPort",
    "OVSIntPort",
    "vnet",
    "any_bridge",
    "any_local_bridge",
    "include_sdn",
];

/// Interface parameters. IPv6, bonds and OVS are accepted and stored, not acted on.
const IFACE_PARAMS: &[P] = &[
    P("iface", Ty::Str, true),
    P("type", Ty::Enum(TYPES), true),
    P("autostart", Ty::Bool, false),
    P("bridge_ports", Ty::Str, false),
    P("bridge_vlan_aware", Ty::Bool, false),
    P("bridge_vids", Ty::Str, false),
    P("vlan-raw-device", Ty::Str, false),
    P("vlan-id", Ty::Int(1, 4094), false),
    P("cidr", Ty::Str, false),
    P("address", Ty::Str, false),
    P("netmask", Ty::Str, false),
    P("gateway", Ty::Str, false),
    P("mtu", Ty::Int(1280, 65520), false),
    P("comments", Ty::Str, false),
    P("delete", Ty::Str, false),
    P("address6", Ty::Str, false),
    P("cidr6", Ty::Str, false),
    P("gateway6", Ty::Str, false),
    P("netmask6", Ty::Int(0, 128), false),
    P("comments6", Ty::Str, false),
    P("slaves", Ty::Str, false),
    P("bond-primary", Ty::Str, false),
    P(
        "bond_mode",
        Ty::Enum(&[
            "balance-rr",
            "active-backup",
            "balance-xor",
            "broadcast",
            "802.3ad",
            "balance-tlb",
            "balance-alb",
            "balance-slb",
            "lacp-balance-slb",
            "lacp-balance-tcp",
        ]),
        false,
    ),
    P(
        "bond_xmit_hash_policy",
        Ty::Enum(&["layer2", "layer2+3", "layer3+4"]),
        false,
    ),
    P("ovs_bonds", Ty::Str, false),
    P("ovs_bridge", Ty::Str, false),
    P("ovs_options", Ty::Str, false),
    P("ovs_ports", Ty::Str, false),
    P("ovs_tag", Ty::Int(1, 4094), false),
];

fn current(st: &St, node: &str) -> BTreeMap<String, Iface> {
    let n = &st.nodes[node];
    n.net_pending
        .clone()
        .unwrap_or_else(|| n.net_applied.clone())
}

fn valid_iface(s: &str) -> bool {
    let (base, suffix) = match s.find([':', '.']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let b = base.as_bytes();
    (2..=21).contains(&b.len())
        && b[0].is_ascii_alphabetic()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
        && suffix.is_none_or(|x| !x.is_empty() && x.bytes().all(|c| c.is_ascii_digit()))
}

fn diff(applied: &BTreeMap<String, Iface>, pending: &BTreeMap<String, Iface>) -> String {
    let mut out = String::from("--- /etc/network/interfaces\n+++ /etc/network/interfaces.new\n");
    for (k, v) in pending {
        match applied.get(k) {
            None => out.push_str(&format!(
                "+iface {k} {}\n",
                v.get("type").and_then(|t| t.as_str()).unwrap_or("")
            )),
            Some(a) if strip_active(a) != strip_active(v) => {
                out.push_str(&format!("-iface {k}\n+iface {k}\n"))
            }
            _ => {}
        }
    }
    for k in applied.keys().filter(|k| !pending.contains_key(*k)) {
        out.push_str(&format!("-iface {k}\n"));
    }
    out
}

fn strip_active(i: &Iface) -> Iface {
    let mut i = i.clone();
    i.remove("active");
    i
}

fn visible(st: &St, node: &str) -> Vec<Value> {
    let n = &st.nodes[node];
    current(st, node)
        .into_iter()
        .map(|(k, mut v)| {
            if n.net_live.contains(&k) {
                v.insert("active".into(), json!(1));
            } else {
                v.remove("active");
            }
            Value::Object(v.into_iter().collect())
        })
        .collect()
}

pub(super) async fn index(
    State(app): State<Arc<Shared>>,
    _a: Auth,
    Path(node): Path<String>,
    p: Params,
) -> ApiResult {
    p.check(&[P("type", Ty::Enum(LIST_TYPES), false)], |_| false)?;
    let st = app.state.lock();
    st.proxy_to(&node, Instant::now())?;
    let ty = p.str("type");
    let list: Vec<Value> = visible(&st, &node)
        .into_iter()
        .filter(|v| {
            let t = v["type"].as_str().unwrap_or("");
            match ty.as_deref() {
                None | Some("include_sdn") => true,
                Some("any_bridge") | Some("any_local_bridge") => t == "bridge" || t == "OVSBridge",
                Some(x) => t == x,
            }
        })
        .collect();
    let n = &st.nodes[&node];
    let mut env = json!({ "data": list });
    if let Some(p) = &n.net_pending {
        env["changes"] = json!(diff(&n.net_applied, p));
    }
    envelope(env)
}

pub(super) async fn get_iface(
    State(app): State<Arc<Shared>>,
    _a: Auth,
    Path((node, iface)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    p.check(&[], |_| false)?;
    let st = app.state.lock();
    st.proxy_to(&node, Instant::now())?;
    visible(&st, &node)
        .into_iter()
        .find(|v| v["iface"] == json!(iface))
        .map(ok)
        .unwrap_or_else(|| Err(PveError::param("iface", "interface does not exist")))
}

fn build(p: &Params, base: Option<&Iface>) -> Result<Iface, PveError> {
    let mut m = base.cloned().unwrap_or_default();
    for d in p
        .str("delete")
        .unwrap_or_default()
        .split([',', ';', ' '])
        .filter(|s| !s.is_empty())
    {
        m.remove(d);
    }
    for (k, _) in p.map.iter().filter(|(k, _)| *k != "delete") {
        let v = p.str(k).unwrap_or_default();
        let val = match k.as_str() {
            "autostart" | "bridge_vlan_aware" => {
                if p.flag(k) {
                    json!(1)
                } else {
                    m.remove(k);
                    continue;
                }
            }
            "vlan-id" | "mtu" => json!(v.parse::<i64>().unwrap_or(0)),
            "bridge_ports" => json!(
                v.split([',', ' '])
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            _ => json!(v),
        };
        m.insert(k.clone(), val);
    }
    if let Some(c) = m.get("cidr").and_then(|v| v.as_str()).map(String::from)
        && let Some((a, n)) = c.split_once('/')
    {
        m.insert("address".into(), json!(a));
        m.insert("netmask".into(), json!(n));
    }
    let method = if m.contains_key("address") {
        "static"
    } else {
        "manual"
    };
    m.insert("method".into(), json!(method));
    m.entry("method6".into()).or_insert(json!("manual"));
    m.insert("families".into(), json!(["inet"]));
    m.entry("priority".into()).or_insert(json!(1));
    let t = m.get("type").and_then(|v| v.as_str()).unwrap_or("");
    if !TYPES.contains(&t) {
        return Err(PveError::param(
            "type",
            format!(
                "value '{t}' does not have a value in the enumeration '{}'",
                TYPES.join(", ")
            ),
        ));
    }
    Ok(m)
}

fn conflicts(all: &BTreeMap<String, Iface>, me: &str, new: &Iface) -> Result<(), PveError> {
    let ports: Vec<String> = new
        .get("bridge_ports")
        .and_then(|v| v.as_str())
        .map(|s| {
            s.split(' ')
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    for (name, other) in all.iter().filter(|(n, _)| *n != me) {
        let theirs = other
            .get("bridge_ports")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        for p in &ports {
            if theirs.split(' ').any(|x| x == p) {
                return Err(PveError::param(
                    "bridge_ports",
                    format!("{p} is already used on interface '{name}'."),
                ));
            }
        }
        if new.contains_key("gateway") && other.contains_key("gateway") {
            return Err(PveError::param(
                "gateway",
                format!("Default gateway already exists on interface '{name}'."),
            ));
        }
    }
    Ok(())
}

pub(super) async fn create(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path(node): Path<String>,
    p: Params,
) -> ApiResult {
    p.check(IFACE_PARAMS, |_| false)?;
    let iface = p.str("iface").unwrap_or_default();
    if !valid_iface(&iface) {
        return Err(PveError::param(
            "iface",
            format!("invalid format - value '{iface}' does not look like a valid interface name"),
        ));
    }
    let mut st = app.state.lock();
    st.proxy_to(&node, Instant::now())?;
    st.check(&who, &format!("/nodes/{node}"), "Sys.Modify")?;
    let mut cur = current(&st, &node);
    if cur.contains_key(&iface) {
        return Err(PveError::param("iface", "interface already exists"));
    }
    let m = build(&p, None)?;
    conflicts(&cur, &iface, &m)?;
    cur.insert(iface, m);
    st.nodes.get_mut(&node).expect("checked").net_pending = Some(cur);
    ok(Value::Null)
}

pub(super) async fn update(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, iface)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    let spec: Vec<P> = IFACE_PARAMS
        .iter()
        .filter(|x| x.0 != "iface")
        .map(|x| P(x.0, x.1, x.2))
        .collect();
    p.check(&spec, |_| false)?;
    let mut st = app.state.lock();
    st.proxy_to(&node, Instant::now())?;
    st.check(&who, &format!("/nodes/{node}"), "Sys.Modify")?;
    let mut cur = current(&st, &node);
    let Some(old) = cur.get(&iface) else {
        return Err(PveError::param("iface", "interface does not exist"));
    };
    let m = build(&p, Some(old))?;
    conflicts(&cur, &iface, &m)?;
    cur.insert(iface, m);
    st.nodes.get_mut(&node).expect("checked").net_pending = Some(cur);
    ok(Value::Null)
}

pub(super) async fn delete(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, iface)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    p.check(&[], |_| false)?;
    let mut st = app.state.lock();
    st.proxy_to(&node, Instant::now())?;
    st.check(&who, &format!("/nodes/{node}"), "Sys.Modify")?;
    let mut cur = current(&st, &node);
    if cur.remove(&iface).is_none() {
        return Err(PveError::param("iface", "interface does not exist"));
    }
    st.nodes.get_mut(&node).expect("checked").net_pending = Some(cur);
    ok(Value::Null)
}

pub(super) async fn revert(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path(node): Path<String>,
    p: Params,
) -> ApiResult {
    p.check(&[], |_| false)?;
    let mut st = app.state.lock();
    st.proxy_to(&node, Instant::now())?;
    st.check(&who, &format!("/nodes/{node}"), "Sys.Modify")?;
    st.nodes.get_mut(&node).expect("checked").net_pending = None;
    ok(Value::Null)
}

pub(super) async fn apply(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path(node): Path<String>,
    p: Params,
) -> ApiResult {
    p.check(&[P("regenerate-frr", Ty::Bool, false)], |_| false)?;
    {
        let st = app.state.lock();
        st.proxy_to(&node, Instant::now())?;
        st.check(&who, &format!("/nodes/{node}"), "Sys.Modify")?;
    }
    let n2 = node.clone();
    let upid = start_task(
        &app,
        &node,
        "srvreload",
        "networking",
        &who,
        None,
        move |mut ctx: TaskCtx| async move {
            let app = ctx.app.clone();
            // pve-manager `Network.pm`: the worker renames interfaces.new over interfaces
            // first, then runs ifreload; the kernel has the new interfaces only at its end.
            rename_pending(&app, &n2);
            ctx.log("ifreload -a");
            ctx.spend(app.costs.network_reload_seconds).await;
            let mut st = app.state.lock();
            if let Some(n) = st.nodes.get_mut(&n2) {
                n.net_live = n.net_applied.keys().cloned().collect();
            }
            drop(st);
            (ctx, Outcome::Ok)
        },
    )
    .await?;
    // The rename is the worker's first step; done here too so that a read right after the
    // UPID sees it, whichever of the two runs first.
    rename_pending(&app, &node);
    ok(json!(upid))
}

fn rename_pending(app: &Shared, node: &str) {
    let mut st = app.state.lock();
    if let Some(n) = st.nodes.get_mut(node)
        && let Some(p) = n.net_pending.take()
    {
        n.net_applied = p;
    }
}
