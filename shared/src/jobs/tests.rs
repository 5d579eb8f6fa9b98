//! Payload JSON snapshots: payloads sit in Redis across upgrades, so their wire form must
//! only change compatibly. If this test fails, you changed the format: keep old fields
//! readable (new fields optional with a default) and update the snapshot on purpose.

use super::*;

fn vm() -> VmRef {
    VmRef {
        deployment: "netlab@lab".into(),
        cluster: "lab".into(),
        key: "student1@pve/student-pc".into(),
        node: "pve2".into(),
    }
}

#[test]
fn payload_snapshots() {
    let jobs = vec![
        Job::Student(StudentJob {
            deployment: "netlab@lab".into(),
            cluster: "lab".into(),
            user: "student1@pve".into(),
            pool: "netlab-student1".into(),
            role: "PVEVMUser".into(),
            sealed_password: Some("enc:AAAA".into()),
        }),
        Job::NodeNetwork(NodeNetworkJob {
            deployment: "netlab@lab".into(),
            cluster: "lab".into(),
            node: "pve2".into(),
            bridges: vec![BridgePlan {
                iface: "vmbr1000".into(),
                vlan_aware: true,
                owner: "student1@pve hq".into(),
            }],
        }),
        Job::Clone(CloneJob {
            vm: vm(),
            name: "student-pc-student1".into(),
            source_node: "pve2".into(),
            source_vmid: 101,
            full: false,
            storage: None,
            vmid: 1000,
            vmid_min: 100,
            vmid_max: 999_999,
        }),
        Job::Network(NetworkJob {
            vm: vm(),
            nics: vec![NicPlan {
                model: "virtio".into(),
                bridge: "vmbr1000".into(),
                tag: Some(100),
                firewall: None,
            }],
        }),
        Job::Permission(PermissionJob {
            vm: vm(),
            user: "student1@pve".into(),
            role: "PVEVMUser".into(),
            pool: Some("netlab-student1".into()),
        }),
        Job::Start(StartJob { vm: vm() }),
        Job::Baseline(crate::jobs::baseline::BaselineJob { vm: vm() }),
        Job::Power(crate::jobs::power::PowerJob {
            vm: vm(),
            op: "20261202T060000-1a2b".into(),
            action: crate::jobs::power::PowerAction::Shutdown,
            timeout_secs: Some(120),
        }),
        Job::Reset(crate::jobs::reset::ResetJob {
            vm: vm(),
            op: "20261202T060000-1a2b".into(),
        }),
        Job::Schedule(crate::jobs::schedule::ScheduleJob {
            deployment: "netlab@lab".into(),
            cluster: "lab".into(),
            generation: 1,
            event: "2026-12-07T08:00/start".into(),
            what: crate::jobs::schedule::EventKind::Start,
            due: "2026-12-07T06:50:00Z".parse().unwrap(),
            until: "2026-12-07T08:30:00Z".parse().unwrap(),
        }),
        Job::Destroy(DestroyJob {
            vm: vm(),
            vmid: Some(1000),
            epoch: Some(2),
        }),
        Job::TeardownFinish(TeardownFinishJob {
            deployment: "netlab@lab".into(),
            cluster: "lab".into(),
            epoch: 3,
            prune: None,
        }),
        Job::TeardownFinish(TeardownFinishJob {
            deployment: "netlab@lab".into(),
            cluster: "lab".into(),
            epoch: 0,
            prune: Some(PruneSet {
                round: "1700000000000".into(),
                vms: vec!["student2@pve/student-pc".into()],
                users: vec!["student2@pve".into()],
                bridges: vec![("pve1".into(), "student2@pve hq".into())],
                jobs: vec!["netlab@lab#0/vm/student2@pve/student-pc/clone".into()],
            }),
        }),
        Job::AuditRemove(audit::AuditRemoveJob {
            cluster: "lab".into(),
            audit: "audit@lab#1700000000000".into(),
            object: crate::audit::Debris::Vm {
                node: "pve1".into(),
                vmid: 4100,
                deployment: "gone@lab".into(),
                key: "student1@pve/pc".into(),
                epoch: 1,
            },
        }),
        Job::AuditRemove(audit::AuditRemoveJob {
            cluster: "lab".into(),
            audit: "audit@lab#1700000000000".into(),
            object: crate::audit::Debris::Volume {
                node: "pve1".into(),
                storage: "local-lvm".into(),
                volid: "local-lvm:vm-4100-disk-0".into(),
                vmid: Some(4100),
                deployment: None,
            },
        }),
    ];
    let got: Vec<String> = jobs
        .iter()
        .map(|j| serde_json::to_string(j).unwrap())
        .collect();
    let want = [
        r#"{"kind":"student","deployment":"netlab@lab","cluster":"lab","user":"student1@pve","pool":"netlab-student1","role":"PVEVMUser","sealed_password":"enc:AAAA"}"#,
        r#"{"kind":"node-network","deployment":"netlab@lab","cluster":"lab","node":"pve2","bridges":[{"iface":"vmbr1000","vlan_aware":true,"owner":"student1@pve hq"}]}"#,
        r#"{"kind":"clone","vm":{"deployment":"netlab@lab","cluster":"lab","key":"student1@pve/student-pc","node":"pve2"},"name":"student-pc-student1","source_node":"pve2","source_vmid":101,"full":false,"storage":null,"vmid":1000,"vmid_min":100,"vmid_max":999999}"#,
        r#"{"kind":"network","vm":{"deployment":"netlab@lab","cluster":"lab","key":"student1@pve/student-pc","node":"pve2"},"nics":[{"model":"virtio","bridge":"vmbr1000","tag":100,"firewall":null}]}"#,
        r#"{"kind":"permission","vm":{"deployment":"netlab@lab","cluster":"lab","key":"student1@pve/student-pc","node":"pve2"},"user":"student1@pve","role":"PVEVMUser","pool":"netlab-student1"}"#,
        r#"{"kind":"start","vm":{"deployment":"netlab@lab","cluster":"lab","key":"student1@pve/student-pc","node":"pve2"}}"#,
        r#"{"kind":"baseline","vm":{"deployment":"netlab@lab","cluster":"lab","key":"student1@pve/student-pc","node":"pve2"}}"#,
        r#"{"kind":"power","vm":{"deployment":"netlab@lab","cluster":"lab","key":"student1@pve/student-pc","node":"pve2"},"op":"20261202T060000-1a2b","action":"shutdown","timeout_secs":120}"#,
        r#"{"kind":"reset","vm":{"deployment":"netlab@lab","cluster":"lab","key":"student1@pve/student-pc","node":"pve2"},"op":"20261202T060000-1a2b"}"#,
        r#"{"kind":"schedule","deployment":"netlab@lab","cluster":"lab","generation":1,"event":"2026-12-07T08:00/start","what":"start","due":"2026-12-07T06:50:00Z","until":"2026-12-07T08:30:00Z"}"#,
        r#"{"kind":"destroy","vm":{"deployment":"netlab@lab","cluster":"lab","key":"student1@pve/student-pc","node":"pve2"},"vmid":1000,"epoch":2}"#,
        r#"{"kind":"teardown-finish","deployment":"netlab@lab","cluster":"lab","epoch":3}"#,
        r#"{"kind":"teardown-finish","deployment":"netlab@lab","cluster":"lab","epoch":0,"prune":{"round":"1700000000000","vms":["student2@pve/student-pc"],"users":["student2@pve"],"bridges":[["pve1","student2@pve hq"]],"jobs":["netlab@lab#0/vm/student2@pve/student-pc/clone"]}}"#,
        r#"{"kind":"audit-remove","cluster":"lab","audit":"audit@lab#1700000000000","object":{"type":"vm","node":"pve1","vmid":4100,"deployment":"gone@lab","key":"student1@pve/pc","epoch":1}}"#,
        r#"{"kind":"audit-remove","cluster":"lab","audit":"audit@lab#1700000000000","object":{"type":"volume","node":"pve1","storage":"local-lvm","volid":"local-lvm:vm-4100-disk-0","vmid":4100,"deployment":null}}"#,
    ];
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g, w);
        let back: Job = serde_json::from_str(w).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), *g);
    }
    for j in &jobs {
        assert!(KINDS.contains(&j.kind()));
    }
}

