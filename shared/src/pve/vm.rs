//! QEMU VM calls: list, config (with typed accessors and `netN` parsing), status, clone,
//! config updates, power actions, destroy.

use std::collections::BTreeMap;
use std::fmt;

use reqwest::Method;
use serde::Deserialize;
use serde_json::Value;

use super::client::{Params, PveClient, property_pairs, seg};
use super::error::PveError;
use super::lenient;
use super::upid::Upid;

/// One entry of `GET /nodes/{node}/qemu`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct VmListEntry {
    #[serde(deserialize_with = "lenient::u32_")]
    pub vmid: u32,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub name: Option<String>,
    /// `running` or `stopped`.
    #[serde(default)]
    pub status: String,
    #[serde(default, deserialize_with = "lenient::bool_")]
    pub template: bool,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub lock: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub tags: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub maxmem: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub mem: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    pub cpus: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub uptime: Option<u64>,
}

/// `GET /nodes/{node}/qemu/{vmid}/status/current` (the fields labfleet reads).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct VmStatus {
    #[serde(default, deserialize_with = "lenient::opt_u32")]
    pub vmid: Option<u32>,
    /// `running` or `stopped`.
    #[serde(default)]
    pub status: String,
    /// `running`, `paused`, `prelaunch`, ... (only while running).
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub qmpstatus: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "lenient::bool_")]
    pub template: bool,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub lock: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub uptime: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub mem: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub maxmem: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    pub cpus: Option<f64>,
    #[serde(default, deserialize_with = "lenient::opt_f64")]
    pub cpu: Option<f64>,
}

impl VmStatus {
    pub fn is_running(&self) -> bool {
        self.status == "running"
    }
}

/// A VM config as returned by `GET .../config`: every key as received, plus typed accessors.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct VmConfig {
    pub raw: BTreeMap<String, Value>,
}

impl VmConfig {
    /// A key as a string (numbers are rendered as Proxmox would write them).
    pub fn get_str(&self, key: &str) -> Option<String> {
        self.raw.get(key).and_then(lenient::value_to_string)
    }
    pub fn name(&self) -> Option<String> {
        self.get_str("name")
    }
    pub fn description(&self) -> Option<String> {
        self.get_str("description")
    }
    /// The config `lock` property (`clone`, `backup`, ...), if set.
    pub fn lock(&self) -> Option<String> {
        self.get_str("lock").filter(|s| !s.is_empty())
    }
    pub fn template(&self) -> bool {
        self.raw
            .get("template")
            .and_then(lenient::value_to_bool)
            .unwrap_or(false)
    }
    /// `;`-separated tags.
    pub fn tags(&self) -> Vec<String> {
        self.get_str("tags")
            .map(|t| lenient::split_list(&t))
            .unwrap_or_default()
    }
    /// SHA-1 of the config file; pass it back as `digest` to detect concurrent changes.
    pub fn digest(&self) -> Option<String> {
        self.get_str("digest")
    }
    pub fn memory_mib(&self) -> Option<u64> {
        self.raw.get("memory").and_then(|v| match v {
            // Recent versions: property string `2048` or `current=2048`.
            Value::String(s) => {
                let pairs = property_pairs(s);
                pairs
                    .get("current")
                    .and_then(|c| c.parse().ok())
                    .or_else(|| s.parse().ok())
            }
            other => lenient::value_to_u64(other),
        })
    }
    pub fn cores(&self) -> Option<u64> {
        self.raw.get("cores").and_then(lenient::value_to_u64)
    }
    /// Every `netN`, by index, parsed. Unparseable entries are skipped.
    pub fn nets(&self) -> BTreeMap<u8, NetDevice> {
        self.raw
            .iter()
            .filter_map(|(k, v)| {
                let idx: u8 = k.strip_prefix("net")?.parse().ok()?;
                let s = lenient::value_to_string(v)?;
                Some((idx, s.parse().ok()?))
            })
            .collect()
    }
}

