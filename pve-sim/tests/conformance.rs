//! pve-sim against Proxmox's own records, over real HTTPS.
//!
//! * `fixtures/pve-schema.json`: the parameters of every route the simulator serves, as
//!   `proxmox/pve-docs` `api-viewer/apidata.js` documents them (revision and extractor in
//!   the file). The simulator must know every documented parameter (all of them, except on
//!   the VM config routes, where only the keys labfleet sends are required), refuse unknown
//!   ones and malformed integers, booleans and enumerations with Proxmox's 400 body, and
//!   every parameter labfleet sends must be documented.
//! * `fixtures/pve-captured.json`: responses captured from real PVE 9 clusters in
//!   `luthermonson/go-proxmox` `tests/mocks/pve9x`. The simulator's answers to the same
//!   calls must not have keys real servers lack (save a listed few), and keys both have
//!   must hold the same JSON types.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use support::*;

fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The parameters labfleet's client (`shared/src/pve`) sends, per route.
const LABFLEET_PARAMS: &[(&str, &str, &[&str])] = &[
    ("POST", "/access/ticket", &["username", "password"]),
    (
        "POST",
        "/access/users",
        &[
            "userid",
            "password",
            "comment",
            "email",
            "firstname",
            "lastname",
            "groups",
            "enable",
            "expire",
        ],
    ),
    (
        "PUT",
        "/access/users/{userid}",
        &[
            "comment",
            "email",
            "firstname",
            "lastname",
            "groups",
            "append",
            "enable",
            "expire",
        ],
    ),
    (
        "PUT",
        "/access/acl",
        &[
            "path",
            "roles",
            "users",
            "groups",
            "tokens",
            "propagate",
            "delete",
        ],
    ),
    ("POST", "/pools", &["poolid", "comment"]),
    (
        "PUT",
        "/pools/{poolid}",
        &["vms", "storage", "delete", "allow-move", "comment"],
    ),
    ("GET", "/cluster/resources", &["type"]),
    ("GET", "/cluster/nextid", &["vmid"]),
    ("GET", "/nodes/{node}/storage", &["content", "storage"]),
    (
        "GET",
        "/nodes/{node}/tasks",
        &["source", "vmid", "typefilter", "limit", "start"],
    ),
    ("GET", "/nodes/{node}/tasks/{upid}/log", &["start", "limit"]),
    ("GET", "/nodes/{node}/network", &["type"]),
    (
        "POST",
        "/nodes/{node}/network",
        &[
            "iface",
            "type",
            "autostart",
            "bridge_vlan_aware",
            "cidr",
            "comments",
            "vlan-id",
            "vlan-raw-device",
            "bridge_ports",
        ],
    ),
    (
        "POST",
        "/nodes/{node}/qemu/{vmid}/clone",
        &[
            "newid",
            "name",
            "description",
            "pool",
            "target",
            "full",
            "storage",
        ],
    ),
    (
        "POST",
        "/nodes/{node}/qemu/{vmid}/config",
        &[
            "delete",
            "digest",
            "name",
            "description",
            "tags",
            "cores",
            "memory",
            "net0",
            "net1",
            "ipconfig0",
            "ciuser",
            "cipassword",
            "sshkeys",
            "onboot",
        ],
    ),
    (
        "PUT",
        "/nodes/{node}/qemu/{vmid}/config",
        &[
            "delete",
            "digest",
            "name",
            "description",
            "tags",
            "cores",
            "memory",
            "net0",
            "net1",
            "ipconfig0",
            "ciuser",
            "cipassword",
            "sshkeys",
            "onboot",
        ],
    ),
    (
        "POST",
        "/nodes/{node}/qemu/{vmid}/status/shutdown",
        &["timeout", "forceStop"],
    ),
    (
        "DELETE",
        "/nodes/{node}/qemu/{vmid}",
        &["purge", "destroy-unreferenced-disks", "skiplock"],
    ),
    (
        "DELETE",
        "/nodes/{node}/storage/{storage}/content/{volume}",
        &[],
    ),
    (
        "POST",
        "/nodes/{node}/qemu/{vmid}/snapshot",
        &["snapname", "description"],
    ),
    (
        "POST",
        "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/rollback",
        &["start"],
    ),
    (
        "DELETE",
        "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}",
        &[],
    ),
];

/// Routes with hundreds of documented keys (every VM option), of which the simulator
/// models a part: only labfleet's must be known there.
fn labfleet_only(path: &str) -> bool {
    path == "/nodes/{node}/qemu/{vmid}/config"
}

fn fill(path: &str) -> String {
    path.replace("{node}", "pve1")
        .replace("{vmid}", "999")
        .replace(
            "{upid}",
            "UPID:pve1:00001234:00005678:66DC5987:qmstart:999:root@pam:",
        )
        .replace("{userid}", "nobody@pve")
        .replace("{tokenid}", "t1")
        .replace("{poolid}", "nopool")
        .replace("{iface}", "vmbr7")
        .replace("{storage}", "local-lvm")
        .replace("{volume}", "vm-999-disk-0")
        .replace("{snapname}", "snap1")
}

