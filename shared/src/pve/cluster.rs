//! Cluster- and node-level reads: version, nodes, node status, cluster resources, nextid,
//! storages.

use serde::Deserialize;
use serde_json::Value;

use super::client::{Params, PveClient, decode, seg};
use super::error::PveError;
use super::lenient;

/// `GET /version`
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Version {
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub version: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub release: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub repoid: Option<String>,
}

/// One entry of `GET /nodes`. Stats are absent without Sys.Audit on the node.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct NodeEntry {
    pub node: String,
    /// `online`, `offline` or `unknown`.
    #[serde(default)]
    pub status: String,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    pub cpu: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub maxcpu: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub mem: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub maxmem: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub disk: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub maxdisk: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub uptime: Option<u64>,
    /// `AB:CD:..` SHA-256 of the node's certificate.
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub ssl_fingerprint: Option<String>,
}

impl NodeEntry {
    pub fn is_online(&self) -> bool {
        self.status == "online"
    }
}

/// `GET /nodes/{node}/status` (the fields labfleet reads).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct NodeStatus {
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    pub cpu: Option<f64>,
    /// 1, 5 and 15 minute load averages (sent as strings).
    #[serde(default, deserialize_with = "lenient::f64_list")]
    pub loadavg: Vec<f64>,
    #[serde(default)]
    pub memory: Option<MemoryInfo>,
    #[serde(default)]
    pub cpuinfo: Option<CpuInfo>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub uptime: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub pveversion: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub kversion: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct MemoryInfo {
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub total: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub used: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub free: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub available: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct CpuInfo {
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub cpus: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub cores: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub sockets: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub model: Option<String>,
}

/// The `type` filter of `GET /cluster/resources`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceType {
    Vm,
    Storage,
    Node,
    Sdn,
}

impl ResourceType {
    fn as_str(self) -> &'static str {
        match self {
            ResourceType::Vm => "vm",
            ResourceType::Storage => "storage",
            ResourceType::Node => "node",
            ResourceType::Sdn => "sdn",
        }
    }
}

/// One entry of `GET /cluster/resources`, by its `type`.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterResource {
    /// `qemu` or `lxc`.
    Vm(VmResource),
    Node(NodeResource),
    Storage(StorageResource),
    /// `pool`, `sdn`, `network` and future types, undecoded.
    Other(Value),
}

/// A guest in `/cluster/resources`. A brand-new clone may lack `name`/`template` and show
/// `status: unknown` for ~10 s: read its config for authoritative data.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct VmResource {
    #[serde(deserialize_with = "lenient::u32_")]
    pub vmid: u32,
    pub node: String,
    /// `qemu` or `lxc`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "lenient::bool_")]
    pub template: bool,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub lock: Option<String>,
    /// `running`, `stopped` or `unknown`.
    #[serde(default)]
    pub status: String,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub pool: Option<String>,
    /// `;`-separated in the API.
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub tags: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub maxmem: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub mem: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub maxcpu: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    pub cpu: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub maxdisk: Option<u64>,
}

