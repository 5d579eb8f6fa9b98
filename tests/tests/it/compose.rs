//! docker-compose.yml's connection (`data/compose/connections.yml`) without Docker: its host
//! is the compose service name `pve-sim`, which the demo certificate's SANs (127.0.0.1, ::1,
//! localhost) do not name. That works because a pinned fingerprint is checked instead of the
//! certificate's names. Proven here by serving the demo certificate on 127.0.0.2, another
//! name the certificate does not carry, and connecting with data/compose's settings.
//! (`.ci/run` validates the compose file with `docker-compose config -q` and brings it up
//! for real with `.ci/compose.sh`.)

use std::net::SocketAddr;

use labfleet_tests::bins::root;
use pve_sim::{Sim, SimConfig, TlsMode};
use shared::config::load_connections;

#[tokio::test]
async fn compose_connection_pins_the_demo_cert_whatever_the_name() {
    let sim_dir = root().join("data/sim");
    let mut sc = SimConfig::from_cluster_file(&sim_dir.join("cluster.yml")).unwrap();
    sc.listen = SocketAddr::from(([127, 0, 0, 2], 0));
    sc.tls = TlsMode::Pem {
        cert: sim_dir.join("demo-cert.pem"),
        key: sim_dir.join("demo-key.pem"),
    };
    sc.time_scale = 0.0;
    let sim = Sim::start(sc).await.unwrap();

    let conns = load_connections(&root().join("data/compose/connections.yml")).unwrap();
    let lab = &conns.clusters["lab"];
    assert_eq!(lab.host.host, "pve-sim");
    let mut cc = shared::clusters::client_config(lab, None).unwrap();
    assert_eq!(
        sim.fingerprint().as_deref(),
        Some(shared::pve::format_fingerprint(&pin(&cc.tls)).as_str()),
        "data/compose pins the demo certificate"
    );
    cc.host = "127.0.0.2".into();
    cc.port = sim.addr().port();
    let pve = shared::pve::PveClient::new(cc).unwrap();
    let v = pve
        .version()
        .await
        .expect("pinned connection to a name not in the SANs");
    assert!(v.version.is_some());
    sim.shutdown().await;
}

fn pin(tls: &shared::pve::TlsPolicy) -> [u8; 32] {
    match tls {
        shared::pve::TlsPolicy::Fingerprint(fp) => *fp,
        other => panic!("data/compose must pin a fingerprint, has {other:?}"),
    }
}