/// A `netN` property string: `<model>[=<MAC>],bridge=<br>[,tag=<vid>][,firewall=0|1]...`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDevice {
    /// `virtio`, `e1000`, ...
    pub model: String,
    /// `BC:24:11:..`; `None` makes Proxmox generate a fresh one.
    pub mac: Option<String>,
    pub bridge: Option<String>,
    pub tag: Option<u16>,
    pub firewall: Option<bool>,
    /// Other keys (`rate`, `mtu`, `queues`, `trunks`, `link_down`, ...), as written.
    pub other: BTreeMap<String, String>,
}

const NET_MODELS: &[&str] = &[
    "virtio",
    "e1000",
    "e1000e",
    "vmxnet3",
    "rtl8139",
    "ne2k_pci",
    "ne2k_isa",
    "pcnet",
    "i82551",
    "i82557b",
    "i82559er",
    "e1000-82540em",
    "e1000-82544gc",
    "e1000-82545em",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid net device {input:?}: {reason}")]
pub struct NetDeviceParseError {
    pub input: String,
    pub reason: String,
}

impl std::str::FromStr for NetDevice {
    type Err = NetDeviceParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| NetDeviceParseError {
            input: s.to_owned(),
            reason,
        };
        let mut model = None;
        let mut mac = None;
        let mut dev = NetDevice {
            model: String::new(),
            mac: None,
            bridge: None,
            tag: None,
            firewall: None,
            other: BTreeMap::new(),
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = match part.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (part, None),
            };
            if NET_MODELS.contains(&k) {
                model = Some(k.to_owned());
                mac = v.map(str::to_owned);
                continue;
            }
            let v = v.unwrap_or("");
            match k {
                "model" => model = Some(v.to_owned()),
                "macaddr" => mac = Some(v.to_owned()),
                "bridge" => dev.bridge = Some(v.to_owned()),
                "tag" => {
                    let t: u16 = v.parse().map_err(|_| err(format!("bad tag {v:?}")))?;
                    if !(1..=4094).contains(&t) {
                        return Err(err(format!("tag {t} out of range 1..4094")));
                    }
                    dev.tag = Some(t);
                }
                "firewall" => {
                    dev.firewall = Some(match v {
                        "1" => true,
                        "0" => false,
                        _ => return Err(err(format!("bad firewall flag {v:?}"))),
                    })
                }
                _ => {
                    dev.other.insert(k.to_owned(), v.to_owned());
                }
            }
        }
        dev.model = model.ok_or_else(|| err("no model".into()))?;
        dev.mac = mac.filter(|m| !m.is_empty());
        Ok(dev)
    }
}

impl fmt::Display for NetDevice {
    /// Proxmox's canonical order: `model=MAC` first, then the other keys alphabetically.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.mac {
            Some(mac) => write!(f, "{}={mac}", self.model)?,
            None => f.write_str(&self.model)?,
        }
        let mut rest: BTreeMap<&str, String> = self
            .other
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        if let Some(b) = &self.bridge {
            rest.insert("bridge", b.clone());
        }
        if let Some(t) = self.tag {
            rest.insert("tag", t.to_string());
        }
        if let Some(fw) = self.firewall {
            rest.insert("firewall", if fw { "1" } else { "0" }.to_owned());
        }
        for (k, v) in rest {
            write!(f, ",{k}={v}")?;
        }
        Ok(())
    }
}

/// Parameters of `POST /nodes/{node}/qemu/{vmid}/clone`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CloneParams {
    pub newid: u32,
    pub name: Option<String>,
    pub description: Option<String>,
    /// The pool must exist (else 403).
    pub pool: Option<String>,
    /// Another node; only when every source disk is on shared storage.
    pub target: Option<String>,
    /// `None`: Proxmox's default (linked for templates, full otherwise).
    pub full: Option<bool>,
    /// Full clones only.
    pub storage: Option<String>,
}

/// A config change: keys to set, keys to delete, and the digest the change is based on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigUpdate {
    pub set: BTreeMap<String, String>,
    pub delete: Vec<String>,
    /// From [`VmConfig::digest`]; a mismatch fails the update.
    pub digest: Option<String>,
}

