//! Placement: which node each student's VMs go to. Pure: no I/O, tested by tables.
//!
//! All of one student's VMs share a node (their private bridges exist on one node only).
//! A node is eligible for a student when it is online and can hold every machine of the
//! deployment: a template replica on that node, or a template on shared storage. Among the
//! eligible nodes, memory ranks them: the student goes to the node with the most free
//! memory as a share of its total (its total, minus the configured memory of the VMs on it,
//! minus what this and other running deployments planned there and have not made yet: the
//! figures of `capacity`, so a VM is counted once), so nodes fill evenly and every node's
//! clone slots get work; ties are broken by lower CPU load, then fewer students, then name.
//! Placement warns when a node's VMs would exceed its memory; whether that is too much
//! (`memory_overcommit`) is `capacity`'s call, made by `submit`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// What the cluster reports of one node, plus what other deployments have planned on it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeCapacity {
    pub name: String,
    pub online: bool,
    pub maxmem: u64,
    /// Memory in use now (reported by the node; not used to place: running VMs are in
    /// `committed` already, and counting both took a running class twice).
    pub mem: u64,
    /// The configured memory (`maxmem`) of every VM on the node, running or not.
    pub committed: u64,
    /// CPU load as a fraction 0..1 of `maxcpu`.
    pub cpu: f64,
    pub maxcpu: u32,
    /// Memory promised to VMs that other running deployments will create here and have not
    /// made yet (`capacity::planned_elsewhere`).
    pub planned_elsewhere: u64,
}

