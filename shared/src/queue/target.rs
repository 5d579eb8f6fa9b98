//! `RedisTarget`: what a Redis URL names. Either one server (`redis://`, `rediss://`, handed to
//! the redis crate as it is) or a master known to Redis Sentinel:
//! `redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER[/DB]` (TLS to the
//! sentinels and the data nodes: `rediss+sentinel://`). The user and password are used for
//! the sentinels and for the data nodes alike. Parsing does no I/O; `redacted` is what every
//! message shows.

use percent_encoding::percent_decode_str;

/// A Redis URL, parsed.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server; the URL as given (`redis://`, `rediss://`, `unix://`).
    Direct(String),
    /// A master named by Redis Sentinel.
    Sentinel(SentinelTarget),
}

/// A `redis+sentinel://` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelTarget {
    /// The sentinels, in the order given (`host`, `port`).
    pub sentinels: Vec<(String, u16)>,
    /// The master's name in the sentinels' configuration (`sentinel monitor NAME ...`).
    pub master: String,
    /// Database number on the data nodes.
    pub db: i64,
    /// ACL user for sentinels and data nodes, if any.
    pub username: Option<String>,
    /// Password for sentinels and data nodes, if any. Never printed.
    pub password: Option<String>,
    /// TLS to sentinels and data nodes (`rediss+sentinel://`).
    pub tls: bool,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl std::fmt::Debug for SentinelTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Why a Sentinel URL was refused (the message never holds the password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Redis Sentinel URL: {0}")]
pub struct TargetError(pub &'static str);

const SENTINEL_SCHEMES: [(&str, bool); 2] =
    [("redis+sentinel://", false), ("rediss+sentinel://", true)];

impl RedisTarget {
    /// Parses a URL; a scheme other than the two Sentinel ones is passed on as `Direct`
    /// (the redis crate checks it when connecting).
    pub fn parse(url: &str) -> Result<Self, TargetError> {
        let Some((rest, tls)) = SENTINEL_SCHEMES
            .iter()
            .find_map(|(scheme, tls)| strip_prefix_ignore_case(url, scheme).map(|r| (r, *tls)))
        else {
            return Ok(RedisTarget::Direct(url.to_owned()));
        };
        SentinelTarget::parse(rest, tls).map(RedisTarget::Sentinel)
    }

    /// The URL for display, password replaced by `***`.
    pub fn redacted(&self) -> String {
        match self {
            RedisTarget::Direct(u) => crate::redact_url(u),
            RedisTarget::Sentinel(s) => s.redacted(),
        }
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

fn decode(s: &str) -> Result<String, TargetError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| TargetError("user or password is not UTF-8 once percent-decoded"))
}

impl SentinelTarget {
    /// Parses what follows the scheme: `[[USER]:PASSWORD@]HOST:PORT[,...]/MASTER[/DB]`.
    fn parse(rest: &str, tls: bool) -> Result<Self, TargetError> {
        let (authority, path) = rest
            .split_once('/')
            .ok_or(TargetError("no master name (expected .../MASTER[/DB])"))?;
        // The password may hold '@' only percent-encoded; the last '@' ends the user info.
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once(':') {
                Some((user, pw)) => (
                    (!user.is_empty()).then(|| decode(user)).transpose()?,
                    Some(decode(pw)?),
                ),
                // Without a colon it could be a password written as a user name, which
                // would then be shown: refused (an ACL user needs a password anyway).
                None => {
                    return Err(TargetError(
                        "write the password as :PASSWORD@ or USER:PASSWORD@",
                    ));
                }
            },
        };
        let mut sentinels = Vec::new();
        for h in hosts.split(',') {
            sentinels.push(parse_host_port(h)?);
        }
        let mut parts = path.splitn(2, '/');
        let master = parts.next().unwrap_or_default();
        if master.is_empty() {
            return Err(TargetError("no master name (expected .../MASTER[/DB])"));
        }
        let master = decode(master)?;
        let db = match parts.next().map(|d| d.trim_end_matches('/')) {
            None | Some("") => 0,
            Some(d) => d
                .parse::<i64>()
                .ok()
                .filter(|d| *d >= 0)
                .ok_or(TargetError("the database must be a number (.../MASTER/DB)"))?,
        };
        Ok(SentinelTarget {
            sentinels,
            master,
            db,
            username,
            password,
            tls,
        })
    }

    /// The URL for display, password replaced by `***`.
    pub fn redacted(&self) -> String {
        let scheme = if self.tls {
            "rediss+sentinel"
        } else {
            "redis+sentinel"
        };
        let auth = match (&self.username, &self.password) {
            (None, None) => String::new(),
            (Some(u), None) => format!("{u}@"),
            (u, Some(_)) => format!("{}:***@", u.as_deref().unwrap_or_default()),
        };
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|(h, p)| {
                if h.contains(':') {
                    format!("[{h}]:{p}")
                } else {
                    format!("{h}:{p}")
                }
            })
            .collect();
        format!(
            "{scheme}://{auth}{}/{}/{}",
            hosts.join(","),
            self.master,
            self.db
        )
    }
}

