//! The dashboard (`producer serve`, run as the real binary) in a real headless Chromium, over
//! a real redis-server, `worker` processes and the simulator over HTTPS: live progress
//! without a reload, a permanent Proxmox error shown, fixed and retried from the page,
//! teardown behind its confirmation, what a viewer may not do, a wrong token and missing
//! CSRF tokens refused; and without a browser: the exposed-address refusal, the heartbeats
//! (`producer workers`), and 50 live viewers sharing one Redis reader.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::pipeline::Lab;
use labfleet_tests::bins::{bin, root};
use labfleet_tests::browser::{Browser, Driver};
use labfleet_tests::fleet::{Fleet, WorkerOpts};
use labfleet_tests::wait::wait_for;
use serde_json::{Value, json};
use shared::jobs::state::Store;

const TWO_MACHINES: &str = "name: web-lab\nmachines:\n  - {device_type: linux, name: student-pc, template_node: pve1, template_vmid: 100, networks: [{bridge: vmbr0}, {bridge: hq.100}]}\n  - {device_type: router, name: gw, template_node: pve1, template_vmid: 120, networks: [{bridge: vmbr0}, {bridge: hq}]}\n";
const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
const VIEWER_TOKEN: &str = "viewer-token-0123456789abcdef";

/// What the dashboard's tests add to `it::pipeline`'s lab (the same caps and leases).
impl Lab {
    async fn web(users: &[&str], time_scale: f64) -> Lab {
        Lab::new(time_scale, users, TWO_MACHINES).await
    }

    fn fleet(&self) -> Fleet {
        self.0.fleet(WorkerOpts::default())
    }

    /// The VMs in the simulator that are not templates.
    fn vms(&self) -> Vec<pve_sim::VmInfo> {
        self.sim.vms().into_iter().filter(|v| !v.template).collect()
    }

    /// Runs the producer binary against this lab.
    fn producer(&self, args: &[&str]) -> std::process::Output {
        self.producer_cmd()
            .args(args)
            .env_remove("LABFLEET_WEB_ADMIN_TOKEN")
            .env_remove("LABFLEET_WEB_VIEWER_TOKEN")
            .stdin(Stdio::null())
            .output()
            .expect("running the producer binary")
    }
}

/// `producer serve` as a process; killed on drop.
struct Serve {
    child: Child,
    base: String,
    _tokens: tempfile::TempDir,
}

impl Serve {
    /// Starts `producer serve --listen 127.0.0.1:0` (with both tokens when `tokens`) and
    /// waits for its `dashboard on http://ADDR` line.
    fn start(lab: &Lab, tokens: bool) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(bin("producer"));
        cmd.arg("--data-dir")
            .arg(lab.data.path())
            .arg("--redis")
            .arg(&lab.redis_url)
            .args(["serve", "--listen", "127.0.0.1:0"]);
        if tokens {
            let admin = dir.path().join("admin");
            let viewer = dir.path().join("viewer");
            std::fs::write(&admin, format!("{ADMIN_TOKEN}\n")).unwrap();
            std::fs::write(&viewer, format!("{VIEWER_TOKEN}\n")).unwrap();
            cmd.arg("--admin-token-file")
                .arg(&admin)
                .arg("--viewer-token-file")
                .arg(&viewer);
        }
        let mut child = cmd
            .env("LABFLEET_SECRET_KEY", lab.key.to_base64().expose())
            .env_remove("RUST_LOG")
            .env_remove("LABFLEET_WEB_ADMIN_TOKEN")
            .env_remove("LABFLEET_WEB_VIEWER_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting producer serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("dashboard on ")
            .unwrap_or_else(|| panic!("producer serve printed {line:?}"))
            .to_owned();
        assert!(base.starts_with("http://127.0.0.1:"), "{base}");
        Serve {
            child,
            base,
            _tokens: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The dashboard's path of a deployment.
fn page(id: &str) -> String {
    format!("/d/{}", id.replace('@', "%40"))
}

/// Every grid cell as the browser shows it now: (student, state, VMID text, node text).
async fn cells(b: &Browser) -> Vec<(String, String, String, String)> {
    let v = b
        .eval(
            "return Array.from(document.querySelectorAll('td.cell[id]')).map(td => [
               td.dataset.user, td.dataset.state,
               td.querySelector('.id').textContent, td.querySelector('.nd').textContent]);",
            json!([]),
        )
        .await;
    v.as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let s = |i: usize| c[i].as_str().unwrap_or_default().to_owned();
            (s(0), s(1), s(2), s(3))
        })
        .collect()
}

