//! The simulated cluster's first state, built from the cluster file: each node with its
//! network (a physical port and its bridges), the VMs and templates with fresh MACs and
//! uuids, the users, tokens and ACLs. Seeded, so the same file and seed give the same state.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::access::{AclEntry, builtin_roles};
use crate::cluster::{ClusterSpec, NodeSpec, VmSpec};
use crate::faults::{FaultPlan, FaultState};
use crate::state::{
    NodeState, Pool, State, Token, User, Vm, format_size, iface_obj, random_mac, random_uuid,
    with_mac,
};
use crate::stats::Stats;

impl State {
    pub fn new(spec: &ClusterSpec, faults: FaultPlan, seed: u64) -> State {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_cafe);
        let nodes = spec
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), node(spec, i, n, &mut rng)))
            .collect();
        let storages = spec
            .storages
            .iter()
            .map(|s| (s.id.clone(), s.clone()))
            .collect();
        let mut pools: BTreeMap<String, Pool> = spec
            .pools
            .iter()
            .map(|p| {
                (
                    p.poolid.clone(),
                    Pool {
                        comment: p.comment.clone(),
                        ..Pool::default()
                    },
                )
            })
            .collect();
        let mut vms = BTreeMap::new();
        for v in &spec.vms {
            if let Some(p) = &v.pool
                && let Some(pool) = pools.get_mut(p)
            {
                pool.vms.insert(v.vmid);
            }
            vms.insert(v.vmid, vm(v, &mut rng));
        }
        let (users, tokens) = users(spec);
        let acls = spec
            .acl
            .iter()
            .map(|a| AclEntry {
                path: a.path.clone(),
                kind: if a.ugid.contains('!') {
                    "token"
                } else {
                    "user"
                }
                .into(),
                ugid: a.ugid.clone(),
                roleid: a.role.clone(),
                propagate: a.propagate as u8,
            })
            .collect();
        State {
            cluster_name: spec.name.clone(),
            nodes,
            storages,
            vms,
            users,
            tokens,
            acls,
            roles: builtin_roles(),
            pools,
            tasks: HashMap::new(),
            unarchived: HashMap::new(),
            loose: Vec::new(),
            freed: BTreeSet::new(),
            task_order: Vec::new(),
            next_pid: 0x0010_0000 + (seed as u32 & 0xffff),
            faults: FaultState::new(faults, seed),
            stats: Stats::default(),
            snaps: BTreeMap::new(),
            acpi_ignored: BTreeSet::new(),
            rng,
        }
    }
}

/// A node as the file describes it: `eno1` and its bridges (the first one with the node's
/// address), online unless marked offline.
fn node(spec: &ClusterSpec, i: usize, n: &NodeSpec, rng: &mut StdRng) -> NodeState {
    let mut net = BTreeMap::new();
    let phys = "eno1".to_string();
    net.insert(
        phys.clone(),
        iface_obj(
            &[
                ("iface", json!(phys)),
                ("type", json!("eth")),
                ("method", json!("manual")),
            ],
            true,
        ),
    );
    let bridges = if spec.bridges.is_empty() {
        vec!["vmbr0".to_string()]
    } else {
        spec.bridges.clone()
    };
    let ip = n.ip.clone().unwrap_or_else(|| format!("10.0.0.{}", i + 1));
    for (bi, b) in bridges.iter().enumerate() {
        let mut fields = vec![
            ("iface", json!(b)),
            ("type", json!("bridge")),
            ("bridge_stp", json!("off")),
            ("bridge_fd", json!("0")),
            ("autostart", json!(1)),
        ];
        if bi == 0 {
            fields.push(("bridge_ports", json!(phys)));
            fields.push(("method", json!("static")));
            fields.push(("cidr", json!(format!("{ip}/24"))));
            fields.push(("address", json!(ip)));
            fields.push(("netmask", json!("24")));
            fields.push(("gateway", json!("10.0.0.254")));
        } else {
            fields.push(("method", json!("manual")));
        }
        net.insert(b.clone(), iface_obj(&fields, true));
    }
    NodeState {
        name: n.name.clone(),
        ip,
        cpus: n.cpus,
        memory: n.memory_gib << 30,
        base_used: (n.base_memory_used_gib * (1u64 << 30) as f64) as u64,
        rootfs: n.rootfs_gib << 30,
        online: !n.offline,
        offline_until: None,
        net_live: net.keys().cloned().collect(),
        net_applied: net,
        net_pending: None,
        pstart: rng.random_range(0x0010_0000..0x0800_0000),
    }
}

/// A VM or template as the file describes it, with a fresh uuid, vmgenid and MACs.
fn vm(v: &VmSpec, rng: &mut StdRng) -> Vm {
    let mut c = BTreeMap::new();
    c.insert("name".into(), json!(v.name));
    c.insert("cores".into(), json!(v.cores));
    c.insert("sockets".into(), json!(1));
    c.insert("memory".into(), json!(v.memory_mib.to_string()));
    c.insert(
        "ostype".into(),
        json!(v.ostype.clone().unwrap_or_else(|| "l26".into())),
    );
    c.insert("scsihw".into(), json!("virtio-scsi-single"));
    c.insert(
        "smbios1".into(),
        json!(format!("uuid={}", random_uuid(rng))),
    );
    c.insert("vmgenid".into(), json!(random_uuid(rng)));
    c.insert("meta".into(), json!("creation-qemu=9.2.0,ctime=1735689600"));
    if let Some(d) = &v.description {
        c.insert("description".into(), json!(d));
    }
    if let Some(t) = &v.tags {
        c.insert("tags".into(), json!(t));
    }
    let prefix = if v.template { "base" } else { "vm" };
    for (i, d) in v.disks.iter().enumerate() {
        let bytes = (d.size_gib * (1u64 << 30) as f64) as u64;
        c.insert(
            d.key.clone(),
            json!(format!(
                "{}:{prefix}-{}-disk-{i},size={}",
                d.storage,
                v.vmid,
                format_size(bytes)
            )),
        );
    }
    if let Some(first) = v.disks.first() {
        c.insert("boot".into(), json!(format!("order={}", first.key)));
    }
    for (i, n) in v.nets.iter().enumerate() {
        c.insert(format!("net{i}"), json!(with_mac(n, &random_mac(rng))));
    }
    if v.template {
        c.insert("template".into(), json!(1));
    }
    Vm {
        node: v.node.clone(),
        config: c,
        running: v.running && !v.template,
        started: (v.running && !v.template).then(Instant::now),
        pool: v.pool.clone(),
        linked_from: None,
        rrd: None,
    }
}

/// The users (root@pam always) and API tokens.
fn users(spec: &ClusterSpec) -> (BTreeMap<String, User>, BTreeMap<String, Token>) {
    let mut users = BTreeMap::new();
    let mut tokens = BTreeMap::new();
    for u in &spec.users {
        users.insert(
            u.userid.clone(),
            User {
                password: u.password.clone(),
                enable: true,
                expire: 0,
                comment: u.comment.clone(),
                email: None,
                firstname: None,
                lastname: None,
            },
        );
        for t in &u.tokens {
            tokens.insert(
                format!("{}!{}", u.userid, t.id),
                Token {
                    secret: t.secret.clone(),
                    privsep: t.privsep,
                    comment: None,
                },
            );
        }
    }
    if !users.contains_key("root@pam") {
        users.insert(
            "root@pam".into(),
            User {
                password: None,
                enable: true,
                expire: 0,
                comment: None,
                email: None,
                firstname: None,
                lastname: None,
            },
        );
    }
    (users, tokens)
}
