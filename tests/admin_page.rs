//! End-to-end: the admin endpoint's live page, loaded in a real headless Chromium, shows the
//! relay's services and agents from the JSON API, with the token taken from the address or
//! asked for. Chromium is found on PATH (`chromium-headless-shell`, `chromium`, ...) or named
//! by `RINGTUNNEL_CHROMIUM`; without it the test says so and passes, unless
//! `RINGTUNNEL_REQUIRE_CHROMIUM=1` (as in `.ci/run`, which installs it).

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// How long one page load may take before the browser is killed.
const BROWSER_WAIT: Duration = Duration::from_secs(60);

/// The headless browser to drive, if there is one.
fn chromium() -> Option<PathBuf> {
    let named = std::env::var_os("RINGTUNNEL_CHROMIUM").map(PathBuf::from);
    let found = named.or_else(|| {
        let path = std::env::var_os("PATH")?;
        [
            "chromium-headless-shell",
            "chromium",
            "chromium-browser",
            "google-chrome",
        ]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("RINGTUNNEL_REQUIRE_CHROMIUM").as_deref() != Ok("1"),
            "RINGTUNNEL_REQUIRE_CHROMIUM=1 but no headless Chromium on PATH"
        );
        eprintln!(
            "skipped: no headless Chromium on PATH (apt-get install chromium-headless-shell)"
        );
    }
    found
}

/// Loads `url` in headless Chromium, lets its script run for `budget` of virtual time, and
/// returns the DOM as it is then. Also saves a screenshot to `screenshot`, when given.
fn load(browser: &PathBuf, url: &str, screenshot: Option<&str>) -> String {
    let profile = TempDir::new("chromium");
    let mut cmd = Command::new(browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        "--window-size=1400,700",
        "--virtual-time-budget=3000",
    ])
    .arg(format!("--user-data-dir={}", profile.0.display()));
    match screenshot {
        Some(path) => cmd.arg(format!("--screenshot={path}")),
        None => cmd.arg("--dump-dom"),
    };
    let mut child = cmd
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the browser");
    let deadline = Instant::now() + BROWSER_WAIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the browser did not finish loading {url} in {BROWSER_WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "browser exited {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn the_live_page_shows_services_and_agents_in_a_browser(backend: Backend) {
    let Some(browser) = chromium() else {
        return;
    };
    let relay = Relay::spawn(backend, &["--admin", "127.0.0.1:0", "--admin-token", "tok"]);
    let admin = relay.admin.unwrap();
    let origin = echo_origin().await;
    let agent = Agent::spawn(relay.agent_args(origin, "web"));
    let payload = pseudo_random(5, 50_000);
    assert_eq!(roundtrip(agent.public, &payload).await.unwrap(), payload);

    let url = format!("http://{admin}/#token=tok");
    let dom = tokio::task::spawn_blocking({
        let (browser, url) = (browser.clone(), url.clone());
        move || load(&browser, &url, None)
    })
    .await
    .unwrap();
    let row_start = dom
        .find("data-service=\"web\"")
        .unwrap_or_else(|| panic!("no row for service web: {dom}"));
    let row = &dom[row_start..dom[row_start..].find("</tr>").unwrap() + row_start];
    assert!(row.contains(&format!(":{}", agent.public.port())), "{row}");
    assert!(row.contains(">online<"), "{row}");
    assert!(row.contains("48.8 KiB"), "bytes each way: {row}");
    assert!(row.contains(">Drain<"), "{row}");
    assert!(
        dom.contains("id=\"c-services\">1 / 1<"),
        "services online: {dom}"
    );
    assert!(dom.contains("id=\"c-agents\">1<"), "agents: {dom}");
    let agents = &dom[dom.find("id=\"agents\"").unwrap()..];
    assert!(agents.contains("127.0.0.1:"), "{agents}");
    assert!(agents.contains(">web<"), "{agents}");

    // Without the token the page loads (it holds no data) and asks for it.
    let bare = format!("http://{admin}/");
    let dom = tokio::task::spawn_blocking(move || load(&browser, &bare, None))
        .await
        .unwrap();
    assert!(dom.contains("needs its token"), "{dom}");
    assert!(
        !dom.contains("data-service="),
        "no data without the token: {dom}"
    );

    if let Ok(path) = std::env::var("RINGTUNNEL_SCREENSHOT") {
        let browser = chromium().unwrap();
        tokio::task::spawn_blocking(move || load(&browser, &url, Some(&path)))
            .await
            .unwrap();
    }
}

both_backends!(the_live_page_shows_services_and_agents_in_a_browser);