fn path_params(path: &str) -> BTreeSet<String> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}').map(String::from))
        .collect()
}

/// A value the schema accepts (as far as its type, range and enumeration tell).
fn valid_value(name: &str, p: &Value) -> String {
    if let Some(e) = p["enum"].as_array() {
        return e[0].as_str().unwrap_or("0").to_string();
    }
    match p["type"].as_str().unwrap_or("string") {
        "boolean" => "0".into(),
        "integer" | "number" => {
            let min = p["minimum"].as_i64().unwrap_or(1);
            let max = p["maximum"].as_i64().unwrap_or(i64::MAX);
            min.max(1).min(max).to_string()
        }
        _ => match p["format"].as_str() {
            Some("pve-node") => "pve1".into(),
            Some("pve-vmid") => "999".into(),
            Some("pve-storage-id") => "local-lvm".into(),
            Some("pve-poolid") => "nopool".into(),
            Some("pve-userid") => "nobody@pve".into(),
            Some("email-opt") | Some("email") => "a@example.com".into(),
            _ if name == "password" => "password1".into(),
            _ => "x".into(),
        },
    }
}

const NOT_DEFINED: &str =
    "property is not defined in schema and the schema does not allow additional properties";

#[tokio::test]
async fn parameters_follow_proxmox_schema() {
    let schema = fixture("pve-schema.json");
    assert!(schema["revision"].as_str().is_some_and(|r| r.len() >= 40));
    let (sim, api) = start(0.0).await;
    let api = api.login("root@pam", "labfleet").await;
    let routes: Vec<&Value> = schema["routes"].as_array().unwrap().iter().collect();
    let find = |m: &str, p: &str| {
        routes
            .iter()
            .find(|r| r["method"] == m && r["path"] == p)
            .copied()
    };
    let mut problems = Vec::new();

    // Every parameter labfleet sends is documented.
    for (m, p, params) in LABFLEET_PARAMS {
        let Some(r) = find(m, p) else {
            problems.push(format!("{m} {p}: route not in the schema"));
            continue;
        };
        for k in *params {
            let documented = r["params"].get(*k).is_some()
                || (labfleet_only(p) && (k.starts_with("net") || k.starts_with("ipconfig")));
            if !documented {
                problems.push(format!("{m} {p}: labfleet sends undocumented '{k}'"));
            }
        }
    }

    let mut checked = 0;
    for r in &routes {
        let (m, p) = (r["method"].as_str().unwrap(), r["path"].as_str().unwrap());
        assert_eq!(r["documented"], true, "{m} {p} is not in apidata.js");
        let url = fill(p);
        let in_path = path_params(p);
        // An unknown parameter: 400 with Proxmox's body.
        let resp = api.call(m, &url, &[("bogus-param", "1")]).await;
        if resp.status != 400
            || resp.reason != "Parameter verification failed."
            || resp.body["data"] != Value::Null
            || resp.body["errors"]["bogus-param"] != NOT_DEFINED
        {
            problems.push(format!("{m} {p}: unknown parameter answered {resp:?}"));
        }
        let labfleet: Vec<&str> = LABFLEET_PARAMS
            .iter()
            .filter(|(lm, lp, _)| *lm == m && *lp == p)
            .flat_map(|(_, _, ks)| ks.iter().copied())
            .collect();
        let documented = r["params"].as_object().unwrap();
        // Keys to try: all documented ones, or on the config routes labfleet's (`net0` is
        // documented as `net[n]`).
        let params: BTreeMap<String, Value> = if labfleet_only(p) {
            labfleet
                .iter()
                .filter_map(|k| {
                    let generic =
                        format!("{}[n]", k.trim_end_matches(|c: char| c.is_ascii_digit()));
                    documented
                        .get(*k)
                        .or_else(|| documented.get(&generic))
                        .map(|v| (k.to_string(), v.clone()))
                })
                .collect()
        } else {
            documented
                .iter()
                .filter(|(k, _)| !in_path.contains(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        for (k, spec) in &params {
            checked += 1;
            let v = valid_value(k, spec);
            let resp = api.call(m, &url, &[(k.as_str(), v.as_str())]).await;
            if resp.body["errors"][k.as_str()] == NOT_DEFINED {
                problems.push(format!("{m} {p}: documented '{k}' refused as unknown"));
            }
            // Malformed integers, booleans and enumerations are refused per parameter.
            let typed = spec["enum"].is_array()
                || matches!(spec["type"].as_str(), Some("integer" | "boolean"));
            if typed {
                let resp = api.call(m, &url, &[(k.as_str(), "x-not-valid")]).await;
                if resp.status != 400 || !resp.body["errors"][k.as_str()].is_string() {
                    problems.push(format!(
                        "{m} {p}: malformed '{k}' ({}) answered {} {:?}",
                        spec["type"], resp.status, resp.body
                    ));
                }
            }
        }
    }
    assert!(checked > 100, "only {checked} parameters checked");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    sim.shutdown().await;
}

/// The JSON type of a value, numbers as one type (Perl's JSON writes 0 and 0.5 alike).
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Groups a list's entries by their `type` (resources, cluster status, interfaces).
fn by_type(v: &Value) -> BTreeMap<String, Vec<&serde_json::Map<String, Value>>> {
    let mut out: BTreeMap<String, Vec<_>> = BTreeMap::new();
    match v {
        Value::Array(a) => {
            for e in a {
                if let Value::Object(o) = e {
                    let t = o.get("type").and_then(|t| t.as_str()).unwrap_or("-");
                    out.entry(t.to_string()).or_default().push(o);
                }
            }
        }
        Value::Object(o) => out.entry("-".into()).or_default().push(o),
        _ => {}
    }
    out
}

/// Keys the simulator sends that the captures lack, and why they are right anyway.
const EXTRA_KEYS: &[(&str, &str)] = &[
    // libpve-http-server >= 5.2 puts the message in error bodies; the capture is older.
    ("/cluster/nextid?vmid={existing_vmid}", "message"),
    // Optional fields the captured entries happen not to have.
    ("/cluster/resources", "lock"),
    ("/cluster/resources", "pool"),
    ("/cluster/resources", "tags"),
    ("/cluster/resources", "plugintype"),
    ("/nodes/{node}/network", "gateway"),
    ("/nodes/{node}/network", "bridge_ports"),
    ("/nodes/{node}/network", "bridge_stp"),
    ("/nodes/{node}/network", "bridge_fd"),
    ("/nodes/{node}/network", "address"),
    ("/nodes/{node}/network", "netmask"),
    ("/nodes/{node}/network", "cidr"),
    ("/nodes/{node}/network", "autostart"),
    ("/nodes/{node}/network", "active"),
    ("/nodes/{node}/qemu/{vmid}/status/current", "template"),
    ("/nodes/{node}/qemu/{vmid}/status/current", "tags"),
    ("/nodes/{node}/qemu/{vmid}/status/current", "lock"),
];

#[tokio::test]
async fn answers_have_the_shape_of_captured_real_ones() {
    let captured = fixture("pve-captured.json");
    assert!(
        captured["source"]
            .as_str()
            .unwrap()
            .contains("luthermonson/go-proxmox")
    );
    let (sim, api) = start(0.0).await;
    // A running VM for status/current (the capture is of a running one).
    let upid = api
        .call(
            "POST",
            "/nodes/pve1/qemu/100/clone",
            &[("newid", "200"), ("name", "shape")],
        )
        .await;
    assert_eq!(upid.status, 200);
    assert_eq!(
        api.call("POST", "/nodes/pve1/qemu/200/status/start", &[])
            .await
            .status,
        200
    );
    let mut problems = Vec::new();
    let mut compared = 0;
    for c in captured["responses"].as_array().unwrap() {
        let route = c["route"].as_str().unwrap();
        let url = route
            .replace("{node}", "pve1")
            .replace("{vmid}", "200")
            .replace("{existing_vmid}", "100");
        let resp = api.get(&url).await;
        assert_eq!(resp.status as u64, c["status"].as_u64().unwrap(), "{route}");
        // Success: compare the entries of `data`; an error: the whole body.
        let (real, ours) = if resp.status == 200 {
            (&c["body"]["data"], resp.data().clone())
        } else {
            (&c["body"], resp.body.clone())
        };
        let real_groups = by_type(real);
        let our_groups = by_type(&ours);
        for (t, ours) in &our_groups {
            let Some(reals) = real_groups.get(t) else {
                continue;
            };
            let real_keys: BTreeMap<&String, BTreeSet<&str>> = reals
                .iter()
                .flat_map(|o| o.iter())
                .fold(BTreeMap::new(), |mut m, (k, v)| {
                    m.entry(k).or_default().insert(kind(v));
                    m
                });
            for o in ours {
                for (k, v) in o.iter() {
                    compared += 1;
                    match real_keys.get(k) {
                        None if EXTRA_KEYS.contains(&(route, k.as_str())) => {}
                        None => problems.push(format!("{route} [{t}]: '{k}' not on real servers")),
                        // `null` (e.g. `exists` of an interface) stands for any type.
                        Some(kinds) if kinds.contains(kind(v)) || kinds.contains("null") => {}
                        Some(kinds) => problems.push(format!(
                            "{route} [{t}]: '{k}' is {} here, {kinds:?} on real servers",
                            kind(v)
                        )),
                    }
                }
            }
        }
    }
    assert!(compared > 100, "only {compared} keys compared");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    sim.shutdown().await;
}
