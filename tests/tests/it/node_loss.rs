//! A node lost mid-deployment (issue 15): the workers notice it (calls answered 595, then
//! `node_lost_after` offline), move its unfinished students to the other nodes with new
//! VMIDs and bridges, and remove what the move left on the node once it is back.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use labfleet_tests::lab::{Caps, Lab, LabOpts, quick_queue};
use labfleet_tests::wait::wait_for;
use pve_sim::Fault;
use shared::plan::Plan;

/// Linux PCs (a template replica on every node) behind a private bridge per student.
const LAB: &str = "name: lost-node\nmachines:\n  - {device_type: linux, name: pc, template_node: pve1, template_vmid: 100, networks: [{bridge: vmbr0}, {bridge: hq}]}\n  - {device_type: linux, name: srv, template_node: pve1, template_vmid: 100, networks: [{bridge: hq}]}\n";

async fn plan_now(lab: &Lab, id: &str) -> Plan {
    let rec = lab.store.deployment(id).await.unwrap().unwrap();
    let json = lab.store.plan_json(id, rec.epoch).await.unwrap().unwrap();
    serde_json::from_str(&json).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_s_students_are_made_elsewhere_and_its_debris_goes_when_it_is_back() {
    let mut o = LabOpts::new(LAB, 9);
    o.time_scale = 0.2;
    // One clone at a time per node: the node's students finish one after the other.
    o.caps = Caps {
        per_node: Some(1),
        node_lost_after: Some("2s"),
        ..Caps::default()
    };
    o.queue = Some(quick_queue);
    let lab = Lab::start(o).await.unwrap();
    let timing = shared::jobs::Timing {
        poll_max: Duration::from_millis(200),
        ..shared::jobs::Timing::default()
    };
    let lost = "pve2";
    lab.with_workers(2, timing, async {
        let (id, first) = lab.submit().await.unwrap();
        let on_lost: BTreeSet<String> = first
            .students
            .iter()
            .filter(|s| s.node == lost)
            .map(|s| s.user.clone())
            .collect();
        assert!(
            !on_lost.is_empty(),
            "no student placed on {lost}: {:?}",
            first.placement.nodes
        );
        // Mid-deployment: one of the node's students has all their VMs, another not yet.
        let (lab_, id_, on_lost_) = (&lab, &id, &on_lost);
        wait_for(
            Duration::from_secs(60),
            "a student of the node done and another not",
            || async move {
                let st = producer::deploy::status(&lab_.store, id_).await.unwrap();
                let done = |u: &str| {
                    st.vms
                        .iter()
                        .filter(|v| v.user == u)
                        .all(|v| v.state == producer::deploy::VmState::Done)
                };
                on_lost_.iter().any(|u| done(u)) && on_lost_.iter().any(|u| !done(u))
            },
        )
        .await;
        let finished: BTreeSet<String> = {
            let st = producer::deploy::status(&lab.store, &id).await.unwrap();
            on_lost
                .iter()
                .filter(|u| {
                    st.vms
                        .iter()
                        .filter(|v| &v.user == *u)
                        .all(|v| v.state == producer::deploy::VmState::Done)
                })
                .cloned()
                .collect()
        };
        lab.sim.inject(Fault::NodeOffline {
            node: lost.to_owned(),
            duration: Duration::from_secs(14),
        });
        // Every student ends up with their VMs, the moved ones on other nodes.
        // The loss is noticed, the move recorded, and what stays on the node listed from the
        // cluster's facts: the moved students' VMs made there so far, and their bridges.
        wait_for(
            Duration::from_secs(60),
            "the students of the lost node moved",
            || async {
                !producer::deploy::status(&lab.store, &id)
                    .await
                    .unwrap()
                    .moves
                    .is_empty()
            },
        )
        .await;
        let debris = lab.store.debris("lab").await.unwrap();
        let st = producer::deploy::status(&lab.store, &id).await.unwrap();
        eprintln!("moves {:?}\ndebris {debris:?}", st.moves);
        assert!(
            debris.values().any(
                |d| matches!(d, shared::jobs::node_loss::Debris::Vm { node, .. } if node == lost)
            ),
            "no VM recorded as left on {lost}: {debris:?}"
        );
        assert!(
            debris
                .values()
                .any(|d| matches!(d, shared::jobs::node_loss::Debris::Bridge { .. })),
            "no bridge recorded as left on {lost}: {debris:?}"
        );
        assert_eq!(st.left_on_lost_nodes.len(), debris.len());
        wait_for(Duration::from_secs(120), "the deployment done", || async {
            lab.state(&id).await == "done"
        })
        .await;
        let plan = plan_now(&lab, &id).await;
        let st = producer::deploy::status(&lab.store, &id).await.unwrap();
        let moved: BTreeMap<&str, &shared::jobs::node_loss::Move> =
            st.moves.iter().map(|m| (m.user.as_str(), m)).collect();
        assert_eq!(
            moved
                .keys()
                .copied()
                .map(str::to_owned)
                .collect::<BTreeSet<_>>(),
            on_lost,
            "every student of {lost} has a move record: {:?}",
            st.moves
        );
        let really_moved: Vec<&str> = moved
            .iter()
            .filter(|(_, m)| m.to.is_some())
            .map(|(u, _)| *u)
            .collect();
        assert!(!really_moved.is_empty(), "nobody moved: {:?}", st.moves);
        // A student whose VMs were all made stays, reported.
        for u in &finished {
            assert_eq!(
                moved[u.as_str()].to,
                None,
                "{u} was done: {:?}",
                moved[u.as_str()]
            );
            let s = plan.students.iter().find(|s| &s.user == u).unwrap();
            assert_eq!(s.node, lost);
        }
        for u in &really_moved {
            let s = plan.students.iter().find(|s| s.user == *u).unwrap();
            assert_ne!(s.node, lost, "{u} still planned on the lost node");
            assert_eq!(moved[u].to.as_deref(), Some(s.node.as_str()));
            for v in plan.vms.iter().filter(|v| v.user == *u) {
                assert_eq!(v.moved, 1, "{}", v.key);
                assert_ne!(v.node, lost);
            }
        }
        // Each planned VM exists once, on its planned node, under its planned VMID.
        let vms = lab.sim.vms();
        for v in &plan.vms {
            let at: Vec<_> = vms.iter().filter(|x| x.vmid == v.vmid).collect();
            assert_eq!(at.len(), 1, "{} at {}", v.key, v.vmid);
            assert_eq!(at[0].node, v.node, "{}", v.key);
        }
        // The node comes back: what the moves left there goes, nothing else.
        wait_for(
            Duration::from_secs(90),
            "the lost node's debris removed",
            || async {
                lab.store.debris("lab").await.unwrap().is_empty()
                    && lab.store.lost_nodes("lab").await.unwrap().is_empty()
            },
        )
        .await;
        let planned: BTreeSet<u32> = plan.vms.iter().map(|v| v.vmid).collect();
        let left: Vec<(u32, String)> = lab
            .sim
            .vms()
            .into_iter()
            .filter(|v| !v.template && !planned.contains(&v.vmid))
            .map(|v| (v.vmid, v.node))
            .collect();
        assert_eq!(left, Vec::new(), "VMs nobody plans");
        let wanted: BTreeSet<String> = plan
            .students
            .iter()
            .filter(|s| s.node == lost)
            .flat_map(|s| s.bridges.values().map(|b| b.0.clone()))
            .collect();
        let ours: BTreeSet<String> = lab
            .sim
            .bridges(lost)
            .into_iter()
            .filter(|b| b.starts_with("vmbr") && b != "vmbr0")
            .collect();
        assert_eq!(
            ours, wanted,
            "bridges on {lost}: only those of students still there"
        );
        // The teardown removes everything, the moved VMs included.
        producer::deploy::teardown(&lab.store, &id).await.unwrap();
        wait_for(Duration::from_secs(90), "torn down", || async {
            lab.state(&id).await == "torn-down"
        })
        .await;
        assert!(lab.sim.vms().iter().all(|v| v.template));
    })
    .await;
}
