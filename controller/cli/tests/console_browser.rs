//! The web console in a real browser: headless Chromium driven through chromedriver
//! (fantoccini), against `poolkeeper run` on the Docker Engine here. A person registers,
//! launches an instance, uploads an index.html, opens the instance's link and sees the page,
//! sees a claim made elsewhere appear Bound without a reload, and releases; an operator scales
//! a pool and sees the grid change without a reload. Screenshots of the main pages go to
//! `target/console-screenshots/`.
//!
//! The figures (first contentful paint of the signed-in page; a claim's Bound state on the page
//! after the engine's binding) are measured with the browser's own timings by the ignored
//! test `console_figures`:
//! `cargo test -p poolkeeper --test console_browser -- --ignored --nocapture console_figures`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them).

#![allow(clippy::unwrap_used)]

mod support;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::*;

const ADMIN: &str = "admin-token-0123456789";
const ALICE: &str = "alice-token-0123456789";

/// chromedriver on a free port, stopped when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn driver() -> Driver {
    for tool in ["chromedriver", "chromium"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success(),
            "{tool} is not installed: apt-get install chromium chromium-driver (.ci/run does)"
        );
    }
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "chromedriver did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Driver { child, url }
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert("browserName".into(), json!("chrome"));
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,1000", "--no-first-run"],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a Chromium session")
}

fn users() -> String {
    let digest = |t: &str| hex::encode(Sha256::digest(t.as_bytes()));
    format!(
        "apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata: {{name: alice}}
spec: {{quota: {{maxClaims: 5}}, tokenSha256: {a}}}
",
        a = digest(ALICE)
    )
}

/// The controller on Docker with its admin token, registration allowed; its API's address.
fn controller(id: &str, warm: u32) -> (Controller, String, tempfile::TempDir) {
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("admin.token");
    std::fs::write(&token, ADMIN).unwrap();
    let flows = repo().join("examples/flows");
    let c = Controller::new(
        id,
        &[
            (
                "pools.yaml",
                pool_yaml("web", warm, 38000, 38049, "").replace(
                    "    files: {mountPath: /srv}",
                    "    env: {LOG_EVERY_MS: \"300\", LOG_LINE: \"tick from the instance\"}\n    files: {mountPath: /srv}",
                ),
            ),
            ("users.yaml", users()),
        ],
        &[
            "--admin-token-file",
            token.to_str().unwrap(),
            "--allow-registration",
            "--flows",
            flows.to_str().unwrap(),
        ],
    );
    let s = c.wait("the pool is warm", T, |s| {
        pool_warm(s, "web") == u64::from(warm)
    });
    let api = s["controller"]["api"].as_str().unwrap().to_owned();
    (c, api, secrets)
}

fn api(addr: &str, method: &str, path: &str, token: &str, body: &Value) -> (u16, Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, text) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, serde_json::from_str(text).unwrap_or(Value::Null))
}

