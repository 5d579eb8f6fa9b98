//! The dashboard's HTML, written by hand into one `String` per page: no template engine,
//! no build step, no CDN. Every value from Redis or the plan is escaped ([`esc`]); the
//! pages hold no inline script or style (the Content-Security-Policy forbids them), only
//! the served `/static/app.js` and `/static/app.css`.
//!
//! Pure functions of the view models (`model`) and the session: no I/O here.

use std::fmt::Write as _;

use chrono::Utc;

use super::auth::Session;
use super::model::{Counts, DeploymentRow, DeploymentView, Layout, QueueView, finished};

/// Appends `s` HTML-escaped (text and attribute values alike).
pub fn esc_into(out: &mut String, s: &str) {
    // Most values (names, states, nodes) need no escaping: copy them whole.
    if !s
        .bytes()
        .any(|b| matches!(b, b'&' | b'<' | b'>' | b'"' | b'\''))
    {
        out.push_str(s);
        return;
    }
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    esc_into(&mut o, s);
    o
}

/// A path segment, percent-encoded (deployment ids hold `@`).
pub fn seg(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// The frame of every page: title, navigation, who is logged in.
pub struct Frame<'a> {
    pub title: &'a str,
    pub session: &'a Session,
    /// Whether login is needed at all (tokens given).
    pub tokens: bool,
    /// Seconds after which the page reloads itself (lists without live updates).
    pub refresh: Option<u32>,
}

