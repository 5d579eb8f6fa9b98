//! `producer handout ID`: the teacher's handout: each student's VMs and, for every user
//! labfleet created, their initial password (also for a user another deployment created and
//! this one lists: the password that deployment gave it). Written as Markdown and CSV with
//! mode 0600 (the only place a student's password is ever written), each through a temp
//! file renamed into place, never through a symlink.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use shared::jobs::state::Store;
use shared::jobs::teardown::creator;
use shared::pve::PveClient;
use shared::secret::SecretKey;

use crate::cli::Global;
use crate::cmd::context;
use crate::deploy;
use crate::exit::{Exit, Failure};
use crate::output::Out;

pub async fn run(g: &Global, id: &Option<String>, out: &mut Out) -> Result<Exit, Failure> {
    let id = context::resolve_id(g, id, out)?;
    let store = context::store(g).await?;
    let key = context::secret_key()?.ok_or_else(|| {
        Failure::new(
            Exit::Usage,
            anyhow::anyhow!("the handout needs LABFLEET_SECRET_KEY (the key used at submit)"),
        )
    })?;
    let cfg = context::load_config(g, out)?;
    let pve = deploy::connect_pve(&cfg, Some(&key))?;
    let console = console_base(&cfg, &store, &pve, &id, out).await?;
    let written = write(&store, &pve, &id, &key, &g.data_dir, console.as_deref()).await?;
    if g.json {
        out.json(&serde_json::json!({ "id": id, "handout": written }));
    } else {
        out.line(written.describe());
    }
    Ok(Exit::Ok)
}

/// The console links' base (`https://HOST:PORT`) when the deployment's role may open
/// consoles; otherwise `None`, with a note why.
pub async fn console_base(
    cfg: &shared::config::Config,
    store: &Store,
    pve: &PveClient,
    id: &str,
    out: &mut Out,
) -> Result<Option<String>, Failure> {
    let (_, plan) = deploy::load(store, id).await?;
    if crate::console::role_grants_console(pve, &plan.role).await? {
        Ok(Some(crate::console::base(&cfg.connection().host)))
    } else {
        out.err_line(format!(
            "note: role {:?} does not grant VM.Console: the handout has no console links",
            plan.role
        ));
        Ok(None)
    }
}

/// The two files of a handout: the same table (student, password, account, VM, VMID, node)
/// as Markdown and as CSV, both mode 0600.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Handout {
    pub markdown: PathBuf,
    pub csv: PathBuf,
    /// Always "0600": only the owner may read the students' initial passwords.
    pub mode: &'static str,
}

impl Handout {
    /// One line for people: both paths and their format.
    pub fn describe(&self) -> String {
        format!(
            "handout (mode 0600, holds initial passwords): {} (Markdown table), {} (CSV: student,password,account,vm,vmid,node[,console])",
            self.markdown.display(),
            self.csv.display()
        )
    }
}

/// How a student's account came to be, as the handout says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Account {
    /// labfleet created it for deployment `by` (this one or another that lists the student
    /// too); its initial password is derived from the key and `by`.
    Created { by: String },
    /// It existed before labfleet (another realm, or made by hand): no password to give.
    Existing,
    /// Not on the cluster (yet): its student job has not run.
    Missing,
}

impl Account {
    pub fn of(comment: Option<Option<&str>>) -> Account {
        match comment {
            None => Account::Missing,
            Some(c) => match creator(c) {
                Some(by) => Account::Created { by: by.to_owned() },
                None => Account::Existing,
            },
        }
    }

    fn describe(&self, id: &str) -> String {
        match self {
            Account::Created { by } if by == id => "created by this deployment".into(),
            Account::Created { by } => format!("created by {by}"),
            Account::Existing => "existed before labfleet".into(),
            Account::Missing => "not created yet".into(),
        }
    }
}