fn shots() -> PathBuf {
    let d = repo().join("target/console-screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn screenshot(b: &Client, name: &str) {
    let png = b.screenshot().await.unwrap();
    std::fs::write(shots().join(format!("{name}.png")), png).unwrap();
}

/// Waits until `script` (a JavaScript expression) is truthy in the page; its value.
async fn until(b: &Client, what: &str, script: &str) -> Value {
    let start = Instant::now();
    loop {
        let v = b
            .execute(&format!("return ({script});"), vec![])
            .await
            .unwrap_or(Value::Null);
        if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) {
            return v;
        }
        if start.elapsed() > T {
            let html = b.source().await.unwrap_or_default();
            panic!("never: {what} ({script})\npage:\n{html}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every control of the page has an accessible name (a label, `aria-label`, or a button's
/// text).
async fn all_labelled(b: &Client, page: &str) {
    let unnamed = b
        .execute(
            "return Array.from(document.querySelectorAll('input:not([type=hidden]), select, textarea, button')) \
               .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') \
                            && !(e.tagName === 'BUTTON' && e.textContent.trim())) \
               .map(e => e.outerHTML);",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(unnamed, json!([]), "controls without a label on {page}");
}

async fn fill(b: &Client, css: &str, text: &str) {
    b.find(Locator::Css(css))
        .await
        .unwrap()
        .send_keys(text)
        .await
        .unwrap();
}

async fn click(b: &Client, css: &str) {
    b.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn text(b: &Client, css: &str) -> String {
    b.find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[test]
fn a_person_and_an_operator_use_the_console_in_chromium() {
    let _g = serial();
    let driver = driver();
    let (c, addr, _secrets) = controller("console-e2e", 2);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let b = browser(&driver).await;
        let base = format!("http://{addr}");

        // Register (the page says how), and land on "My instances".
        b.goto(&format!("{base}/")).await.unwrap();
        until(&b, "the sign-in page", "document.title.startsWith('Sign in')").await;
        screenshot(&b, "signin").await;
        all_labelled(&b, "the sign-in page").await;
        click(&b, "#register-link").await;
        until(&b, "the registration page", "document.title.startsWith('Register')").await;
        fill(&b, "#username", "erin").await;
        fill(&b, "#password", "erin-password-1").await;
        fill(&b, "#confirm", "erin-password-1").await;
        click(&b, "#register-form button[type=submit]").await;
        until(&b, "erin's page", "document.title.startsWith('My instances')").await;
        assert!(text(&b, "#flash").await.contains("Welcome, erin"));
        assert_eq!(text(&b, "#me").await, "erin");

        // Launch for an hour: bound from the warm pool, with a link and the time left.
        b.find(Locator::Css("#ttl-web option[value=\"1h\"]")).await.unwrap().click().await.unwrap();
        click(&b, "#launch-web").await;
        let name = until(
            &b,
            "a Bound claim on the page",
            "(document.querySelector('.claim[data-phase=\"Bound\"]') || {}).dataset?.claim",
        )
        .await;
        let name = name.as_str().unwrap().to_owned();
        assert!(name.starts_with("erin-web-"), "{name}");
        let card = format!(".claim[data-claim=\"{name}\"]");
        until(
            &b,
            "the time left shows",
            &format!("/59m \\d+s left|1h 0m \\d+s left/.test(document.querySelector('{card} .ttl').textContent)"),
        )
        .await;

        // Upload an index.html through the file input, as a person choosing a file does.
        let local = tempfile::tempdir().unwrap();
        let page = local.path().join("index.html");
        std::fs::write(&page, "<h1>hello from the console test</h1>\n").unwrap();
        b.find(Locator::Css(&format!("{card} input[name=\"files\"]")))
            .await
            .unwrap()
            .send_keys(page.to_str().unwrap())
            .await
            .unwrap();
        until(
            &b,
            "the upload's outcome",
            &format!("document.querySelector('{card} [data-result]').textContent.includes('Uploaded 1 file')"),
        )
        .await;
        // Its output, live, once the view is opened.
        click(&b, &format!("{card} details[data-logs] summary")).await;
        until(
            &b,
            "the instance's output shows",
            &format!("document.querySelector('{card} [data-log]').textContent.includes('tick from the instance')"),
        )
        .await;
        // Files dropped on the drop zone go in too (a drop as the browser makes it).
        b.execute(
            &format!(
                "const zone = document.querySelector('{card} [data-drop]'); \
                 const dt = new DataTransfer(); \
                 dt.items.add(new File(['dropped, not chosen'], 'dropped.txt', {{type: 'text/plain'}})); \
                 zone.dispatchEvent(new DragEvent('drop', {{dataTransfer: dt, bubbles: true, cancelable: true}}));"
            ),
            vec![],
        )
        .await
        .unwrap();
        until(
            &b,
            "the dropped file is uploaded",
            &format!("document.querySelector('{card} [data-result]').textContent.includes('Uploaded 1 file')"),
        )
        .await;
        screenshot(&b, "my-instances").await;
        all_labelled(&b, "My instances").await;
        b.set_window_size(390, 844).await.unwrap();
        screenshot(&b, "my-instances-phone").await;
        // At a phone's width nothing overflows the page sideways.
        let wider = b
            .execute(
                "const w = document.documentElement.clientWidth; \
                 return Array.from(document.querySelectorAll('body *')) \
                   .filter(e => !e.closest('.scroll') && e.getBoundingClientRect().right > w + 1) \
                   .map(e => e.tagName + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right));",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(wider, json!([]), "these stick out sideways at 390 px");
        b.set_window_size(1280, 1000).await.unwrap();

        // Open the instance's link: the new tab shows the uploaded page.
        let href = b
            .find(Locator::Css(&format!("{card} [data-field=\"link\"]")))
            .await
            .unwrap()
            .attr("href")
            .await
            .unwrap()
            .unwrap();
        assert!(href.starts_with("http://") && href.contains(":380"), "{href}");
        let console = b.window().await.unwrap();
        click(&b, &format!("{card} [data-field=\"link\"]")).await;
        let start = Instant::now();
        let tab = loop {
            let all = b.windows().await.unwrap();
            if let Some(w) = all.into_iter().find(|w| *w != console) {
                break w;
            }
            assert!(start.elapsed() < T, "the link opened no tab");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        b.switch_to_window(tab).await.unwrap();
        until(
            &b,
            "the instance serves the uploaded page",
            "document.body && document.body.innerText.includes('hello from the console test')",
        )
        .await;
        b.goto(&format!("{}dropped.txt", href)).await.unwrap();
        until(
            &b,
            "the instance serves the dropped file",
            "document.body && document.body.innerText.includes('dropped, not chosen')",
        )
        .await;
        b.close_window().await.unwrap();
        b.switch_to_window(console).await.unwrap();

        // A claim made elsewhere (an admin for erin) appears Bound without a reload.
        b.execute("window.pkMarker = 'same page';", vec![]).await.unwrap();
        let (code, v) = api(&addr, "POST", "/api/v1/claims", ADMIN, &json!({"pool": "web", "user": "erin", "name": "erin-elsewhere"}));
        assert_eq!(code, 201, "{v}");
        until(
            &b,
            "the new claim shows Bound live",
            "document.querySelector('.claim[data-claim=\"erin-elsewhere\"][data-phase=\"Bound\"] [data-field=\"link\"]')?.href.startsWith('http://')",
        )
        .await;
        let marker = b.execute("return window.pkMarker;", vec![]).await.unwrap();
        assert_eq!(marker, json!("same page"), "the page was reloaded");
        let held = text(&b, "[data-held]").await;
        assert_eq!(held, "2");

        // Release the first: its card goes, and the claim with it.
        click(&b, &format!("{card} form[data-release] button")).await;
        until(&b, "the release is confirmed", "document.querySelector('#flash').innerText.includes('released')").await;
        let start = Instant::now();
        while api(&addr, "GET", &format!("/api/v1/claims/{name}"), ADMIN, &Value::Null).0 != 404 {
            assert!(start.elapsed() < T, "{name} was not released");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Sign out; an operator signs in with the admin token.
        click(&b, "#signout").await;
        until(&b, "signed out", "document.title.startsWith('Sign in')").await;
        fill(&b, "#token", ADMIN).await;
        click(&b, "#token-form button[type=submit]").await;
        until(&b, "the operator's page", "document.title.startsWith('Operations')").await;
        until(&b, "the stream is open", "document.documentElement.dataset.live === '1'").await;
        // Scale with the form: the page comes back with the outcome...
        let warm = "#warm-web";
        b.find(Locator::Css(warm)).await.unwrap().clear().await.unwrap();
        fill(&b, warm, "3").await;
        click(&b, "#scale-web").await;
        until(&b, "the scale's outcome", "document.querySelector('#flash').innerText.includes('Pool web: warm 2 → 3')").await;
        until(&b, "the stream is open", "document.documentElement.dataset.live === '1'").await;
        // ...and from then on the grid follows without a reload, also a scale made elsewhere.
        b.execute("window.pkMarker = 'same page';", vec![]).await.unwrap();
        let (code, v) = api(&addr, "POST", "/api/v1/pools/web/scale", ADMIN, &json!({"warm": 4}));
        assert_eq!(code, 200, "{v}");
        until(
            &b,
            "the grid shows 4 warm of 4",
            "document.querySelector('[data-pool=\"web\"] [data-field=\"desired\"]').textContent === '4' && document.querySelector('[data-pool=\"web\"] [data-field=\"warm\"]').textContent === '4'",
        )
        .await;
        // The scale's event shows in the recent events, pushed.
        until(
            &b,
            "the scale's event shows without a reload",
            "Array.from(document.querySelectorAll('#recent-events tr')).some(tr => tr.textContent.includes('Pool/web') && tr.textContent.includes('SpecApplied ×2'))",
        )
        .await;
        let marker = b.execute("return window.pkMarker;", vec![]).await.unwrap();
        assert_eq!(marker, json!("same page"), "the page was reloaded");
        assert!(text(&b, "[data-pool=\"web\"] .ready").await.contains("Ready"));
        screenshot(&b, "operations").await;
        all_labelled(&b, "Operations").await;

        // An example flow, with a parameter changed: its output shows.
        click(&b, "details[data-flow=\"01-hello-world\"] > summary").await;
        let command = "[data-flow=\"01-hello-world\"] input[name=\"hello/hello/command\"]";
        b.find(Locator::Css(command)).await.unwrap().clear().await.unwrap();
        fill(&b, command, "echo 'Hello from the console test'").await;
        click(&b, "#run-01-hello-world button[type=submit]").await;
        until(&b, "the flow runs", "document.querySelector('#flash').innerText.includes('Flow 01-hello-world runs')").await;
        let output = "[data-flow=\"01-hello-world\"] details[data-logs=\"/ui/containers/hello-hello/logs\"]";
        let start = Instant::now();
        while b.find(Locator::Css(output)).await.is_err() {
            assert!(start.elapsed() < T, "the flow's container never showed");
            tokio::time::sleep(Duration::from_millis(200)).await;
            b.refresh().await.unwrap();
        }
        click(&b, &format!("{output} > summary")).await;
        until(
            &b,
            "the flow's output shows",
            &format!("document.querySelector('{output} [data-log]').textContent.includes('Hello from the console test')"),
        )
        .await;
        // Its checked steps, in a running toolbox.
        click(&b, "details[data-flow=\"03-command-automation\"] > summary").await;
        click(&b, "#run-03-command-automation button[type=submit]").await;
        until(&b, "the toolbox is declared", "document.querySelector('#flash').innerText.includes('Flow 03-command-automation runs')").await;
        let start = Instant::now();
        loop {
            let ready = b
                .execute("return document.body.innerText.includes('Deployment tools: 1 of 1 ready');", vec![])
                .await
                .unwrap();
            if ready == json!(true) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "the toolbox never ran");
            tokio::time::sleep(Duration::from_millis(300)).await;
            b.refresh().await.unwrap();
        }
        b.find(Locator::XPath("//details[@data-flow='03-command-automation']//button[contains(., 'steps.steps')]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        until(
            &b,
            "the steps pass",
            "document.querySelector('[data-flow=\"03-command-automation\"] [data-flow-output]')?.textContent.includes('3 of 3 steps passed')",
        )
        .await;
        screenshot(&b, "operations-flows").await;
        // Stop the toolbox's container (declared stopped, kept), then start it again.
        for (action, state) in [("stop", "Stopped"), ("start", "Running")] {
            click(
                &b,
                &format!("form[action=\"/ui/deployments/tools/containers/python/{action}\"] button"),
            )
            .await;
            until(&b, "the action's outcome", "document.querySelector('#flash').innerText.includes('container python declared')").await;
            let start = Instant::now();
            loop {
                let shown = b
                    .execute(
                        &format!("return !!Array.from(document.querySelectorAll('table[data-deployment=\"tools\"] tr[data-container=\"python\"] td')).find(td => td.textContent.trim() === '{state}');"),
                        vec![],
                    )
                    .await
                    .unwrap();
                if shown == json!(true) {
                    break;
                }
                assert!(start.elapsed() < Duration::from_secs(60), "the toolbox never showed {state}");
                tokio::time::sleep(Duration::from_millis(300)).await;
                b.refresh().await.unwrap();
            }
        }
        for flow in ["01-hello-world", "03-command-automation"] {
            b.find(Locator::XPath(&format!("//details[@data-flow='{flow}']//button[contains(., 'Stop')]")))
                .await
                .unwrap()
                .click()
                .await
                .unwrap();
            until(&b, "the flow stopped", &format!("document.querySelector('#flash').innerText.includes('Flow {flow} stopped')")).await;
        }
        b.close().await.unwrap();
    });
    drop(c);
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// The figures: first contentful paint of the signed-in page (reloaded 20 times), and how long
/// after the engine's binding a claim shows Bound on an open page (20 claims made through the
/// API), both from the browser's clock. Prints one JSON line.
#[test]
#[ignore = "a benchmark: run with --ignored --nocapture"]
fn console_figures() {
    let _g = serial();
    let driver = driver();
    let (c, addr, _secrets) = controller("console-figures", 4);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let b = browser(&driver).await;
        b.goto(&format!("http://{addr}/ui/signin")).await.unwrap();
        fill(&b, "#token", ALICE).await;
        click(&b, "#token-form button[type=submit]").await;
        until(&b, "alice's page", "document.title.startsWith('My instances')").await;
        let mut fcp = Vec::new();
        for _ in 0..20 {
            b.refresh().await.unwrap();
            let v = until(
                &b,
                "a paint",
                "(performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime",
            )
            .await;
            fcp.push(v.as_f64().unwrap());
        }
        until(&b, "the stream is open", "document.documentElement.dataset.live === '1'").await;
        let mut shown = Vec::new();
        for i in 0..20 {
            let name = format!("fig-{i}");
            let (code, v) = api(&addr, "POST", "/api/v1/claims", ALICE, &json!({"pool": "web", "name": name}));
            assert_eq!(code, 201, "{v}");
            let t = until(
                &b,
                "the claim shows Bound",
                &format!("window.pkTimings.find(t => t.claim === '{name}' && t.phase === 'Bound')"),
            )
            .await;
            shown.push(t["shownMs"].as_f64().unwrap() - t["engineMs"].as_f64().unwrap());
            let (code, _) = api(&addr, "DELETE", &format!("/api/v1/claims/{name}"), ALICE, &Value::Null);
            assert_eq!(code, 200);
            c.wait("the pool is warm again", T, |s| pool_warm(s, "web") == 4);
        }
        let (f50, f95) = (percentile(&mut fcp, 0.5), percentile(&mut fcp, 0.95));
        let (s50, s95, smax) = (
            percentile(&mut shown, 0.5),
            percentile(&mut shown, 0.95),
            percentile(&mut shown, 1.0),
        );
        println!(
            "{}",
            json!({
                "bench": "console",
                "first_contentful_paint_ms": {"p50": f50, "p95": f95, "samples": fcp.len()},
                "bound_shown_after_binding_ms": {"p50": s50, "p95": s95, "max": smax, "samples": shown.len()},
            })
        );
        b.close().await.unwrap();
    });
    drop(c);
}
