//! The deployment files: systemd units verify, the install script stages a working tree, and
//! `spiced` tells systemd when it is ready.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn systemd_units_verify() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        println!("SKIPPED: systemd-analyze is not installed on this machine");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for entry in std::fs::read_dir(repo().join("systemd")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        // Point ExecStart at the binary under test so the check can find it.
        let text = text.replace("/usr/local/bin/spiced", env!("CARGO_BIN_EXE_spiced"));
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        std::fs::write(dir.path().join(&name), text).unwrap();
        units.push(name.replace("@.service", "@instance.service"));
    }
    assert_eq!(units.len(), 4, "serve, relay, worker@, project: {units:?}");
    let out = Command::new("systemd-analyze").arg("verify").args(&units).current_dir(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
}

#[test]
fn install_script_stages_everything_and_is_idempotent() {
    let root = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let out = Command::new("bash")
            .arg(repo().join("scripts/install.sh"))
            .env("SPICED_INSTALL_ROOT", root.path())
            .env("SPICED_BINARY", env!("CARGO_BIN_EXE_spiced"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    for file in [
        "usr/local/bin/spiced",
        "etc/spiced/spiced.toml",
        "etc/spiced/spiced.env",
        "etc/systemd/system/spiced-serve.service",
        "etc/systemd/system/spiced-worker@.service",
    ] {
        assert!(root.path().join(file).exists(), "{file} not installed");
    }
    let man = std::fs::read_to_string(root.path().join("usr/local/share/man/man1/spiced.1")).unwrap();
    assert!(man.starts_with(".ie") || man.contains(".TH spiced"), "a roff man page: {}", &man[..man.len().min(200)]);
    let completions = std::fs::read_to_string(root.path().join("usr/share/bash-completion/completions/spiced")).unwrap();
    assert!(completions.contains("complete") && completions.contains("relay"), "bash completions name the subcommands");
    let help = Command::new(env!("CARGO_BIN_EXE_spiced")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("SPICED_<SECTION>__<KEY>") && help.contains("Exit codes"), "--help lists the environment: {help}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(root.path().join("etc/spiced/spiced.env")).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "the secrets file is private");
    // The installed example config is valid.
    let out = Command::new(root.path().join("usr/local/bin/spiced"))
        .args(["config", "check", "--config"])
        .arg(root.path().join("etc/spiced/spiced.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn serve_tells_systemd_it_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("notify.sock");
    let listener = UnixDatagram::bind(&socket).unwrap();
    listener.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let port = common::process::free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_spiced"))
        .arg("serve")
        .current_dir(dir.path())
        .env("NOTIFY_SOCKET", &socket)
        .env("SPICED_SERVE__LISTEN", format!("127.0.0.1:{port}"))
        .env("SPICED_LOG", "warn")
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = listener.recv(&mut buf).expect("a readiness notification");
    assert_eq!(&buf[..n], b"READY=1");
    // By then the API answers.
    let r = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await.unwrap();
    assert_eq!(r.status(), 200);
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let n = listener.recv(&mut buf).expect("a stopping notification");
    assert_eq!(&buf[..n], b"STOPPING=1");
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM exits 0: {status}");
}

/// The metric names a PromQL text uses, without the histogram series' suffixes.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (at, _) in expr.match_indices("spiced_") {
        if at > 0 && expr.as_bytes()[at - 1].is_ascii_alphanumeric() {
            continue;
        }
        let name: String = expr[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name);
        names.push(base.to_string());
    }
    names
}

fn described(name: &str) -> bool {
    spiced::telemetry::METRICS.iter().any(|(n, _)| *n == name)
}

/// The Grafana dashboard: one row per role, panels laid out without overlap, and every
/// query over metrics spiced exports (a renamed metric fails here, not on an operator's
/// screen).
#[test]
fn grafana_dashboard_has_a_row_per_role_over_exported_metrics() {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/spiced.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let rows: Vec<&str> = panels.iter().filter(|p| p["type"] == "row").map(|p| p["title"].as_str().unwrap()).collect();
    for role in ["serve", "relay", "workers", "projection", "stages"] {
        assert!(rows.iter().any(|r| r.starts_with(role)), "no row for {role}: {rows:?}");
    }
    let mut ids = std::collections::BTreeSet::new();
    let mut cells = std::collections::BTreeSet::new();
    let mut queried = std::collections::BTreeSet::new();
    for panel in panels {
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "duplicate panel id in {panel}");
        let g = &panel["gridPos"];
        let (x, y, w, h) = (g["x"].as_u64().unwrap(), g["y"].as_u64().unwrap(), g["w"].as_u64().unwrap(), g["h"].as_u64().unwrap());
        assert!(x + w <= 24, "panel {} is wider than the grid", panel["title"]);
        for cell in (x..x + w).flat_map(|cx| (y..y + h).map(move |cy| (cx, cy))) {
            assert!(cells.insert(cell), "panel {} overlaps another at {cell:?}", panel["title"]);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let names = metric_names(expr);
            assert!(!names.is_empty(), "panel {} queries no spiced metric: {expr}", panel["title"]);
            for name in names {
                assert!(described(&name), "panel {} queries {name}, which spiced does not export", panel["title"]);
                queried.insert(name);
            }
        }
    }
    for wanted in [
        "spiced_http_request_duration_seconds",
        "spiced_group_commit_batch_size",
        "spiced_relay_lag_positions",
        "spiced_consumer_lag_messages",
        "spiced_projection_position",
        "spiced_worker_dead_letters_total",
        "spiced_s3_errors_total",
        "spiced_database_errors_total",
    ] {
        assert!(queried.contains(wanted), "the dashboard does not show {wanted}");
    }
}

/// The alert rules only use metrics spiced exports, and each has a runbook line. (`promtool`
/// checks their syntax and runs `alerts.test.yml` in scripts/test.sh.)
#[test]
fn alert_rules_use_exported_metrics_and_carry_a_runbook() {
    let text = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    let alerts = text.lines().filter(|l| l.trim_start().starts_with("- alert:")).count();
    let runbooks = text.lines().filter(|l| l.trim_start().starts_with("runbook:")).count();
    assert!(alerts >= 10, "{alerts} alerts");
    assert_eq!(alerts, runbooks, "every alert has one runbook annotation");
    for line in text.lines().filter_map(|l| l.trim_start().strip_prefix("expr:")) {
        for name in metric_names(line) {
            assert!(described(&name), "an alert uses {name}, which spiced does not export: {line}");
        }
    }
}