/// Waits until the page's script has its event stream open.
async fn wait_live(b: &Browser) {
    wait_for(
        Duration::from_secs(20),
        "the page's live updates connected",
        || async {
            b.eval(
                "const r = document.getElementById('deployment'); return r && r.dataset.live;",
                json!([]),
            )
            .await
                == json!("yes")
        },
    )
    .await;
}

/// Marks the loaded page; the mark survives until the next navigation or reload.
async fn mark(b: &Browser, n: u32) {
    b.eval("window.__lfMark = arguments[0];", json!([n])).await;
}

async fn marked(b: &Browser) -> Value {
    b.eval(
        "return window.__lfMark === undefined ? null : window.__lfMark;",
        json!([]),
    )
    .await
}

async fn login(b: &Browser, serve: &Serve, token: &str) {
    b.goto(&serve.url("/login")).await;
    let field = b.get("#token").await;
    b.type_into(&field, token).await;
    b.click(&b.get("#login").await).await;
}

/// Logs in with a good token and waits until the browser has left the login page: the
/// click returns before the form's POST is answered, and a page read (or a `goto`) that
/// comes first still sees the login page, without the session cookie (a CI run asserted on
/// `/login` while the redirect to `/` was on its way).
async fn log_in(b: &Browser, serve: &Serve, token: &str) {
    login(b, serve, token).await;
    wait_for(
        Duration::from_secs(10),
        "the login to lead away from /login",
        || async { !b.current_url().await.ends_with("/login") },
    )
    .await;
}

/// The form's CSRF token on the current page.
async fn csrf_of(b: &Browser) -> String {
    b.eval(
        "return document.querySelector('input[name=csrf]').value;",
        json!([]),
    )
    .await
    .as_str()
    .unwrap_or_default()
    .to_owned()
}

/// Where the test's screenshot goes: `docs/dashboard.png` when refreshing it
/// (`LABFLEET_REFRESH_SCREENSHOT=1`), else the target dir.
fn screenshot_path() -> PathBuf {
    if std::env::var_os("LABFLEET_REFRESH_SCREENSHOT").is_some() {
        root().join("docs/dashboard.png")
    } else {
        labfleet_tests::bins::target_dir().join("dashboard.png")
    }
}