#[test]
fn a_destroy_payload_of_the_version_before_epochs_still_decodes() {
    let old = r#"{"kind":"destroy","vm":{"deployment":"d@c","cluster":"c","key":"u@pve/pc","node":"pve1"},"vmid":1000}"#;
    let j: Job = serde_json::from_str(old).unwrap();
    assert!(matches!(
        j,
        Job::Destroy(DestroyJob {
            epoch: None,
            vmid: Some(1000),
            ..
        })
    ));
}

#[test]
fn markers_of_this_and_the_previous_version_are_read() {
    let dep = "netlab@lab";
    let key = "student1@pve/student-pc";
    assert_eq!(
        marker(dep, key, 4),
        "labfleet deployment=netlab@lab vm=student1@pve/student-pc epoch=4"
    );
    let now = format!("notes by the teacher\n{}\n", marker(dep, key, 4));
    assert_eq!(find_marker(&now, dep, key), MarkerMatch::Epoch(4));
    assert!(find_marker(&now, dep, key).is_ours(4));
    assert!(
        !find_marker(&now, dep, key).is_ours(5),
        "another epoch's VM is not ours"
    );
    // What the version before epochs wrote (the upgrade fixture's VMs carry it).
    let old = "labfleet deployment=netlab@lab vm=student1@pve/student-pc";
    assert_eq!(find_marker(old, dep, key), MarkerMatch::Legacy);
    assert!(find_marker(old, dep, key).is_ours(7));
    assert_eq!(find_marker(old, dep, "student1@pve/gw"), MarkerMatch::None);
    assert_eq!(find_marker(old, "netlab@lab2", key), MarkerMatch::None);
    assert_eq!(
        find_marker(
            "labfleet deployment=netlab@lab vm=student1@pve/student-pc epoch=x",
            dep,
            key
        ),
        MarkerMatch::None
    );
}

