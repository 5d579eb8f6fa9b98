//! The jobs of a teardown and of a prune, built from a plan and the VM facts: pure (no
//! I/O), so the producer, the tests and a resumed teardown build the same list.
//!
//! A teardown of epoch `E` (scope `<id>#E`) removes the VMs of epoch `E - 1`: one `destroy`
//! per VM, then per student the pool (and the user, if nobody else lists it) gated on that
//! student's destroys, per node the private bridges gated on the node's destroys, and last a
//! `teardown-finish` gated on all of them. A prune removes some students of the active epoch
//! the same way, under keys carrying its round.

use std::collections::{BTreeMap, BTreeSet};

use crate::jobs::{
    BridgePlan, DestroyJob, Job, NodeNetworkJob, PruneSet, StudentJob, TeardownFinishJob, VmRef,
    keys,
};
use crate::plan::{Plan, StudentPlan, VmPlan};
use crate::queue::JobSpec;

/// Every job of teardown `scope` (epoch `epoch`) of `plan`, the plan of epoch `epoch - 1`.
/// `vmids` are the VMIDs the facts recorded (informational in the payloads).
pub fn teardown(
    plan: &Plan,
    scope: &str,
    epoch: u32,
    vmids: &BTreeMap<String, u32>,
) -> Vec<JobSpec> {
    let vms: Vec<&VmPlan> = plan.vms.iter().chain(&plan.retired).collect();
    let students: Vec<&StudentPlan> = plan.students.iter().chain(&plan.retired_students).collect();
    let names = Names {
        destroy: &|vm| keys::destroy(scope, vm),
        student: &|u| keys::student_teardown(scope, u),
        node: &|n| keys::node_network_teardown(scope, n),
        finish: keys::teardown_finish(scope),
    };
    let finish = TeardownFinishJob {
        deployment: plan.id.clone(),
        cluster: plan.cluster.clone(),
        epoch,
        prune: None,
    };
    removal(
        plan,
        scope,
        epoch.saturating_sub(1),
        &vms,
        &students,
        true,
        vmids,
        &names,
        finish,
    )
}

/// The teardown of an epoch that has no plan (nothing was ever planned for it): only its
/// finish job, which moves the record.
pub fn finish_only(deployment: &str, cluster: &str, epoch: u32) -> JobSpec {
    let scope = crate::jobs::scope(deployment, epoch);
    let job = Job::TeardownFinish(TeardownFinishJob {
        deployment: deployment.to_owned(),
        cluster: cluster.to_owned(),
        epoch,
        prune: None,
    });
    JobSpec::new(keys::teardown_finish(&scope), job.kind(), job.to_value())
        .group(scope)
        .forget_when_done()
}

/// The jobs that remove `vms` and `students` (the `retired` parts of the active plan
/// `prior` that the files no longer list) from the active epoch `epoch` (scope `scope`).
/// Empty when there is nothing to remove.
pub fn prune(
    prior: &Plan,
    scope: &str,
    epoch: u32,
    round: &str,
    vmids: &BTreeMap<String, u32>,
) -> Vec<JobSpec> {
    let vms: Vec<&VmPlan> = prior.retired.iter().collect();
    let students: Vec<&StudentPlan> = prior.retired_students.iter().collect();
    if vms.is_empty() && students.is_empty() {
        return Vec::new();
    }
    let names = Names {
        destroy: &|vm| keys::prune_vm(scope, round, vm),
        student: &|u| keys::prune_student(scope, round, u),
        node: &|n| keys::prune_node_network(scope, round, n),
        finish: keys::prune_finish(scope, round),
    };
    let bridges = students
        .iter()
        .flat_map(|s| {
            s.bridges
                .keys()
                .map(|alias| (s.node.clone(), format!("{} {alias}", s.user)))
        })
        .collect();
    let finish = TeardownFinishJob {
        deployment: prior.id.clone(),
        cluster: prior.cluster.clone(),
        epoch,
        prune: Some(PruneSet {
            round: round.to_owned(),
            vms: vms.iter().map(|v| v.key.clone()).collect(),
            users: students.iter().map(|s| s.user.clone()).collect(),
            bridges,
            jobs: vms
                .iter()
                .flat_map(|v| {
                    ["clone", "network", "permission", "start"].map(|step| v.job_key(scope, step))
                })
                .chain(students.iter().map(|s| keys::student(scope, &s.user)))
                .collect(),
        }),
    };
    removal(
        prior, scope, epoch, &vms, &students, false, vmids, &names, finish,
    )
}