/// The handout's file stem: `handout-<name>_<cluster>`, every character of both kept (a
/// dot in a cluster name is no extension), with path separators replaced.
pub fn stem(id: &str) -> String {
    let safe: String = id
        .chars()
        .map(|c| {
            if matches!(c, '/' | '\\' | '@') || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    format!("handout-{safe}")
}

pub async fn write(
    store: &Store,
    pve: &PveClient,
    id: &str,
    key: &SecretKey,
    dir: &Path,
    console: Option<&str>,
) -> Result<Handout, Failure> {
    let accounts = accounts_on_cluster(pve).await?;
    let Tables { markdown: md, csv } = tables(store, id, key, &accounts, console).await?;
    let base = stem(id);
    let markdown = dir.join(format!("{base}.md"));
    let csv_path = dir.join(format!("{base}.csv"));
    write_private(&markdown, md.as_bytes())?;
    write_private(&csv_path, csv.as_bytes())?;
    Ok(Handout {
        markdown,
        csv: csv_path,
        mode: "0600",
    })
}

/// Every account on the cluster with its comment (who made it): what Proxmox says.
pub async fn accounts_on_cluster(pve: &PveClient) -> Result<Accounts, Failure> {
    Ok(pve
        .users()
        .await
        .map_err(|e| deploy::DeployError::proxmox("reading the students' accounts", e))?
        .into_iter()
        .map(|u| (u.userid, u.comment))
        .collect())
}

/// The accounts of a deployment's students as Redis recorded them when labfleet made them
/// (for the dashboard, which never talks to Proxmox): a student whose creator is recorded
/// is labfleet's; any other is reported as existing before labfleet.
pub async fn accounts_in_redis(store: &Store, id: &str) -> Result<Accounts, Failure> {
    let (_, plan) = deploy::load(store, id).await?;
    let users: Vec<&str> = plan.students.iter().map(|s| s.user.as_str()).collect();
    let made = store
        .creators(&plan.cluster, &users)
        .await
        .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?;
    Ok(users
        .into_iter()
        .map(|u| {
            let comment = made.get(u).map(|by| shared::jobs::deployment_marker(by));
            (u.to_owned(), comment)
        })
        .collect())
}

/// Account -> its comment, for [`Account::of`].
pub type Accounts = BTreeMap<String, Option<String>>;

/// A handout's two tables, in memory (the dashboard serves them as downloads).
pub struct Tables {
    pub markdown: String,
    pub csv: String,
}

/// Builds the handout of deployment `id`: every VM with its student, VMID, node, account and
/// the initial password of every account labfleet made (derived with `key` for the
/// deployment that made it), from `accounts`; with `console` (`https://HOST:PORT`), a last
/// column with each VM's noVNC console link.
pub async fn tables(
    store: &Store,
    id: &str,
    key: &SecretKey,
    accounts: &Accounts,
    console: Option<&str>,
) -> Result<Tables, Failure> {
    let (_, plan) = deploy::load(store, id).await?;
    let st = deploy::status(store, id).await?;
    let (md_col, md_sep, csv_col) = match console {
        Some(_) => (" console |", "---|", ",console"),
        None => ("", "", ""),
    };
    let mut md = format!(
        "# Handout: {id}\n\n| student | password | account | VM | VMID | node |{md_col}\n|---|---|---|---|---|---|{md_sep}\n"
    );
    let mut csv = format!("student,password,account,vm,vmid,node{csv_col}\n");
    for s in &plan.students {
        let account = Account::of(accounts.get(&s.user).map(Option::as_deref));
        let pw = match &account {
            Account::Created { by } => deploy::student_password(key, by, &s.user)
                .expose()
                .to_owned(),
            Account::Existing => "(existing account)".to_owned(),
            Account::Missing => "(not created yet)".to_owned(),
        };
        let how = account.describe(id);
        for v in st.vms.iter().filter(|v| v.user == s.user) {
            let vmid = v.vmid.map(|x| x.to_string()).unwrap_or_default();
            let link = match (console, v.vmid) {
                (Some(b), Some(n)) => Some(crate::console::link(b, n, &v.node)),
                (Some(_), None) => Some(String::new()),
                (None, _) => None,
            };
            let md_link = link.as_ref().map(|l| format!(" {l} |")).unwrap_or_default();
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |{md_link}\n",
                s.user, pw, how, v.name, vmid, v.node
            ));
            let mut row = vec![s.user.as_str(), &pw, &how, &v.name, &vmid, &v.node];
            if let Some(l) = &link {
                row.push(l);
            }
            let fields: Vec<String> = row.into_iter().map(csv_field).collect();
            csv.push_str(&fields.join(","));
            csv.push('\n');
        }
    }
    Ok(Tables { markdown: md, csv })
}

/// Writes `body` to `path` with mode 0600 whatever was there before: into a new temp file
/// beside it (created exclusively with `O_EXCL`, which never follows a symlink, and 0600
/// from the start), then renamed over `path` (a symlink at `path` is replaced, not followed).
pub fn write_private(path: &Path, body: &[u8]) -> Result<(), Failure> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let result = (|| -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(body)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all().ok();
        std::fs::rename(&tmp, path)
            .with_context(|| format!("moving the handout into place at {}", path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| Failure::new(Exit::Usage, e))
}

/// One CSV field (RFC 4180): quoted when it holds a comma, a quote or a line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_file_name_keeps_the_whole_cluster_and_deployment_name() {
        assert_eq!(super::stem("net.lab@pve.lab"), "handout-net.lab_pve.lab");
        assert_ne!(super::stem("lab@pve.a"), super::stem("lab@pve.b"));
        assert_eq!(super::stem("a/b@c"), "handout-a_b_c");
    }

    #[test]
    fn a_handout_replaces_a_symlink_and_a_readable_file_with_a_0600_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere.txt");
        std::fs::write(&target, "untouched").unwrap();
        let link = dir.path().join("handout-x.md");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        super::write_private(&link, b"secret table").unwrap();
        assert_eq!(
            std::fs::read_to_string(&target).unwrap(),
            "untouched",
            "the symlink is not followed"
        );
        let meta = std::fs::symlink_metadata(&link).unwrap();
        assert!(
            meta.file_type().is_file(),
            "the link was replaced by a file"
        );
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let old = dir.path().join("handout-y.csv");
        std::fs::write(&old, "old").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        super::write_private(&old, b"new").unwrap();
        assert_eq!(
            std::fs::metadata(&old).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "new");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "no temp file left behind");
    }

    #[test]
    fn accounts_are_told_apart_by_their_comment() {
        use super::Account;
        assert_eq!(
            Account::of(Some(Some("labfleet deployment=a@lab"))),
            Account::Created { by: "a@lab".into() }
        );
        assert_eq!(Account::of(Some(Some("made by hand"))), Account::Existing);
        assert_eq!(Account::of(Some(None)), Account::Existing);
        assert_eq!(Account::of(None), Account::Missing);
    }

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        assert_eq!(super::csv_field("student1@pve"), "student1@pve");
        assert_eq!(super::csv_field("a,b"), "\"a,b\"");
        assert_eq!(super::csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