impl ConfigUpdate {
    pub fn new() -> Self {
        ConfigUpdate::default()
    }
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.set.insert(key.into(), value.into());
        self
    }
    pub fn set_net(self, index: u8, dev: &NetDevice) -> Self {
        self.set(format!("net{index}"), dev.to_string())
    }
    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.delete.push(key.into());
        self
    }
    pub fn digest(mut self, digest: impl Into<String>) -> Self {
        self.digest = Some(digest.into());
        self
    }
    fn params(&self) -> Params {
        let mut p = Params::new();
        for (k, v) in &self.set {
            p = p.str(k, v.clone());
        }
        p.list("delete", &self.delete)
            .opt_str("digest", self.digest.as_deref())
    }
}

/// Options of `POST .../status/shutdown`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShutdownParams {
    /// Seconds to wait for the guest (Proxmox's default: 60).
    pub timeout: Option<u32>,
    /// Kill the VM after the timeout instead of failing the task.
    pub force_stop: bool,
}

/// Options of `DELETE /nodes/{node}/qemu/{vmid}`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DestroyParams {
    /// Also remove the VM from backup/replication jobs and HA.
    pub purge: bool,
    pub destroy_unreferenced_disks: bool,
    /// Ignore a config `lock` (root@pam with a ticket only).
    pub skiplock: bool,
}

fn vm_path(node: &str, vmid: u32) -> String {
    format!("/nodes/{}/qemu/{vmid}", seg(node))
}

impl PveClient {
    /// `GET /nodes/{node}/qemu`
    pub async fn vm_list(&self, node: &str) -> Result<Vec<VmListEntry>, PveError> {
        self.get(&format!("/nodes/{}/qemu", seg(node)), Params::new())
            .await
    }

    /// `GET /nodes/{node}/qemu/{vmid}/config` (pending changes merged in, as Proxmox does).
    pub async fn vm_config(&self, node: &str, vmid: u32) -> Result<VmConfig, PveError> {
        self.get(&format!("{}/config", vm_path(node, vmid)), Params::new())
            .await
    }

    /// `GET /nodes/{node}/qemu/{vmid}/status/current`
    pub async fn vm_status(&self, node: &str, vmid: u32) -> Result<VmStatus, PveError> {
        self.get(
            &format!("{}/status/current", vm_path(node, vmid)),
            Params::new(),
        )
        .await
    }

    /// `POST /nodes/{node}/qemu/{vmid}/clone` → task `qmclone` on `node` (the source node,
    /// also when `target` is given).
    pub async fn clone_vm(&self, node: &str, vmid: u32, p: &CloneParams) -> Result<Upid, PveError> {
        let params = Params::new()
            .num("newid", p.newid)
            .opt_str("name", p.name.as_deref())
            .opt_str("description", p.description.as_deref())
            .opt_str("pool", p.pool.as_deref())
            .opt_str("target", p.target.as_deref())
            .opt_bool("full", p.full)
            .opt_str("storage", p.storage.as_deref());
        self.call(
            Method::POST,
            &format!("{}/clone", vm_path(node, vmid)),
            params,
        )
        .await
    }

    /// `POST .../config` → task `qmconfig`. Preferred for anything that may take long.
    pub async fn update_config_async(
        &self,
        node: &str,
        vmid: u32,
        update: &ConfigUpdate,
    ) -> Result<Upid, PveError> {
        self.call(
            Method::POST,
            &format!("{}/config", vm_path(node, vmid)),
            update.params(),
        )
        .await
    }

    /// `PUT .../config`: synchronous, returns when the config is written. Blocks an API
    /// worker on the server for up to 10 s on lock contention.
    pub async fn update_config_sync(
        &self,
        node: &str,
        vmid: u32,
        update: &ConfigUpdate,
    ) -> Result<(), PveError> {
        self.call_null(
            Method::PUT,
            &format!("{}/config", vm_path(node, vmid)),
            update.params(),
        )
        .await
    }

    /// `POST .../status/start` → task `qmstart`.
    pub async fn start_vm(&self, node: &str, vmid: u32) -> Result<Upid, PveError> {
        self.call(
            Method::POST,
            &format!("{}/status/start", vm_path(node, vmid)),
            Params::new(),
        )
        .await
    }

    /// `POST .../status/stop` → task `qmstop` (hard stop; stopping a stopped VM is OK).
    pub async fn stop_vm(&self, node: &str, vmid: u32) -> Result<Upid, PveError> {
        self.call(
            Method::POST,
            &format!("{}/status/stop", vm_path(node, vmid)),
            Params::new(),
        )
        .await
    }

