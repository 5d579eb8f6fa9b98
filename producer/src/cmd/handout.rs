//! `producer handout ID`: the teacher's handout: each student's VMs and, for users labfleet
//! created, their initial password. Written to a file with mode 0600 (the only place a
//! student's password is ever written), as text, CSV and Markdown.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use shared::jobs::state::Store;
use shared::plan::Plan;
use shared::secret::SecretKey;

use crate::cli::Global;
use crate::cmd::common;
use crate::deploy;
use crate::exit::{Exit, Failure};
use crate::output::Out;

pub async fn run(g: &Global, id: &Option<String>, out: &mut Out) -> Result<Exit, Failure> {
    let id = common::resolve_id(g, id, out)?;
    let store = common::store(g).await?;
    let key = common::secret_key()?.ok_or_else(|| {
        Failure::new(
            Exit::Usage,
            anyhow::anyhow!("the handout needs LABFLEET_SECRET_KEY (the key used at submit)"),
        )
    })?;
    let written = write(&store, &id, &key, &g.data_dir, out).await?;
    if g.json {
        out.json(&serde_json::json!({ "id": id, "handout": written }));
    } else {
        out.line(written.describe());
    }
    Ok(Exit::Ok)
}

/// The two files of a handout: the same table (student, password, VM, VMID, node) as
/// Markdown and as CSV, both mode 0600.
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
            "handout (mode 0600, holds initial passwords): {} (Markdown table), {} (CSV: student,password,vm,vmid,node)",
            self.markdown.display(),
            self.csv.display()
        )
    }
}

pub async fn write(
    store: &Store,
    id: &str,
    key: &SecretKey,
    dir: &Path,
    _out: &mut Out,
) -> Result<Handout, Failure> {
    let Tables { markdown: md, csv } = tables(store, id, key).await?;
    let safe = id.replace(['/', '@'], "_");
    let base = dir.join(format!("handout-{safe}"));
    for (ext, body) in [("md", &md), ("csv", &csv)] {
        let p = base.with_extension(ext);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&p)
            .with_context(|| format!("writing {}", p.display()))?;
        f.write_all(body.as_bytes())?;
    }
    Ok(Handout {
        markdown: base.with_extension("md"),
        csv: base.with_extension("csv"),
        mode: "0600",
    })
}

/// A handout's two tables, in memory (the dashboard serves them as downloads).
pub struct Tables {
    pub markdown: String,
    pub csv: String,
}

/// Builds the handout of deployment `id`: every VM with its student, VMID, node and the
/// student's initial password (derived with `key`) for users labfleet created.
pub async fn tables(store: &Store, id: &str, key: &SecretKey) -> Result<Tables, Failure> {
    let plan: Plan = store
        .plan_json(id)
        .await
        .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?
        .and_then(|s| serde_json::from_str(&s).ok())
        .ok_or_else(|| Failure::new(Exit::Usage, anyhow::anyhow!("no deployment {id:?}")))?;
    let st = deploy::status(store, id).await?;
    let mut md = format!(
        "# Handout: {id}\n\n| student | password | VM | VMID | node |\n|---|---|---|---|---|\n"
    );
    let mut csv = String::from("student,password,vm,vmid,node\n");
    for s in &plan.students {
        let pw = if s.create_user {
            deploy::student_password(key, id, &s.user)
                .expose()
                .to_owned()
        } else {
            "(existing account)".to_owned()
        };
        for v in st.vms.iter().filter(|v| v.user == s.user) {
            let vmid = v.vmid.map(|x| x.to_string()).unwrap_or_default();
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                s.user, pw, v.name, vmid, v.node
            ));
            let row = [s.user.as_str(), &pw, &v.name, &vmid, &v.node];
            csv.push_str(&row.map(csv_field).join(","));
            csv.push('\n');
        }
    }
    Ok(Tables { markdown: md, csv })
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
    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        assert_eq!(super::csv_field("student1@pve"), "student1@pve");
        assert_eq!(super::csv_field("a,b"), "\"a,b\"");
        assert_eq!(super::csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