impl VmResource {
    pub fn tag_list(&self) -> Vec<String> {
        self.tags
            .as_deref()
            .map(lenient::split_list)
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct NodeResource {
    pub node: String,
    #[serde(default)]
    pub status: String,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    pub cpu: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub maxcpu: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub mem: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub maxmem: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub disk: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub maxdisk: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub uptime: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct StorageResource {
    pub storage: String,
    pub node: String,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub plugintype: Option<String>,
    #[serde(default)]
    pub status: String,
    #[serde(default, deserialize_with = "lenient::bool_")]
    pub shared: bool,
    /// e.g. `images,rootdir`
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub content: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub disk: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub maxdisk: Option<u64>,
}

impl ClusterResource {
    fn from_value(path: &str, v: Value) -> Result<ClusterResource, PveError> {
        let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
        Ok(match kind {
            "qemu" | "lxc" => ClusterResource::Vm(decode(path, v)?),
            "node" => ClusterResource::Node(decode(path, v)?),
            "storage" => ClusterResource::Storage(decode(path, v)?),
            _ => ClusterResource::Other(v),
        })
    }
}

/// One entry of `GET /nodes/{node}/storage`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct StorageEntry {
    pub storage: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub content: Option<String>,
    #[serde(default, deserialize_with = "lenient::bool_")]
    pub enabled: bool,
    #[serde(default, deserialize_with = "lenient::bool_")]
    pub active: bool,
    #[serde(default, deserialize_with = "lenient::bool_")]
    pub shared: bool,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub total: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub used: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub avail: Option<u64>,
}

impl StorageEntry {
    pub fn supports(&self, content: &str) -> bool {
        self.content
            .as_deref()
            .map(|c| lenient::split_list(c).iter().any(|x| x == content))
            .unwrap_or(false)
    }
}

impl PveClient {
    /// `GET /version`
    pub async fn version(&self) -> Result<Version, PveError> {
        self.get("/version", Params::new()).await
    }

    /// `GET /nodes`
    pub async fn nodes(&self) -> Result<Vec<NodeEntry>, PveError> {
        self.get("/nodes", Params::new()).await
    }

    /// `GET /nodes/{node}/status`
    pub async fn node_status(&self, node: &str) -> Result<NodeStatus, PveError> {
        self.get(&format!("/nodes/{}/status", seg(node)), Params::new())
            .await
    }

    /// `GET /cluster/resources[?type=..]`
    pub async fn cluster_resources(
        &self,
        filter: Option<ResourceType>,
    ) -> Result<Vec<ClusterResource>, PveError> {
        let path = "/cluster/resources";
        let raw: Vec<Value> = self
            .get(
                path,
                Params::new().opt_str("type", filter.map(ResourceType::as_str)),
            )
            .await?;
        raw.into_iter()
            .map(|v| ClusterResource::from_value(path, v))
            .collect()
    }

    /// The guests of `/cluster/resources?type=vm`.
    pub async fn cluster_vms(&self) -> Result<Vec<VmResource>, PveError> {
        Ok(self
            .cluster_resources(Some(ResourceType::Vm))
            .await?
            .into_iter()
            .filter_map(|r| match r {
                ClusterResource::Vm(v) => Some(v),
                _ => None,
            })
            .collect())
    }

    /// `GET /cluster/nextid[?vmid=X]`. With `vmid`, returns it if free anywhere in the
    /// cluster, else [`PveError::AlreadyExists`]. Nothing is reserved: a concurrent clone
    /// can still take the id.
    pub async fn nextid(&self, vmid: Option<u32>) -> Result<u32, PveError> {
        let path = "/cluster/nextid";
        let v: Value = self.get(path, Params::new().opt_num("vmid", vmid)).await?;
        let n = lenient::value_to_u64(&v).ok_or_else(|| PveError::Decode {
            path: path.into(),
            message: format!("expected a vmid, got {v}"),
        })?;
        u32::try_from(n).map_err(|_| PveError::Decode {
            path: path.into(),
            message: format!("vmid {n} out of range"),
        })
    }

    /// `GET /nodes/{node}/storage[?content=..]`
    pub async fn storage_list(
        &self,
        node: &str,
        content: Option<&str>,
    ) -> Result<Vec<StorageEntry>, PveError> {
        self.get(
            &format!("/nodes/{}/storage", seg(node)),
            Params::new().opt_str("content", content),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_decode_by_type() {
        let v: Value = serde_json::from_str(
            r#"[
            {"id":"qemu/9000","vmid":9000,"node":"pve1","type":"qemu","status":"stopped","name":"tpl","template":1,"maxmem":2147483648,"tags":"lab;base"},
            {"id":"qemu/101","vmid":"101","node":"pve2","type":"qemu","status":"unknown","lock":"clone","pool":"p1"},
            {"id":"node/pve1","node":"pve1","type":"node","status":"online","cpu":0.1,"maxcpu":8,"mem":"100","maxmem":1000},
            {"id":"storage/pve1/local-lvm","storage":"local-lvm","node":"pve1","type":"storage","plugintype":"lvmthin","status":"available","shared":0,"content":"images,rootdir"},
            {"id":"/pool/p1","pool":"p1","type":"pool"}
        ]"#,
        )
        .unwrap();
        let Value::Array(items) = v else { panic!() };
        let r: Vec<ClusterResource> = items
            .into_iter()
            .map(|v| ClusterResource::from_value("/x", v).unwrap())
            .collect();
        match &r[0] {
            ClusterResource::Vm(vm) => {
                assert_eq!(vm.vmid, 9000);
                assert!(vm.template);
                assert_eq!(vm.tag_list(), ["lab", "base"]);
            }
            o => panic!("{o:?}"),
        }
        match &r[1] {
            ClusterResource::Vm(vm) => {
                assert_eq!(vm.vmid, 101);
                assert!(!vm.template);
                assert_eq!(vm.name, None);
                assert_eq!(vm.lock.as_deref(), Some("clone"));
                assert_eq!(vm.pool.as_deref(), Some("p1"));
            }
            o => panic!("{o:?}"),
        }
        assert!(matches!(&r[2], ClusterResource::Node(n) if n.mem == Some(100)));
        assert!(matches!(&r[3], ClusterResource::Storage(s) if !s.shared));
        assert!(matches!(&r[4], ClusterResource::Other(_)));
    }

    #[test]
    fn node_status_loadavg_strings() {
        let s: NodeStatus = serde_json::from_str(
            r#"{"cpu":0.05,"loadavg":["0.12","0.10","0.09"],"memory":{"total":100,"used":"40","free":60},
                "cpuinfo":{"cpus":8,"model":"x"},"uptime":1000,"pveversion":"pve-manager/8.2.4/abc"}"#,
        )
        .unwrap();
        assert_eq!(s.loadavg, [0.12, 0.10, 0.09]);
        assert_eq!(s.memory.unwrap().used, Some(40));
    }

    #[test]
    fn storage_content_check() {
        let s: StorageEntry = serde_json::from_str(
            r#"{"storage":"local","type":"dir","content":"iso,vztmpl,images","enabled":1,"active":"1","shared":0}"#,
        )
        .unwrap();
        assert!(s.supports("images"));
        assert!(!s.supports("rootdir"));
        assert!(s.enabled && s.active && !s.shared);
    }
}
