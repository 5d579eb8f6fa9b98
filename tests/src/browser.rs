//! A real headless Chromium for tests, driven over the W3C WebDriver protocol: `chromedriver`
//! (Debian's `chromium-driver`) is started on a free port, each [`Browser`] is one session
//! with its own empty profile. The client is the handful of WebDriver calls the dashboard
//! tests need, spoken with `reqwest` (JSON over HTTP; no extra crate).
//!
//! A missing `chromium` or `chromedriver` fails the test with how to install them. When the
//! [`Driver`] is dropped it asks chromedriver to shut down, which closes every browser it
//! started (a panicking test closes no session itself).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

/// The WebDriver element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Chromium's flags that work on this kind of machine (no sandbox as root, no GPU, no
/// background network traffic to hosts the machine cannot reach).
pub const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1360,900",
];

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free local port")
}

fn find(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find(|n| {
            Command::new(n)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|n| (*n).to_owned())
}

/// A running `chromedriver`.
pub struct Driver {
    child: Child,
    base: String,
    chromium: String,
    http: reqwest::Client,
    profiles: tempfile::TempDir,
}

impl Driver {
    /// Starts chromedriver on a free loopback port and waits until it is ready.
    pub async fn start() -> Driver {
        let chromium = find(&["/usr/bin/chromium", "chromium"]).expect(
            "chromium is missing: install it with `apt-get install chromium chromium-driver` (.ci/run does)",
        );
        let driver = find(&["/usr/bin/chromedriver", "chromedriver"]).expect(
            "chromedriver is missing: install it with `apt-get install chromium-driver` (.ci/run does)",
        );
        // reqwest is built without a default TLS provider (the workspace picks ring).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let port = free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let d = Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            chromium,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("http client"),
            profiles: tempfile::tempdir().expect("temp dir for browser profiles"),
        };
        let end = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ready = d
                .http
                .get(format!("{}/status", d.base))
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success());
            if let Some(r) = ready
                && let Ok(v) = r.json::<Value>().await
                && v["value"]["ready"] == json!(true)
            {
                return d;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "chromedriver did not become ready on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A new browser (a WebDriver session) with a fresh, empty profile.
    pub async fn browser(&self) -> Browser {
        let profile = tempfile::tempdir_in(self.profiles.path()).expect("profile dir");
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| (*s).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": self.chromium, "args": args},
        }}});
        let r: Value = self
            .http
            .post(format!("{}/session", self.base))
            .json(&caps)
            .send()
            .await
            .expect("new WebDriver session")
            .json()
            .await
            .expect("session reply");
        let id = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromedriver refused a session: {r}"))
            .to_owned();
        Browser {
            url: format!("{}/session/{id}", self.base),
            http: self.http.clone(),
            _profile: profile,
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // chromedriver's own shutdown closes every session's browser and exits. Asked over
        // a plain socket (Drop cannot await); the driver is killed by its pid if it lingers.
        // Never a signal to a process group by a negative pid: `kill` parses those
        // inconsistently (a negative number can read as a signal), so a typo-sized mistake
        // there reaches far more than this test's processes.
        if let Some(addr) = self.base.strip_prefix("http://")
            && let Ok(mut s) = std::net::TcpStream::connect(addr)
        {
            use std::io::{Read, Write};
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = write!(
                s,
                "GET /shutdown HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            );
            let _ = s.read(&mut [0u8; 256]);
        }
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < end {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser session.
pub struct Browser {
    url: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

/// An element found on the page.
#[derive(Debug, Clone)]
pub struct Element(String);

impl Browser {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("WebDriver request");
        let status = r.status();
        let v: Value = r.json().await.expect("WebDriver reply");
        assert!(status.is_success(), "WebDriver {path}: {status} {v}");
        v["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    pub async fn current_url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The page's HTML as the browser has it now.
    pub async fn source(&self) -> String {
        self.call(reqwest::Method::GET, "/source", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The first element matching a CSS selector, if any.
    pub async fn find(&self, css: &str) -> Option<Element> {
        let r = self
            .http
            .post(format!("{}/element", self.url))
            .json(&json!({"using": "css selector", "value": css}))
            .send()
            .await
            .expect("WebDriver request");
        let ok = r.status().is_success();
        let v: Value = r.json().await.expect("WebDriver reply");
        ok.then(|| Element(v["value"][ELEMENT].as_str().unwrap_or_default().to_owned()))
    }

    /// The element matching `css`, waiting up to 10 s for it (a click that submits a form
    /// returns before the next page has loaded); panics when there is none by then.
    pub async fn get(&self, css: &str) -> Element {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(e) = self.find(css).await {
                return e;
            }
            if std::time::Instant::now() >= end {
                panic!("no element {css} on the page after 10 s");
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    pub async fn click(&self, e: &Element) {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{}/click", e.0),
            Some(json!({})),
        )
        .await;
    }

    pub async fn type_into(&self, e: &Element, text: &str) {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{}/value", e.0),
            Some(json!({"text": text})),
        )
        .await;
    }

    pub async fn text(&self, e: &Element) -> String {
        self.call(
            reqwest::Method::GET,
            &format!("/element/{}/text", e.0),
            None,
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub async fn eval(&self, script: &str, args: Value) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Runs `script` asynchronously: it calls `arguments[arguments.length - 1](value)`.
    pub async fn eval_async(&self, script: &str, args: Value) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/async",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// `fetch(url, {method, body})` from the page (its cookies, its origin); returns the
    /// status and the body text.
    pub async fn fetch(&self, method: &str, url: &str, form: Option<&str>) -> (u16, String) {
        let v = self
            .eval_async(
                "const [method, url, body, done] = arguments;
                 const init = {method, credentials: 'same-origin', redirect: 'manual'};
                 if (body !== null) {
                   init.body = body;
                   init.headers = {'Content-Type': 'application/x-www-form-urlencoded'};
                 }
                 fetch(url, init).then(async r => done([r.status, await r.text()]))
                   .catch(e => done([0, String(e)]));",
                json!([method, url, form]),
            )
            .await;
        (
            v[0].as_u64().unwrap_or(0) as u16,
            v[1].as_str().unwrap_or_default().to_owned(),
        )
    }

    /// The cookies the browser holds for the current page (HttpOnly ones included).
    pub async fn cookies(&self) -> Vec<Value> {
        self.call(reqwest::Method::GET, "/cookie", None)
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine as _;
        let b64 = self.call(reqwest::Method::GET, "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap_or_default())
            .expect("screenshot is base64")
    }

    /// Sets the window size (a taller window for a full-page screenshot).
    pub async fn resize(&self, width: u32, height: u32) {
        self.call(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    /// Ends the session (closes the browser).
    pub async fn close(self) {
        let _ = self.http.delete(&self.url).send().await;
    }
}
