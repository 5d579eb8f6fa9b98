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
            pool: "netlab-student1".into(),
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
        }),
        Job::Start(StartJob { vm: vm() }),
        Job::Destroy(DestroyJob {
            vm: vm(),
            vmid: Some(1000),
        }),
    ];
    let got: Vec<String> = jobs
        .iter()
        .map(|j| serde_json::to_string(j).unwrap())
        .collect();
    let want = [
        r#"{"kind":"student","deployment":"netlab@lab","cluster":"lab","user":"student1@pve","pool":"netlab-student1","sealed_password":"enc:AAAA"}"#,
        r#"{"kind":"node-network","deployment":"netlab@lab","cluster":"lab","node":"pve2","bridges":[{"iface":"vmbr1000","vlan_aware":true,"owner":"student1@pve hq"}]}"#,
        r#"{"kind":"clone","vm":{"deployment":"netlab@lab","cluster":"lab","key":"student1@pve/student-pc","node":"pve2"},"name":"student-pc-student1","source_node":"pve2","source_vmid":101,"full":false,"storage":null,"pool":"netlab-student1","vmid":1000,"vmid_min":100,"vmid_max":999999}"#,
        r#"{"kind":"network","vm":{"deployment":"netlab@lab","cluster":"lab","key":"student1@pve/student-pc","node":"pve2"},"nics":[{"model":"virtio","bridge":"vmbr1000","tag":100,"firewall":null}]}"#,
        r#"{"kind":"permission","vm":{"deployment":"netlab@lab","cluster":"lab","key":"student1@pve/student-pc","node":"pve2"},"user":"student1@pve","role":"PVEVMUser"}"#,
        r#"{"kind":"start","vm":{"deployment":"netlab@lab","cluster":"lab","key":"student1@pve/student-pc","node":"pve2"}}"#,
        r#"{"kind":"destroy","vm":{"deployment":"netlab@lab","cluster":"lab","key":"student1@pve/student-pc","node":"pve2"},"vmid":1000}"#,
    ];
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
}