#[test]
fn a_job_s_scope_is_the_first_segment_of_its_key() {
    assert_eq!(scope_of_key("lab@c#3/vm/u@pve/pc/clone"), "lab@c#3");
    assert_eq!(epoch_of_scope("lab@c#3"), 3);
    assert_eq!(scope("lab@c", 3), "lab@c#3");
    assert_eq!(scope_of_key(&keys::teardown_finish("lab@c#2")), "lab@c#2");
}

#[test]
fn old_payloads_without_optional_fields_still_decode() {
    let old = r#"{"kind":"student","deployment":"d@c","cluster":"c","user":"u@pve","pool":"p"}"#;
    let j: Job = serde_json::from_str(old).unwrap();
    assert!(matches!(
        j,
        Job::Student(StudentJob {
            sealed_password: None,
            ..
        })
    ));
    // Before the role moved to the pool: the clone carried the pool (now ignored), the
    // permission job no pool (it grants the role per VM), the student job no role.
    let old = r#"{"kind":"student","deployment":"d@c","cluster":"c","user":"u@pve","pool":"p","sealed_password":null}"#;
    let j: Job = serde_json::from_str(old).unwrap();
    assert!(matches!(j, Job::Student(StudentJob { ref role, .. }) if role.is_empty()));
    let old = r#"{"kind":"clone","vm":{"deployment":"d@c","cluster":"c","key":"u@pve/pc","node":"pve1"},"name":"pc-u","source_node":"pve1","source_vmid":100,"full":false,"storage":null,"pool":"p","vmid":1000,"vmid_min":100,"vmid_max":999999}"#;
    assert!(matches!(serde_json::from_str(old).unwrap(), Job::Clone(_)));
    let old = r#"{"kind":"permission","vm":{"deployment":"d@c","cluster":"c","key":"u@pve/pc","node":"pve1"},"user":"u@pve","role":"PVEVMUser"}"#;
    assert!(matches!(
        serde_json::from_str(old).unwrap(),
        Job::Permission(PermissionJob { pool: None, .. })
    ));
}

#[test]
fn timing_scales_to_a_simulators_pace_but_not_the_cache() {
    let t = Timing::default();
    let s = t.scaled(0.1);
    assert_eq!(s.poll_max, t.poll_max / 10);
    assert_eq!(s.recheck, Duration::from_millis(200));
    assert_eq!(s.lost_call_window, Duration::from_secs(1));
    assert_eq!(s.task_deadline, Duration::from_secs(360));
    assert_eq!(s.cache_ttl, t.cache_ttl, "facts age in real time");
    // Floors: no timer below 5 ms, and scale 0 (the zero-cost simulator) keeps them all.
    assert_eq!(t.scaled(0.0001).poll_initial, Duration::from_millis(5));
    assert_eq!(t.scaled(0.0).recheck, t.recheck);
}