    /// `POST .../status/shutdown` → task `qmshutdown`.
    pub async fn shutdown_vm(
        &self,
        node: &str,
        vmid: u32,
        p: &ShutdownParams,
    ) -> Result<Upid, PveError> {
        let params = Params::new()
            .opt_num("timeout", p.timeout)
            .flag("forceStop", p.force_stop);
        self.call(
            Method::POST,
            &format!("{}/status/shutdown", vm_path(node, vmid)),
            params,
        )
        .await
    }

    /// `DELETE /nodes/{node}/qemu/{vmid}` (parameters in the query string) → task `qmdestroy`.
    pub async fn destroy_vm(
        &self,
        node: &str,
        vmid: u32,
        p: &DestroyParams,
    ) -> Result<Upid, PveError> {
        let params = Params::new()
            .flag("purge", p.purge)
            .flag("destroy-unreferenced-disks", p.destroy_unreferenced_disks)
            .flag("skiplock", p.skiplock);
        self.call(Method::DELETE, &vm_path(node, vmid), params)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_device_parse_and_canonical_format() {
        let d: NetDevice = "virtio=BC:24:11:3A:5F:01,bridge=vmbr0,firewall=1,tag=100"
            .parse()
            .unwrap();
        assert_eq!(d.model, "virtio");
        assert_eq!(d.mac.as_deref(), Some("BC:24:11:3A:5F:01"));
        assert_eq!(d.bridge.as_deref(), Some("vmbr0"));
        assert_eq!(d.tag, Some(100));
        assert_eq!(d.firewall, Some(true));
        assert_eq!(
            d.to_string(),
            "virtio=BC:24:11:3A:5F:01,bridge=vmbr0,firewall=1,tag=100"
        );

        let d: NetDevice = "tag=5,bridge=vmbr1,e1000,mtu=1400".parse().unwrap();
        assert_eq!(d.mac, None);
        assert_eq!(d.to_string(), "e1000,bridge=vmbr1,mtu=1400,tag=5");

        let d: NetDevice = "model=virtio,macaddr=AA:BB:CC:DD:EE:FF,bridge=vmbr0"
            .parse()
            .unwrap();
        assert_eq!(d.to_string(), "virtio=AA:BB:CC:DD:EE:FF,bridge=vmbr0");

        assert!("bridge=vmbr0".parse::<NetDevice>().is_err());
        assert!("virtio,tag=0".parse::<NetDevice>().is_err());
        assert!("virtio,tag=4095".parse::<NetDevice>().is_err());
    }

    #[test]
    fn config_accessors() {
        let c: VmConfig = serde_json::from_str(
            r#"{"name":"lab-01","template":1,"cores":2,"memory":"2048","lock":"clone",
                "net0":"virtio=BC:24:11:00:00:01,bridge=vmbr0","net1":"e1000,bridge=vmbr1,tag=10",
                "net2":"garbage","tags":"a;b","digest":"abc123","description":"hello"}"#,
        )
        .unwrap();
        assert_eq!(c.name().as_deref(), Some("lab-01"));
        assert!(c.template());
        assert_eq!(c.cores(), Some(2));
        assert_eq!(c.memory_mib(), Some(2048));
        assert_eq!(c.lock().as_deref(), Some("clone"));
        assert_eq!(c.tags(), ["a", "b"]);
        assert_eq!(c.digest().as_deref(), Some("abc123"));
        let nets = c.nets();
        assert_eq!(nets.len(), 2);
        assert_eq!(nets[&1].tag, Some(10));
        let empty = VmConfig::default();
        assert!(!empty.template());
        assert_eq!(empty.lock(), None);
    }

    #[test]
    fn config_update_params() {
        let u = ConfigUpdate::new()
            .set("description", "x")
            .delete("net1")
            .delete("net2")
            .digest("d1");
        let p = u.params();
        let got: Vec<(String, String)> = p.pairs_for_test();
        assert!(got.contains(&("delete".into(), "net1,net2".into())));
        assert!(got.contains(&("digest".into(), "d1".into())));
        assert!(got.contains(&("description".into(), "x".into())));
    }
}