pub fn page(f: &Frame, body: &str) -> String {
    let mut o = String::with_capacity(body.len() + 2048);
    o.push_str("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    o.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">");
    if let Some(s) = f.refresh {
        let _ = write!(o, "<meta http-equiv=\"refresh\" content=\"{s}\">");
    }
    o.push_str("<title>");
    esc_into(&mut o, f.title);
    o.push_str(" · labfleet</title><link rel=\"stylesheet\" href=\"/static/app.css\">");
    o.push_str("<script src=\"/static/app.js\" defer></script></head><body>");
    o.push_str("<header><a class=\"brand\" href=\"/\">labfleet</a><nav><a href=\"/\">Deployments</a><a href=\"/queue\">Queue</a></nav><span class=\"who\">");
    match f.session.role {
        Some(r) if f.tokens => {
            let _ = write!(
                o,
                "{} <form method=\"post\" action=\"/logout\" class=\"inline\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button type=\"submit\">Log out</button></form>",
                r.as_str(),
                esc(&f.session.csrf)
            );
        }
        Some(r) => {
            let _ = write!(o, "{} (local, no tokens)", r.as_str());
        }
        None => o.push_str("<a href=\"/login\">Log in</a>"),
    }
    o.push_str("</span></header><main>");
    o.push_str(body);
    o.push_str("</main></body></html>\n");
    o
}

pub fn login(csrf: &str, error: Option<&str>) -> String {
    let mut o = String::from("<h1>Log in</h1>");
    if let Some(e) = error {
        o.push_str("<p class=\"error\" id=\"login-error\">");
        esc_into(&mut o, e);
        o.push_str("</p>");
    }
    let _ = write!(
        o,
        "<form method=\"post\" action=\"/login\" class=\"login\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><label>Token <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"current-password\" required autofocus></label> <button type=\"submit\" id=\"login\">Log in</button></form><p class=\"hint\">An admin token may retry, tear down and download handouts; a viewer token sees the pages.</p>",
        esc(csrf)
    );
    o
}

pub fn message(title: &str, text: &str) -> String {
    format!(
        "<h1>{}</h1><p class=\"message\" id=\"message\">{}</p><p><a href=\"/\">Deployments</a></p>",
        esc(title),
        esc(text)
    )
}

fn counts_inline(counts: &Counts) -> String {
    let mut o = String::new();
    for (k, v) in counts {
        let _ = write!(o, "<span class=\"badge s-{0}\">{0} {1}</span> ", esc(k), v);
    }
    o
}

fn elapsed(secs: i64) -> String {
    let s = secs.max(0);
    if s >= 3600 {
        format!("{}h {:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

pub fn deployments(rows: &[DeploymentRow]) -> String {
    let mut o = String::from("<h1>Deployments</h1>");
    if rows.is_empty() {
        o.push_str("<p id=\"empty\">No deployments in this Redis yet (<code>producer submit</code> makes one).</p>");
        return o;
    }
    o.push_str("<table class=\"list\" id=\"deployments\"><thead><tr><th>name</th><th>cluster</th><th>phase</th><th>state</th><th>VMs</th><th>counts</th><th>started</th><th>elapsed</th></tr></thead><tbody>");
    let now = Utc::now();
    for r in rows {
        let end = r.rec.finished.unwrap_or(now);
        let _ = write!(
            o,
            "<tr><td><a href=\"/d/{}\">{}</a></td><td>{}</td><td>{}</td><td class=\"s-{4}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            seg(&r.rec.id),
            esc(&r.rec.name),
            esc(&r.rec.cluster),
            esc(r.rec.phase.as_str()),
            esc(&r.state),
            r.total,
            counts_inline(&r.counts),
            r.rec.created.format("%Y-%m-%d %H:%M:%S UTC"),
            elapsed((end - r.rec.created).num_seconds()),
        );
    }
    o.push_str("</tbody></table>");
    o
}

/// What the deployment page may offer this session.
pub struct Offers {
    pub admin: bool,
    /// Why the handout cannot be served (no key), if so.
    pub handout_missing: Option<&'static str>,
}

fn counts_table(o: &mut String, id: &str, per_node: &std::collections::BTreeMap<String, Counts>) {
    let _ = write!(
        o,
        "<table class=\"counts\" id=\"{id}\"><thead><tr><th>node</th><th>VMs per state</th></tr></thead><tbody>"
    );
    for (node, c) in per_node {
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td></tr>",
            esc(node),
            counts_inline(c)
        );
    }
    o.push_str("</tbody></table>");
}

pub fn deployment(v: &DeploymentView, grid: &Layout, session: &Session, offers: &Offers) -> String {
    let id = &v.rec.id;
    let total = v.cells.len();
    let done = finished(&v.counts);
    // About 200 bytes a cell.
    let mut o = String::with_capacity(4096 + total * 220);
    let _ = write!(
        o,
        "<section id=\"deployment\" data-events=\"/d/{}/events\"><h1>{} <small>on {}</small></h1>",
        seg(id),
        esc(&v.rec.name),
        esc(&v.rec.cluster)
    );
    let _ = write!(
        o,
        "<p class=\"summary\">state <b id=\"state\" class=\"s-{0}\">{0}</b> · phase <span id=\"phase\">{1}</span> · <span id=\"finished\">{2}</span> of <span id=\"total\">{3}</span> VMs finished · started {4}</p>",
        esc(&v.state),
        esc(v.rec.phase.as_str()),
        done,
        total,
        v.rec.created.format("%Y-%m-%d %H:%M:%S UTC"),
    );
    if let Some(w) = &v.schedule_warning {
        let _ = write!(o, "<p class=\"warning schedule\">warning: {}</p>", esc(w));
    }
    let _ = write!(
        o,
        "<progress id=\"bar\" max=\"{}\" value=\"{}\"></progress>",
        total.max(1),
        done
    );
    let _ = write!(
        o,
        "<p id=\"counts\" class=\"counts\">{}</p>",
        counts_inline(&v.counts)
    );
    counts_table(&mut o, "per-node", &v.per_node);

    actions(&mut o, v, session, offers);

    for f in &v.setup_failures {
        o.push_str("<p class=\"error setup\">set-up failed: ");
        esc_into(&mut o, f);
        o.push_str("</p>");
    }

    grid_table(&mut o, v, grid);
    // Failed VMs with Proxmox's message.
    o.push_str("<h2>Failed VMs</h2><table class=\"list\" id=\"failures\"><thead><tr><th>VM</th><th>student</th><th>VMID</th><th>node</th><th>error</th></tr></thead><tbody>");
    for c in v.cells.iter().filter(|c| c.state == "failed") {
        let vm = &v.plan.vms[c.i];
        let _ = write!(
            o,
            "<tr id=\"f-{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"error\">{}</td></tr>",
            c.i,
            esc(&vm.name),
            esc(&vm.user),
            c.vmid.map(|x| x.to_string()).unwrap_or_default(),
            esc(&c.node),
            esc(c.error.as_deref().unwrap_or(""))
        );
    }
    o.push_str("</tbody></table>");

    o.push_str("</section>");
    o
}

/// The retry, teardown and handout actions an admin is offered (a note for viewers).
fn actions(o: &mut String, v: &DeploymentView, session: &Session, offers: &Offers) {
    let id = &v.rec.id;
    o.push_str("<div class=\"actions\">");
    if offers.admin {
        let csrf = esc(&session.csrf);
        let failed = v.counts.get("failed").copied().unwrap_or(0);
        let hidden = if failed > 0 || v.dead_jobs > 0 {
            ""
        } else {
            " hidden"
        };
        let _ = write!(
            o,
            "<form method=\"post\" action=\"/d/{}/retry\" id=\"retry-form\"{hidden}><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><button type=\"submit\" id=\"retry\">Retry the failed parts</button></form>",
            seg(id)
        );
        if v.rec.phase == shared::jobs::state::Phase::Active {
            let _ = write!(
                o,
                "<a class=\"button danger\" id=\"teardown\" href=\"/d/{}/teardown\">Tear down…</a>",
                seg(id)
            );
        }
        match offers.handout_missing {
            None => {
                let _ = write!(
                    o,
                    "<span class=\"handout\">Handout (holds initial passwords): <a id=\"handout-csv\" href=\"/d/{0}/handout.csv\" download>CSV</a> · <a id=\"handout-md\" href=\"/d/{0}/handout.md\" download>Markdown</a></span>",
                    seg(id)
                );
            }
            Some(why) => {
                let _ = write!(
                    o,
                    "<span class=\"handout muted\" id=\"handout-missing\">Handout: {}</span>",
                    esc(why)
                );
            }
        }
    } else {
        o.push_str("<span class=\"muted\" id=\"viewer-note\">Viewers see the progress; an admin token is needed to retry, tear down or download the handout.</span>");
    }
    o.push_str("</div>");
}

/// The grid: a row per student, a cell per machine with its state, VMID and node.
fn grid_table(o: &mut String, v: &DeploymentView, grid: &Layout) {
    o.push_str(
        "<h2>Students × machines</h2><table class=\"grid\" id=\"grid\"><thead><tr><th>student</th>",
    );
    for m in &grid.machines {
        o.push_str("<th>");
        esc_into(o, m);
        o.push_str("</th>");
    }
    o.push_str("</tr></thead><tbody>");
    for (r, user) in grid.students.iter().enumerate() {
        o.push_str("<tr><th>");
        esc_into(o, user);
        o.push_str("</th>");
        for c in 0..grid.machines.len() {
            let Some(i) = grid.at.get(&(r, c)) else {
                o.push_str("<td class=\"cell none\"></td>");
                continue;
            };
            let cell = &v.cells[*i];
            let vm = &v.plan.vms[*i];
            let _ = write!(
                o,
                "<td id=\"vm-{}\" class=\"cell s-{}\" data-state=\"{1}\" data-name=\"",
                i,
                esc(&cell.state)
            );
            esc_into(o, &vm.name);
            o.push_str("\" data-user=\"");
            esc_into(o, &vm.user);
            o.push_str("\" title=\"");
            esc_into(o, cell.error.as_deref().unwrap_or(&vm.name));
            let _ = write!(
                o,
                "\"><b class=\"st\">{}</b> <span class=\"id\">",
                esc(&cell.state)
            );
            if let Some(x) = cell.vmid {
                let _ = write!(o, "{x}");
            }
            o.push_str("</span> <span class=\"nd\">");
            if cell.state != "removed" {
                esc_into(o, &cell.node);
            }
            o.push_str("</span></td>");
        }
        o.push_str("</tr>");
    }
    o.push_str("</tbody></table>");
}

pub fn teardown_confirm(id: &str, vms: usize, csrf: &str, error: Option<&str>) -> String {
    let mut o = format!(
        "<h1>Tear down {}?</h1><p>This cancels the deployment's queued jobs and destroys its {} VMs, the pools and users it created and its private bridges. It cannot be undone.</p>",
        esc(id),
        vms
    );
    if let Some(e) = error {
        let _ = write!(o, "<p class=\"error\" id=\"confirm-error\">{}</p>", esc(e));
    }
    let _ = write!(
        o,
        "<form method=\"post\" action=\"/d/{0}/teardown\"><input type=\"hidden\" name=\"csrf\" value=\"{1}\"><label>Type <code>{2}</code> to confirm: <input name=\"confirm\" id=\"confirm\" autocomplete=\"off\" required></label> <button type=\"submit\" class=\"danger\" id=\"confirm-teardown\">Tear down</button> <a href=\"/d/{0}\">Cancel</a></form>",
        seg(id),
        esc(csrf),
        esc(id)
    );
    o
}

pub fn queue(v: &QueueView) -> String {
    let s = &v.stats;
    let mut o = String::from("<h1>Queue</h1><table class=\"kv\" id=\"queue\"><tbody>");
    for (k, n) in [
        ("ready", s.ready),
        ("scheduled", s.scheduled),
        ("in flight", s.in_flight),
        ("dead", s.dead),
        ("gated", s.gated),
        ("waiting for a slot", s.waiting_for_slot),
        ("done (kept)", s.done),
    ] {
        let _ = write!(o, "<tr><th>{k}</th><td>{n}</td></tr>");
    }
    let _ = write!(
        o,
        "<tr><th>oldest ready</th><td id=\"oldest\">{}</td></tr></tbody></table>",
        s.oldest_ready_age
            .map(|d| format!("{:.1} s", d.as_secs_f64()))
            .unwrap_or_else(|| "none ready".to_owned())
    );
    o.push_str("<h2>Clone slots (held / cap)</h2><table class=\"list\" id=\"slots\"><thead><tr><th>key</th><th>held</th><th>cap</th><th>waiting</th><th>most at once</th></tr></thead><tbody>");
    for (name, st) in &v.slots {
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(name),
            st.held,
            st.cap
                .map(|c| c.to_string())
                .unwrap_or_else(|| "none".into()),
            st.waiting,
            st.high_water
        );
    }
    o.push_str("</tbody></table><h2>Workers</h2>");
    if v.workers.is_empty() {
        o.push_str("<p id=\"no-workers\">No worker has beaten in the last seconds.</p>");
        return o;
    }
    o.push_str("<table class=\"list\" id=\"workers\"><thead><tr><th>name</th><th>host</th><th>version</th><th>pid</th><th>started</th><th>last seen</th><th>jobs in flight</th></tr></thead><tbody>");
    let now = Utc::now();
    for w in &v.workers {
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ago</td><td>{} of {}</td></tr>",
            esc(&w.name),
            esc(&w.host),
            esc(&w.version),
            w.pid,
            w.started.format("%Y-%m-%d %H:%M:%S UTC"),
            elapsed((now - w.last_seen).num_seconds()),
            w.in_flight,
            w.concurrency
        );
    }
    o.push_str("</tbody></table>");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"y\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;y&quot;"
        );
        assert_eq!(seg("demo-lab@lab"), "demo-lab%40lab");
        assert_eq!(seg("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn elapsed_reads_like_a_clock() {
        assert_eq!(elapsed(5), "5s");
        assert_eq!(elapsed(125), "2m 05s");
        assert_eq!(elapsed(3725), "1h 02m");
    }
}
