//! Host network calls: list, create and delete interfaces (pending until applied), apply
//! (`PUT /nodes/{node}/network` → `srvreload` task) and revert.

use reqwest::Method;
use serde::Deserialize;

use super::client::{Params, PveClient, RequestKind, decode, seg};
use super::error::PveError;
use super::lenient;
use super::upid::Upid;

/// One interface of `GET /nodes/{node}/network`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct NetworkIface {
    pub iface: String,
    /// `bridge`, `eth`, `vlan`, `bond`, ...
    #[serde(rename = "type", default)]
    pub kind: String,
    /// `false` for an interface created but not applied yet.
    #[serde(default, deserialize_with = "lenient::bool_")]
    pub active: bool,
    #[serde(default, deserialize_with = "lenient::bool_")]
    pub autostart: bool,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub bridge_ports: Option<String>,
    #[serde(default, deserialize_with = "lenient::bool_")]
    pub bridge_vlan_aware: bool,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub cidr: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub address: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub gateway: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub method: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub comments: Option<String>,
    #[serde(rename = "vlan-id", default, deserialize_with = "lenient::opt_u32")]
    pub vlan_id: Option<u32>,
    #[serde(
        rename = "vlan-raw-device",
        default,
        deserialize_with = "lenient::opt_string"
    )]
    pub vlan_raw_device: Option<String>,
}

/// `GET /nodes/{node}/network`: the interfaces (pending state if any) and the pending diff.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkList {
    pub ifaces: Vec<NetworkIface>,
    /// Diff of unapplied changes (`interfaces.new`), if any.
    pub changes: Option<String>,
}

/// Parameters of `POST /nodes/{node}/network`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetworkCreate {
    pub iface: String,
    /// `bridge`, `vlan`, ...
    pub kind: String,
    pub autostart: Option<bool>,
    /// Ports of a bridge; empty for an isolated bridge.
    pub bridge_ports: Vec<String>,
    pub bridge_vlan_aware: Option<bool>,
    pub cidr: Option<String>,
    pub comments: Option<String>,
    pub vlan_id: Option<u32>,
    pub vlan_raw_device: Option<String>,
}

impl NetworkCreate {
    /// A bridge without ports (what a lab segment needs).
    pub fn bridge(iface: impl Into<String>) -> Self {
        NetworkCreate {
            iface: iface.into(),
            kind: "bridge".into(),
            autostart: Some(true),
            ..NetworkCreate::default()
        }
    }
}

impl PveClient {
    /// `GET /nodes/{node}/network[?type=..]`
    pub async fn network_list(
        &self,
        node: &str,
        kind: Option<&str>,
    ) -> Result<NetworkList, PveError> {
        let path = format!("/nodes/{}/network", seg(node));
        let env = self
            .request(
                Method::GET,
                &path,
                &Params::new().opt_str("type", kind),
                RequestKind::Other,
            )
            .await?;
        Ok(NetworkList {
            ifaces: decode(&path, env.data)?,
            changes: env.changes.filter(|c| !c.is_empty()),
        })
    }

    /// `POST /nodes/{node}/network`: writes a pending change; apply with
    /// [`PveClient::network_apply`].
    pub async fn network_create(&self, node: &str, p: &NetworkCreate) -> Result<(), PveError> {
        let params = Params::new()
            .str("iface", p.iface.clone())
            .str("type", p.kind.clone())
            .opt_bool("autostart", p.autostart)
            .opt_bool("bridge_vlan_aware", p.bridge_vlan_aware)
            .opt_str("cidr", p.cidr.as_deref())
            .opt_str("comments", p.comments.as_deref())
            .opt_num("vlan-id", p.vlan_id)
            .opt_str("vlan-raw-device", p.vlan_raw_device.as_deref());
        let params = if p.bridge_ports.is_empty() {
            params
        } else {
            params.str("bridge_ports", p.bridge_ports.join(" "))
        };
        self.call_null(
            Method::POST,
            &format!("/nodes/{}/network", seg(node)),
            params,
        )
        .await
    }

    /// `DELETE /nodes/{node}/network/{iface}` (pending until applied).
    pub async fn network_delete(&self, node: &str, iface: &str) -> Result<(), PveError> {
        self.call_null(
            Method::DELETE,
            &format!("/nodes/{}/network/{}", seg(node), seg(iface)),
            Params::new(),
        )
        .await
    }

    /// `PUT /nodes/{node}/network`: applies pending changes → task `srvreload`.
    pub async fn network_apply(&self, node: &str) -> Result<Upid, PveError> {
        self.call(
            Method::PUT,
            &format!("/nodes/{}/network", seg(node)),
            Params::new(),
        )
        .await
    }

    /// `DELETE /nodes/{node}/network`: drops pending changes.
    pub async fn network_revert(&self, node: &str) -> Result<(), PveError> {
        self.call_null(
            Method::DELETE,
            &format!("/nodes/{}/network", seg(node)),
            Params::new(),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iface_decodes() {
        let i: NetworkIface = serde_json::from_str(
            r#"{"iface":"vmbr1","type":"bridge","active":1,"autostart":1,"bridge_ports":"","bridge_vlan_aware":1,
                "comments":"lab\n","families":["inet"],"priority":5,"method":"manual"}"#,
        )
        .unwrap();
        assert!(i.active && i.autostart && i.bridge_vlan_aware);
        let j: NetworkIface = serde_json::from_str(r#"{"iface":"vmbr2","type":"bridge"}"#).unwrap();
        assert!(!j.active);
    }
}