fn parse_host_port(s: &str) -> Result<(String, u16), TargetError> {
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (h, p) = v6
            .split_once(']')
            .ok_or(TargetError("unclosed '[' in a sentinel address"))?;
        (h, p.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err(TargetError("a sentinel address has no host"));
    }
    // Sentinels listen on 26379 unless told otherwise.
    let port = match port {
        None => 26379,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or(TargetError(
                "a sentinel port is not a number from 1 to 65535",
            ))?,
    };
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentinel(url: &str) -> SentinelTarget {
        match RedisTarget::parse(url).unwrap() {
            RedisTarget::Sentinel(s) => s,
            other => panic!("{url} parsed as {other:?}"),
        }
    }

    #[test]
    fn direct_urls_pass_through() {
        assert_eq!(
            RedisTarget::parse("redis://:pw@h:6379/2").unwrap(),
            RedisTarget::Direct("redis://:pw@h:6379/2".into())
        );
    }

    #[test]
    fn sentinel_urls() {
        let s = sentinel("redis+sentinel://:s%40cret@127.0.0.2:26379,[::1]:26380,s3/lf/3");
        assert_eq!(
            s.sentinels,
            vec![
                ("127.0.0.2".to_owned(), 26379),
                ("::1".to_owned(), 26380),
                ("s3".to_owned(), 26379)
            ]
        );
        assert_eq!((s.master.as_str(), s.db, s.tls), ("lf", 3, false));
        assert_eq!(s.password.as_deref(), Some("s@cret"));
        assert_eq!(s.username, None);
        let t = sentinel("REDISS+SENTINEL://app:pw@h:1/m");
        assert!(t.tls);
        assert_eq!(t.username.as_deref(), Some("app"));
        assert_eq!(t.db, 0);
        assert_eq!(sentinel("redis+sentinel://h:1/m/").db, 0);
    }

    #[test]
    fn bad_sentinel_urls_say_why_without_the_password() {
        for (url, why) in [
            ("redis+sentinel://:pw@h:1", "no master name"),
            ("redis+sentinel://:pw@h:1/", "no master name"),
            ("redis+sentinel://:pw@h:x/m", "port"),
            ("redis+sentinel://:pw@h:1,/m", "no host"),
            ("redis+sentinel://:pw@h:1/m/x", "database"),
            ("redis+sentinel://:pw@[::1/m", "unclosed"),
            ("redis+sentinel://pw@h:1/m", ":PASSWORD@"),
        ] {
            let e = RedisTarget::parse(url).unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
            assert!(!e.contains("pw"), "{url}: {e}");
        }
    }

    #[test]
    fn redacted_never_shows_the_password() {
        let s = RedisTarget::parse("redis+sentinel://:s3cret@a:1,b:2/lf/1").unwrap();
        assert_eq!(s.redacted(), "redis+sentinel://:***@a:1,b:2/lf/1");
        assert_eq!(format!("{s:?}"), s.redacted());
        let s = RedisTarget::parse("rediss+sentinel://u:s3cret@a:1/lf").unwrap();
        assert_eq!(s.redacted(), "rediss+sentinel://u:***@a:1/lf/0");
    }
}