struct Names<'a> {
    destroy: &'a dyn Fn(&str) -> String,
    student: &'a dyn Fn(&str) -> String,
    node: &'a dyn Fn(&str) -> String,
    finish: String,
}

#[allow(clippy::too_many_arguments)] // two callers, each naming every argument
fn removal(
    plan: &Plan,
    scope: &str,
    vm_epoch: u32,
    vms: &[&VmPlan],
    students: &[&StudentPlan],
    all_bridges: bool,
    vmids: &BTreeMap<String, u32>,
    names: &Names<'_>,
    finish: TeardownFinishJob,
) -> Vec<JobSpec> {
    let spec = |key: String, job: Job| {
        JobSpec::new(key, job.kind(), job.to_value()).group(scope.to_owned())
    };
    let mut specs = Vec::new();
    let mut by_user: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut by_node: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for v in vms {
        let k = (names.destroy)(&v.key);
        let job = Job::Destroy(DestroyJob {
            vm: VmRef {
                deployment: plan.id.clone(),
                cluster: plan.cluster.clone(),
                key: v.key.clone(),
                node: v.node.clone(),
            },
            vmid: vmids.get(&v.key).copied(),
            epoch: Some(vm_epoch),
        });
        specs.push(spec(k.clone(), job));
        by_user.entry(&v.user).or_default().push(k.clone());
        by_node.entry(&v.node).or_default().push(k);
    }
    for s in students {
        let job = Job::StudentTeardown(StudentJob {
            deployment: plan.id.clone(),
            cluster: plan.cluster.clone(),
            user: s.user.clone(),
            pool: s.pool.clone(),
            role: plan.role.clone(),
            sealed_password: None,
        });
        let gate = by_user.get(s.user.as_str()).cloned().unwrap_or_default();
        specs.push(spec((names.student)(&s.user), job).after(gate));
    }
    // Private bridges: every node of the plan that has some (a teardown), or only the
    // removed students' (a prune: `bridges` names them; empty would mean all).
    let mut per_node: BTreeMap<&str, BTreeSet<BridgePlan>> = BTreeMap::new();
    for s in students.iter().filter(|s| !s.bridges.is_empty()) {
        let e = per_node.entry(s.node.as_str()).or_default();
        if !all_bridges {
            for (alias, (iface, vlan_aware)) in &s.bridges {
                e.insert(BridgePlan {
                    iface: iface.clone(),
                    vlan_aware: *vlan_aware,
                    owner: format!("{} {alias}", s.user),
                });
            }
        }
    }
    for (node, bridges) in per_node {
        let job = Job::NodeNetworkTeardown(NodeNetworkJob {
            deployment: plan.id.clone(),
            cluster: plan.cluster.clone(),
            node: node.to_owned(),
            bridges: bridges.into_iter().collect(),
        });
        let gate = by_node.get(node).cloned().unwrap_or_default();
        specs.push(spec((names.node)(node), job).after(gate));
    }
    let gate: Vec<String> = specs.iter().map(|s| s.key.clone()).collect();
    specs.push(
        spec(names.finish.clone(), Job::TeardownFinish(finish))
            .after(gate)
            .forget_when_done(),
    );
    specs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        crate::plan::example_plan()
    }

    #[test]
    fn a_teardown_without_a_plan_is_its_finish_job_alone() {
        let spec = finish_only("netlab@lab", "lab", 3);
        assert_eq!(spec.kind, "teardown-finish");
        assert_eq!(spec.key, keys::teardown_finish("netlab@lab#3"));
        assert_eq!(spec.group.as_deref(), Some("netlab@lab#3"));
        let job: Job = serde_json::from_value(spec.payload.clone()).unwrap();
        assert!(spec.forget_when_done);
        assert!(matches!(job, Job::TeardownFinish(f) if f.epoch == 3 && f.prune.is_none()));
    }

    #[test]
    fn a_teardown_destroys_every_vm_then_cleans_up_then_finishes() {
        let p = plan();
        let vmids: BTreeMap<String, u32> = p.vms.iter().map(|v| (v.key.clone(), v.vmid)).collect();
        let specs = teardown(&p, "lab@c#3", 3, &vmids);
        let kinds: Vec<&str> = specs.iter().map(|s| s.kind.as_str()).collect();
        let n_vms = p.vms.len() + p.retired.len();
        assert_eq!(kinds.iter().filter(|k| **k == "destroy").count(), n_vms);
        assert_eq!(
            kinds.iter().filter(|k| **k == "student-teardown").count(),
            p.students.len() + p.retired_students.len()
        );
        let finish = specs.last().expect("a finish job");
        assert_eq!(finish.kind, "teardown-finish");
        assert_eq!(finish.key, "lab@c#3/teardown/finish");
        assert!(finish.forget_when_done);
        assert_eq!(
            finish.gate.len(),
            specs.len() - 1,
            "gated on every other job"
        );
        for s in &specs {
            assert_eq!(s.group.as_deref(), Some("lab@c#3"));
            if s.kind == "destroy" {
                let j: Job = serde_json::from_value(s.payload.clone()).unwrap();
                let Job::Destroy(d) = j else { panic!() };
                assert_eq!(d.epoch, Some(2), "it destroys the previous epoch's VMs");
            }
            if s.kind == "student-teardown" {
                assert!(!s.gate.is_empty(), "a student's pool goes after their VMs");
                assert!(s.gate.iter().all(|g| g.contains("/teardown/vm/")));
            }
        }
    }

    #[test]
    fn a_prune_removes_only_the_retired_students() {
        let mut p = plan();
        let gone = p.students.pop().expect("two students");
        let gone_vms: Vec<VmPlan> = p
            .vms
            .iter()
            .filter(|v| v.user == gone.user)
            .cloned()
            .collect();
        p.vms.retain(|v| v.user != gone.user);
        p.retired = gone_vms.clone();
        p.retired_students = vec![gone.clone()];
        let specs = prune(&p, "lab@c#0", 0, "r1", &BTreeMap::new());
        let destroyed: BTreeSet<String> = specs
            .iter()
            .filter(|s| s.kind == "destroy")
            .map(|s| s.key.clone())
            .collect();
        assert_eq!(destroyed.len(), gone_vms.len());
        assert!(
            destroyed
                .iter()
                .all(|k| k.starts_with("lab@c#0/prune/r1/vm/"))
        );
        let Job::TeardownFinish(f) =
            serde_json::from_value(specs.last().unwrap().payload.clone()).unwrap()
        else {
            panic!("the last job finishes")
        };
        let set = f.prune.expect("a prune");
        assert_eq!(set.users, vec![gone.user.clone()]);
        for s in specs.iter().filter(|s| s.kind == "node-network-teardown") {
            let Job::NodeNetworkTeardown(n) = serde_json::from_value(s.payload.clone()).unwrap()
            else {
                panic!()
            };
            assert!(
                !n.bridges.is_empty(),
                "a prune names the bridges it removes"
            );
            assert!(n.bridges.iter().all(|b| b.owner.starts_with(&gone.user)));
        }
        let mut none = plan();
        none.retired.clear();
        none.retired_students.clear();
        assert!(prune(&none, "lab@c#0", 0, "r2", &BTreeMap::new()).is_empty());
    }
}