fn save_png(path: &Path, png: &[u8]) {
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "a real PNG ({} bytes)",
        png.len()
    );
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(path, png).unwrap();
    eprintln!(
        "web: screenshot of the deployment page in {}",
        path.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_chromium_live_progress_retry_teardown_and_roles() {
    // anna@ldap does not exist in the simulator's `ldap` realm: her student job fails with
    // Proxmox's permanent error, and with it her two VMs, until the admin creates her.
    let lab = Lab::web(&["student1@pve", "student2@pve", "anna@ldap"], 0.05).await;
    let mut fleet = lab.fleet();
    fleet.spawn();
    fleet.spawn();
    let serve = Serve::start(&lab, true);
    let driver = Driver::start().await;
    let admin = driver.browser().await;

    // Not logged in: the login page; a wrong token is refused and sets no role.
    admin.goto(&serve.url("/")).await;
    assert!(admin.current_url().await.ends_with("/login"));
    login(&admin, &serve, "not-the-token-0123456789").await;
    let err = admin.get("#login-error").await;
    assert_eq!(admin.text(&err).await, "Wrong token.");
    admin.goto(&serve.url("/queue")).await;
    assert!(
        admin.current_url().await.ends_with("/login"),
        "still logged out after a wrong token"
    );
    let (status, _) = admin
        .fetch("POST", "/login", Some("token=also-wrong-0123456789"))
        .await;
    assert_eq!(
        status, 403,
        "a login POST without its CSRF token is refused"
    );

    // The admin logs in: an HttpOnly, SameSite=Strict cookie.
    log_in(&admin, &serve, ADMIN_TOKEN).await;
    assert!(
        admin.current_url().await.ends_with('/'),
        "{}",
        admin.current_url().await
    );
    let cookies = admin.cookies().await;
    let session = cookies
        .iter()
        .find(|c| c["name"] == "lf_session")
        .unwrap_or_else(|| panic!("no session cookie in {cookies:?}"));
    assert_eq!(session["httpOnly"], json!(true), "{session}");
    assert_eq!(session["sameSite"], json!("Strict"), "{session}");

    // Submit, then watch the page: student1's and student2's VMs reach done and anna's
    // fail with Proxmox's message, all without a reload.
    let (id, plan) = lab.submit().await;
    assert_eq!(plan.vms.len(), 6);
    admin.goto(&serve.url(&page(&id))).await;
    wait_live(&admin).await;
    mark(&admin, 1).await;
    let first = cells(&admin).await;
    assert_eq!(first.len(), 6, "{first:?}");
    wait_for(
        Duration::from_secs(90),
        "the page shows 4 VMs done and anna's 2 failed",
        || async {
            let c = cells(&admin).await;
            c.iter().all(|(u, s, _, _)| {
                (u == "anna@ldap") == (s == "failed") && (s == "done" || s == "failed")
            })
        },
    )
    .await;
    assert_eq!(marked(&admin).await, json!(1), "updated live, not reloaded");
    let shown = cells(&admin).await;
    // Every done cell shows the VMID and node that the simulator really has.
    let vms = lab.vms();
    for (_, _, vmid, node) in shown.iter().filter(|c| c.1 == "done") {
        let vmid: u32 = vmid.parse().unwrap_or_else(|_| panic!("VMID {vmid:?}"));
        let v = vms.iter().find(|v| v.vmid == vmid).expect("the VM exists");
        assert_eq!(&v.node, node);
    }
    let failures = admin.text(&admin.get("#failures").await).await;
    assert!(
        failures.contains("anna@ldap does not exist"),
        "Proxmox's message on the page: {failures}"
    );
    let state = admin.text(&admin.get("#state").await).await;
    assert_eq!(state, "failed");
    admin.resize(1360, 1000).await;
    save_png(&screenshot_path(), &admin.screenshot().await);

    // CSRF: a POST without the token, or with a wrong one, is refused and changes nothing.
    let retry = format!("{}/retry", page(&id));
    let (status, body) = admin.fetch("POST", &retry, Some("")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("CSRF"), "{body}");
    let (status, _) = admin.fetch("POST", &retry, Some("csrf=forged")).await;
    assert_eq!(status, 403);
    let anna_job = format!("{id}#0/student/anna@ldap");
    let job = lab.store.queue().job(&anna_job).await.unwrap().unwrap();
    assert_eq!(job.state, "dead", "no retry happened");

    // The admin may download the handout (CSV and Markdown).
    let (status, csv) = admin
        .fetch("GET", &format!("{}/handout.csv", page(&id)), None)
        .await;
    assert_eq!(status, 200, "{csv}");
    assert!(
        csv.starts_with("student,password,account,vm,vmid,node\n"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 7, "{csv}");
    let (status, md) = admin
        .fetch("GET", &format!("{}/handout.md", page(&id)), None)
        .await;
    assert_eq!(status, 200);
    assert!(md.starts_with("# Handout: "), "{md}");

    // A viewer sees the page but no buttons; retry, teardown and the handout are refused
    // even with the viewer's own valid CSRF token.
    let viewer = driver.browser().await;
    log_in(&viewer, &serve, VIEWER_TOKEN).await;
    viewer.goto(&serve.url(&page(&id))).await;
    wait_live(&viewer).await;
    assert_eq!(cells(&viewer).await.len(), 6);
    for absent in ["#retry", "#teardown", "#handout-csv", "#handout-md"] {
        assert!(
            viewer.find(absent).await.is_none(),
            "{absent} shown to a viewer"
        );
    }
    assert!(viewer.find("#viewer-note").await.is_some());
    let viewer_csrf = csrf_of(&viewer).await;
    assert!(!viewer_csrf.is_empty());
    let (status, body) = viewer
        .fetch("POST", &retry, Some(&format!("csrf={viewer_csrf}")))
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("Admins only"), "{body}");
    let (status, _) = viewer
        .fetch("GET", &format!("{}/handout.csv", page(&id)), None)
        .await;
    assert_eq!(status, 403);
    let (status, _) = viewer
        .fetch(
            "POST",
            &format!("{}/teardown", page(&id)),
            Some(&format!("csrf={viewer_csrf}&confirm={id}")),
        )
        .await;
    assert_eq!(status, 403);
    let job = lab.store.queue().job(&anna_job).await.unwrap().unwrap();
    assert_eq!(job.state, "dead", "the viewer retried nothing");
    viewer.close().await;

    // The admin fixes the cause in the simulator and clicks retry: anna's VMs reach done.
    lab.pve()
        .raw_call(
            shared::pve::Method::POST,
            "/access/users",
            &[("userid", "anna@ldap")],
        )
        .await
        .unwrap();
    // The retry form's POST redirects back to the same URL: the click returns before that
    // page is loaded, so the old page is marked first and the new one known by its mark
    // being gone (a CI run marked the old page, and the redirect then dropped the mark).
    mark(&admin, 99).await;
    admin.click(&admin.get("#retry").await).await;
    wait_for(
        Duration::from_secs(20),
        "the retry's redirect loaded the page again",
        || async { marked(&admin).await.is_null() },
    )
    .await;
    assert!(admin.current_url().await.ends_with(&page(&id)));
    wait_live(&admin).await;
    mark(&admin, 2).await;
    wait_for(
        Duration::from_secs(90),
        "the page shows every VM done",
        || async {
            let c = cells(&admin).await;
            c.len() == 6 && c.iter().all(|x| x.1 == "done")
        },
    )
    .await;
    wait_for(
        Duration::from_secs(10),
        "the state word says done",
        || async { admin.text(&admin.get("#state").await).await == "done" },
    )
    .await;
    assert_eq!(
        marked(&admin).await,
        json!(2),
        "reached done without a reload"
    );
    assert!(
        admin
            .text(&admin.get("#failures").await)
            .await
            .lines()
            .count()
            <= 1,
        "no failed VM listed any more"
    );
    assert_eq!(lab.vms().len(), 6);

    // The queue page lists both workers (their heartbeats) and the clone slots.
    admin.goto(&serve.url("/queue")).await;
    let workers = admin.text(&admin.get("#workers").await).await;
    assert!(
        workers.contains("w0") && workers.contains("w1"),
        "{workers}"
    );
    let slots = admin.text(&admin.get("#slots").await).await;
    assert!(slots.contains("clone-node:lab/pve1"), "{slots}");

    // Teardown asks first: a wrong confirmation does nothing; the right one empties the grid.
    admin.goto(&serve.url(&page(&id))).await;
    admin.click(&admin.get("#teardown").await).await;
    let field = admin.get("#confirm").await;
    admin.type_into(&field, "web-lab").await;
    admin.click(&admin.get("#confirm-teardown").await).await;
    // The click returns before the refused form's page is in: wait for its error.
    admin.get("#confirm-error").await;
    assert_eq!(
        lab.vms().len(),
        6,
        "nothing torn down without the confirmation"
    );
    let field = admin.get("#confirm").await;
    admin.type_into(&field, &id).await;
    admin.click(&admin.get("#confirm-teardown").await).await;
    // The form posts and redirects to the deployment page; wait for the navigation.
    let mut url = String::new();
    for _ in 0..50 {
        url = admin.current_url().await;
        if url.ends_with(&page(&id)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        url.ends_with(&page(&id)),
        "after the teardown: {url}\n{}",
        admin.source().await
    );
    wait_live(&admin).await;
    mark(&admin, 3).await;
    wait_for(Duration::from_secs(90), "the grid is empty", || async {
        let c = cells(&admin).await;
        c.len() == 6
            && c.iter()
                .all(|x| x.1 == "removed" && x.2.is_empty() && x.3.is_empty())
    })
    .await;
    assert_eq!(marked(&admin).await, json!(3), "emptied live");
    assert!(
        lab.vms().is_empty(),
        "the simulator holds no VM of the class"
    );

    // No page the browser saw shows a token or the key.
    let src = admin.source().await;
    for secret in [ADMIN_TOKEN, VIEWER_TOKEN, lab.key.to_base64().expose()] {
        assert!(!src.contains(secret));
    }
    admin.close().await;

    // `producer workers` lists both; a worker that stops cleanly removes its record.
    let o = lab.producer(&["workers", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let list: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = list.iter().filter_map(|w| w["name"].as_str()).collect();
    assert_eq!(names, ["w0", "w1"], "{list:?}");
    assert!(
        list.iter().all(|w| w["pid"].as_u64().unwrap_or(0) > 0
            && w["version"] == json!(env!("CARGO_PKG_VERSION")))
    );
    fleet.term("w1");
    assert!(
        fleet
            .wait_exit("w1", Duration::from_secs(20))
            .await
            .is_some()
    );
    let o = lab.producer(&["workers", "--json"]);
    let list: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = list.iter().filter_map(|w| w["name"].as_str()).collect();
    assert_eq!(names, ["w0"], "{list:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_address_without_an_admin_token_is_refused_at_start() {
    for (env, what) in [
        (None, "no token"),
        (Some(VIEWER_TOKEN), "a viewer token only"),
    ] {
        let mut cmd = Command::new(bin("producer"));
        cmd.args([
            "--redis",
            "redis://127.0.0.1:1",
            "serve",
            "--listen",
            "0.0.0.0:0",
        ])
        .env_remove("RUST_LOG")
        .env_remove("LABFLEET_WEB_ADMIN_TOKEN")
        .env_remove("LABFLEET_WEB_VIEWER_TOKEN")
        .stdin(Stdio::null());
        if let Some(t) = env {
            cmd.env("LABFLEET_WEB_VIEWER_TOKEN", t);
        }
        let o = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{what}: {err}");
        assert!(
            err.contains("without an admin token") && err.contains("--admin-token-file"),
            "{what}: {err}"
        );
        assert!(o.stdout.is_empty(), "it never announced a dashboard");
    }
}

/// XREAD calls Redis has served so far.
async fn xreads(store: &Store) -> u64 {
    let mut c = store.queue().connection();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .unwrap();
    info.lines()
        .find(|l| l.starts_with("cmdstat_xread:"))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// An SSE viewer: reads the stream until its first `update` event; returns the response
/// (kept open) and that event's data.
async fn viewer(http: &reqwest::Client, url: &str) -> (reqwest::Response, Value) {
    let mut r = http.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut buf = String::new();
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(20), r.chunk())
            .await
            .expect("an update within 20 s")
            .unwrap()
            .expect("the stream stays open");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        if let Some(ev) = buf.split("\n\n").find(|e| e.contains("event: update")) {
            let data: String = ev
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            return (r, serde_json::from_str(&data).unwrap());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_live_viewers_share_one_redis_reader() {
    let lab = Lab::web(&["student1@pve", "student2@pve"], 0.05).await;
    let (id, _) = lab.submit().await;
    let serve = Serve::start(&lab, false);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let url = serve.url(&format!("{}/events", page(&id)));

    // The page itself carries the policy and the script as a file, never inline.
    let r = http.get(serve.url(&page(&id))).send().await.unwrap();
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let html = r.text().await.unwrap();
    assert!(html.contains("<script src=\"/static/app.js\" defer></script>"));
    assert!(!html.contains("<script>"), "no inline script");

    let (one, first) = viewer(&http, &url).await;
    assert_eq!(first["full"], json!(true));
    assert_eq!(first["cells"].as_array().unwrap().len(), 4);
    let window = Duration::from_secs(3);
    let before = xreads(&lab.store).await;
    tokio::time::sleep(window).await;
    let with_one = xreads(&lab.store).await - before;

    let mut many = vec![one];
    let joins: Vec<_> = (0..49).map(|_| viewer(&http, &url)).collect();
    for (r, ev) in futures::future::join_all(joins).await {
        assert_eq!(
            ev["full"],
            json!(true),
            "each viewer starts from the whole grid"
        );
        many.push(r);
    }
    let before = xreads(&lab.store).await;
    tokio::time::sleep(window).await;
    let with_fifty = xreads(&lab.store).await - before;
    eprintln!("web: XREAD calls in {window:?}: {with_one} with 1 viewer, {with_fifty} with 50");
    assert!(with_one >= 3, "the reader polls ({with_one} reads)");
    assert!(
        with_fifty <= with_one + 3,
        "50 viewers cost one reader's reads, not 50 ({with_fifty} vs {with_one})"
    );
    drop(many);
}