/// What one student needs.
#[derive(Debug, Clone, PartialEq)]
pub struct StudentDemand {
    pub user: String,
    /// Sum of the `maxmem` of the student's VMs (their templates' memory).
    pub mem: u64,
    /// Nodes that can hold every machine, with the reason each other node cannot.
    pub eligible: BTreeSet<String>,
    pub refused: BTreeMap<String, String>,
    /// A node this student already has VMs on (a resubmit keeps them there).
    pub pinned: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeLoad {
    pub students: usize,
    pub planned_mem: u64,
    pub free_mem_after: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    /// user -> node.
    pub nodes: BTreeMap<String, String>,
    pub load: BTreeMap<String, NodeLoad>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementError {
    #[error("no node can hold every machine of {user}: {}", fmt_reasons(.reasons))]
    NoEligibleNode {
        user: String,
        reasons: BTreeMap<String, String>,
    },
}

fn fmt_reasons(r: &BTreeMap<String, String>) -> String {
    if r.is_empty() {
        return "the cluster reports no nodes".into();
    }
    r.iter()
        .map(|(n, why)| format!("{n}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Places every student. Students with a `pinned` node keep it if it is still eligible.
pub fn place(
    students: &[StudentDemand],
    nodes: &[NodeCapacity],
) -> Result<Placement, PlacementError> {
    let mut free: BTreeMap<&str, i64> = nodes
        .iter()
        .map(|n| {
            let f = n.maxmem as i64 - n.committed as i64 - n.planned_elsewhere as i64;
            (n.name.as_str(), f)
        })
        .collect();
    let by_name: BTreeMap<&str, &NodeCapacity> =
        nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    let mut planned: BTreeMap<&str, u64> = BTreeMap::new();
    let mut out = BTreeMap::new();
    let mut warnings = Vec::new();

    // Pinned students first, so the free memory others see accounts for them.
    let order = students
        .iter()
        .filter(|s| s.pinned.is_some())
        .chain(students.iter().filter(|s| s.pinned.is_none()));
    for s in order {
        let mut reasons = s.refused.clone();
        let candidates: Vec<&NodeCapacity> = s
            .eligible
            .iter()
            .filter_map(|n| match by_name.get(n.as_str()) {
                Some(node) if node.online => Some(*node),
                Some(_) => {
                    reasons.insert(n.clone(), "node is offline".into());
                    None
                }
                None => {
                    reasons.insert(n.clone(), "node is not in the cluster".into());
                    None
                }
            })
            .collect();
        let chosen = match s.pinned.as_deref() {
            Some(p) if candidates.iter().any(|c| c.name == p) => by_name[p],
            _ => {
                let best = candidates.iter().copied().max_by(|a, b| {
                    // The share of a node's memory still free, so a small node is used
                    // too (and its clone slots with it) once the big ones are as full.
                    let share =
                        |n: &NodeCapacity| free[n.name.as_str()] as f64 / n.maxmem.max(1) as f64;
                    share(a)
                        .total_cmp(&share(b))
                        .then_with(|| b.cpu.total_cmp(&a.cpu))
                        .then_with(|| {
                            count
                                .get(b.name.as_str())
                                .unwrap_or(&0)
                                .cmp(count.get(a.name.as_str()).unwrap_or(&0))
                        })
                        .then_with(|| b.name.cmp(&a.name))
                });
                match best {
                    Some(b) => b,
                    None => {
                        return Err(PlacementError::NoEligibleNode {
                            user: s.user.clone(),
                            reasons,
                        });
                    }
                }
            }
        };
        let f = free.get_mut(chosen.name.as_str()).expect("known node");
        let before = *f;
        *f -= s.mem as i64;
        if before >= 0 && *f < 0 {
            warnings.push(format!(
                "node {} would be overcommitted: its VMs' memory exceeds its memory by {} MiB",
                chosen.name,
                (-*f) / (1024 * 1024)
            ));
        }
        *count.entry(chosen.name.as_str()).or_default() += 1;
        *planned.entry(chosen.name.as_str()).or_default() += s.mem;
        out.insert(s.user.clone(), chosen.name.clone());
    }
    let load = nodes
        .iter()
        .filter(|n| count.contains_key(n.name.as_str()))
        .map(|n| {
            (
                n.name.clone(),
                NodeLoad {
                    students: count[n.name.as_str()],
                    planned_mem: planned[n.name.as_str()],
                    free_mem_after: free[n.name.as_str()],
                },
            )
        })
        .collect();
    Ok(Placement {
        nodes: out,
        load,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1024 * 1024 * 1024;

    fn node(name: &str, maxmem_gib: u64, used_gib: u64, online: bool) -> NodeCapacity {
        NodeCapacity {
            name: name.into(),
            online,
            maxmem: maxmem_gib * GIB,
            mem: used_gib * GIB,
            committed: used_gib * GIB,
            cpu: 0.1,
            maxcpu: 16,
            planned_elsewhere: 0,
        }
    }

    fn student(user: &str, mem_gib: u64, eligible: &[&str]) -> StudentDemand {
        StudentDemand {
            user: user.into(),
            mem: mem_gib * GIB,
            eligible: eligible.iter().map(|s| s.to_string()).collect(),
            refused: BTreeMap::new(),
            pinned: None,
        }
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            nodes: Vec<NodeCapacity>,
            students: Vec<StudentDemand>,
            want: &'static [(&'static str, &'static str)],
            warnings: usize,
        }
        let all = ["pve1", "pve2", "pve3"];
        let cases = vec![
            Case {
                name: "equal nodes share students round-robin by free memory",
                nodes: vec![
                    node("pve1", 64, 0, true),
                    node("pve2", 64, 0, true),
                    node("pve3", 64, 0, true),
                ],
                students: (1..=6)
                    .map(|i| student(&format!("s{i}"), 4, &all))
                    .collect(),
                want: &[
                    ("s1", "pve1"),
                    ("s2", "pve2"),
                    ("s3", "pve3"),
                    ("s4", "pve1"),
                    ("s5", "pve2"),
                    ("s6", "pve3"),
                ],
                warnings: 0,
            },
            Case {
                name: "the emptiest node is filled first",
                nodes: vec![node("pve1", 64, 40, true), node("pve2", 64, 0, true)],
                students: (1..=3)
                    .map(|i| student(&format!("s{i}"), 8, &["pve1", "pve2"]))
                    .collect(),
                want: &[("s1", "pve2"), ("s2", "pve2"), ("s3", "pve2")],
                warnings: 0,
            },
            Case {
                name: "offline nodes get nobody",
                nodes: vec![node("pve1", 64, 0, false), node("pve2", 32, 0, true)],
                students: vec![
                    student("s1", 4, &["pve1", "pve2"]),
                    student("s2", 4, &["pve1", "pve2"]),
                ],
                want: &[("s1", "pve2"), ("s2", "pve2")],
                warnings: 0,
            },
            Case {
                name: "eligibility (replicas) restricts nodes",
                nodes: vec![node("pve1", 64, 0, true), node("pve2", 128, 0, true)],
                students: vec![
                    student("s1", 4, &["pve1"]),
                    student("s2", 4, &["pve1", "pve2"]),
                ],
                want: &[("s1", "pve1"), ("s2", "pve2")],
                warnings: 0,
            },
            Case {
                name: "overcommit warns but places",
                nodes: vec![node("pve1", 8, 4, true)],
                students: vec![student("s1", 3, &["pve1"]), student("s2", 3, &["pve1"])],
                want: &[("s1", "pve1"), ("s2", "pve1")],
                warnings: 1,
            },
        ];
        for c in cases {
            let p = place(&c.students, &c.nodes).unwrap_or_else(|e| panic!("{}: {e}", c.name));
            for (u, n) in c.want {
                assert_eq!(p.nodes[*u], *n, "{}: {u}", c.name);
            }
            assert_eq!(p.warnings.len(), c.warnings, "{}: {:?}", c.name, p.warnings);
        }
    }

    #[test]
    fn a_smaller_node_gets_its_share() {
        let nodes = [
            node("pve1", 128, 4, true),
            node("pve2", 128, 4, true),
            node("pve3", 64, 3, true),
        ];
        let all = ["pve1", "pve2", "pve3"];
        let students: Vec<_> = (1..=6)
            .map(|i| student(&format!("s{i}"), 3, &all))
            .collect();
        let p = place(&students, &nodes).unwrap();
        let on = |n: &str| p.nodes.values().filter(|v| *v == n).count();
        // Students go where the largest share of memory is free: the half-size node gets
        // students (and its clone slots get work), about half as many as the big ones.
        assert_eq!(
            (on("pve1"), on("pve2"), on("pve3")),
            (3, 2, 1),
            "{:?}",
            p.nodes
        );
    }

    #[test]
    fn planned_memory_of_other_deployments_counts() {
        let mut a = node("pve1", 64, 0, true);
        a.planned_elsewhere = 60 * GIB;
        let b = node("pve2", 32, 0, true);
        let p = place(&[student("s1", 4, &["pve1", "pve2"])], &[a, b]).unwrap();
        assert_eq!(p.nodes["s1"], "pve2");
    }

    #[test]
    fn pinned_students_stay() {
        let mut s = student("s1", 4, &["pve1", "pve2"]);
        s.pinned = Some("pve1".into());
        let p = place(&[s], &[node("pve1", 8, 7, true), node("pve2", 64, 0, true)]).unwrap();
        assert_eq!(p.nodes["s1"], "pve1");
    }

    #[test]
    fn no_eligible_node_names_every_reason() {
        let mut s = student("s1", 4, &["pve1"]);
        s.refused.insert(
            "pve2".into(),
            "no replica of template 100 (linux-template)".into(),
        );
        let e = place(
            &[s],
            &[node("pve1", 64, 0, false), node("pve2", 64, 0, true)],
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("pve1: node is offline"), "{msg}");
        assert!(msg.contains("pve2: no replica"), "{msg}");
    }

    /// A running class's VMs are in the node's `mem`, in its `committed` and in that class's
    /// plan. Placement used to subtract `mem` and `planned_elsewhere` both, so pve1 (half
    /// taken by a running class of 32 GiB) looked full (64 - 32 - 32) and the student went to
    /// pve2, whose 40 GiB of stopped VMs did not count at all (64 - 8). Counted once, by
    /// configured memory, pve1 has the most room (32 GiB against 24).
    #[test]
    fn a_running_class_is_counted_once() {
        use crate::plan::{Facts, Plan};
        let mut pve1 = node("pve1", 64, 32, true);
        let mut pve2 = node("pve2", 64, 40, true);
        pve2.mem = 8 * GIB;
        let mut facts = Facts::default();
        let mut other: Plan = crate::plan::example_plan();
        for (i, v) in other.vms.iter_mut().enumerate() {
            v.node = "pve1".into();
            v.vmid = 500 + i as u32;
            v.source.maxmem = 16 * GIB;
            facts.vm_nodes.insert(v.vmid, "pve1".into());
        }
        pve1.planned_elsewhere = crate::capacity::planned_elsewhere([&other], &facts)
            .get("pve1")
            .copied()
            .unwrap_or(0);
        assert_eq!(
            pve1.planned_elsewhere, 0,
            "its VMs exist: in `committed` only"
        );
        let p = place(&[student("s1", 4, &["pve1", "pve2"])], &[pve1, pve2]).unwrap();
        assert_eq!(p.nodes["s1"], "pve1");
        // Before the VMs exist, the plan's memory counts (and nothing is in `committed`).
        facts.vm_nodes.clear();
        let elsewhere = crate::capacity::planned_elsewhere([&other], &facts);
        assert_eq!(elsewhere["pve1"], 32 * GIB);
    }
}
