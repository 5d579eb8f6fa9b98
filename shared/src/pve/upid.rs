//! `Upid`: Proxmox's unique task id, `UPID:<node>:<pid>:<pstart>:<starttime>:<type>:<id>:<user>:`.
//!
//! The string is kept as received, so [`Upid`]'s `Display` gives back exactly what the server
//! sent (that is what the task endpoints must be asked with); the fields are parsed for
//! routing (the task must be polled on [`Upid::node`]) and for logs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Upid {
    raw: String,
    node: String,
    pid: u32,
    pstart: u64,
    starttime: i64,
    task_type: String,
    id: String,
    user: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid UPID {input:?}: {reason}")]
pub struct UpidParseError {
    pub input: String,
    pub reason: &'static str,
}

impl Upid {
    /// Builds a UPID from its parts, formatted as the server does (uppercase hex, 8 digits).
    pub fn new(
        node: &str,
        pid: u32,
        pstart: u64,
        starttime: i64,
        task_type: &str,
        id: &str,
        user: &str,
    ) -> Result<Upid, UpidParseError> {
        let raw =
            format!("UPID:{node}:{pid:08X}:{pstart:08X}:{starttime:08X}:{task_type}:{id}:{user}:");
        raw.parse()
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }
    /// The node that runs the task, where its status and log must be read.
    pub fn node(&self) -> &str {
        &self.node
    }
    pub fn pid(&self) -> u32 {
        self.pid
    }
    pub fn pstart(&self) -> u64 {
        self.pstart
    }
    /// Unix seconds (server clock) when the task started.
    pub fn starttime(&self) -> i64 {
        self.starttime
    }
    /// `qmclone`, `qmstart`, `srvreload`, ...
    pub fn task_type(&self) -> &str {
        &self.task_type
    }
    /// The task's object, e.g. the source vmid of a clone; may be empty.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// `user@realm` or `user@realm!tokenid`.
    pub fn user(&self) -> &str {
        &self.user
    }
}

fn hex_field<T: TryFrom<u64>>(
    s: &str,
    input: &str,
    min: usize,
    max: usize,
) -> Result<T, UpidParseError> {
    let err = |reason| UpidParseError {
        input: input.to_owned(),
        reason,
    };
    if s.len() < min || s.len() > max || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(err(
            "pid, pstart and starttime must be 8 (pstart: 8 or 9) hex digits",
        ));
    }
    let v = u64::from_str_radix(s, 16).map_err(|_| err("hex field out of range"))?;
    T::try_from(v).map_err(|_| err("hex field out of range"))
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c == ':' || c == '/' || c.is_whitespace())
}

impl FromStr for Upid {
    type Err = UpidParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| UpidParseError {
            input: s.to_owned(),
            reason,
        };
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 9 || parts[0] != "UPID" {
            return Err(err(
                "expected UPID:<node>:<pid>:<pstart>:<starttime>:<type>:<id>:<user>:",
            ));
        }
        if !parts[8].is_empty() {
            return Err(err("missing trailing colon"));
        }
        let node = parts[1];
        if node.is_empty()
            || !node.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || node.starts_with('-')
            || node.ends_with('-')
        {
            return Err(err("invalid node name"));
        }
        let pid = hex_field(parts[2], s, 8, 8)?;
        let pstart = hex_field(parts[3], s, 8, 9)?;
        let starttime = hex_field(parts[4], s, 8, 8)?;
        if !valid_name(parts[5]) {
            return Err(err("invalid task type"));
        }
        if !parts[6].is_empty() && !valid_name(parts[6]) {
            return Err(err("invalid task id"));
        }
        if !valid_name(parts[7]) {
            return Err(err("invalid user"));
        }
        Ok(Upid {
            raw: s.to_owned(),
            node: node.to_owned(),
            pid,
            pstart,
            starttime,
            task_type: parts[5].to_owned(),
            id: parts[6].to_owned(),
            user: parts[7].to_owned(),
        })
    }
}

impl fmt::Display for Upid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl fmt::Debug for Upid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Upid({})", self.raw)
    }
}

impl Serialize for Upid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.raw)
    }
}

impl<'de> Deserialize<'de> for Upid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_real_examples() {
        let u: Upid = "UPID:proxmox:0035D677:03AB00C3:66DC5987:qmclone:132:root@pam:"
            .parse()
            .unwrap();
        assert_eq!(u.node(), "proxmox");
        assert_eq!(u.pid(), 0x0035D677);
        assert_eq!(u.pstart(), 0x03AB00C3);
        assert_eq!(u.starttime(), 0x66DC5987);
        assert_eq!(u.task_type(), "qmclone");
        assert_eq!(u.id(), "132");
        assert_eq!(u.user(), "root@pam");
        assert_eq!(
            u.to_string(),
            "UPID:proxmox:0035D677:03AB00C3:66DC5987:qmclone:132:root@pam:"
        );

        let t: Upid = "UPID:pve-mp:00000ACD:00006AE8:679A423B:qmclone:112:capmox@pve!capi:"
            .parse()
            .unwrap();
        assert_eq!(t.user(), "capmox@pve!capi");
        assert_eq!(t.node(), "pve-mp");
    }

    #[test]
    fn empty_id_and_nine_digit_pstart() {
        let u: Upid = "UPID:pve1:00001234:1003AB00C:66DC5987:srvreload:networking:root@pam:"
            .parse()
            .unwrap();
        assert_eq!(u.pstart(), 0x1003AB00C);
        let u: Upid = "UPID:pve1:00001234:03AB00C3:66DC5987:vzdump::root@pam:"
            .parse()
            .unwrap();
        assert_eq!(u.id(), "");
    }

    #[test]
    fn new_formats_like_the_server() {
        let u = Upid::new(
            "pve2", 0xACD, 0x6AE8, 0x679A423B, "qmstart", "101", "root@pam",
        )
        .unwrap();
        assert_eq!(
            u.as_str(),
            "UPID:pve2:00000ACD:00006AE8:679A423B:qmstart:101:root@pam:"
        );
        let again: Upid = u.as_str().parse().unwrap();
        assert_eq!(again, u);
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "UPID:",
            "UPID:pve1:0035D677:03AB00C3:66DC5987:qmclone:132:root@pam",
            "UPID:pve1:35D677:03AB00C3:66DC5987:qmclone:132:root@pam:",
            "UPID:pve1:0035D677:03AB00C3:66DC598Z:qmclone:132:root@pam:",
            "UPID:pv_e1:0035D677:03AB00C3:66DC5987:qmclone:132:root@pam:",
            "UPID:pve1:0035D677:03AB00C3:66DC5987::132:root@pam:",
            "UPID:pve1:0035D677:03AB00C3:66DC5987:qmclone:132::",
            "XPID:pve1:0035D677:03AB00C3:66DC5987:qmclone:132:root@pam:",
        ] {
            assert!(bad.parse::<Upid>().is_err(), "{bad}");
        }
    }

    #[test]
    fn serde_as_string() {
        let s = "\"UPID:pve1:0035D677:03AB00C3:66DC5987:qmclone:132:root@pam:\"";
        let u: Upid = serde_json::from_str(s).unwrap();
        assert_eq!(serde_json::to_string(&u).unwrap(), s);
        assert!(serde_json::from_str::<Upid>("\"nope\"").is_err());
    }
}
