//! The binary's command line as a user meets it: `check` reports every error of every file and
//! treats a missing secret as a warning unless `--strict`; `run` says why it cannot start once;
//! log lines are plain text when stdout is not a terminal.

mod support;

use std::path::Path;
use std::process::{Output, Stdio};

use tokio::io::{AsyncBufReadExt, BufReader};

use support::WAIT;

const BIN: &str = env!("CARGO_BIN_EXE_mqtt-warden");

/// A policy with one valid org.
const GOOD_POLICY: &str = "orgs:\n  o1:\n    device_types: { sensor: {} }\n";

fn write(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create folder");
    }
    std::fs::write(path, text).expect("write file");
}

/// Runs the binary to completion with `args`, in `dir`, without `WARDEN_TEST_*` variables.
fn mqtt_warden(dir: &Path, args: &[&str]) -> (Output, String, String) {
    let output = std::process::Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("WARDEN_TEST_CLI_SECRET")
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output, stdout, stderr)
}

#[test]
fn check_reports_every_error_of_every_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "warden.yaml",
        "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: broker\n  usernme: warden\npolicies: policies/\nlimits:\n  auth_workers: 0\n",
    );
    write(
        dir.path(),
        "policies/a.yaml",
        "orgs:\n  o1:\n    secruity: tls-token\n    limits:\n      max_connections: 0\n",
    );
    write(
        dir.path(),
        "policies/b.yaml",
        "orgs:\n  o2:\n    enabled: maybe\n    on_violation: explode\n",
    );
    let (output, _, stderr) = mqtt_warden(dir.path(), &["check", "--config", "warden.yaml"]);
    assert!(!output.status.success(), "{stderr}");
    for expected in [
        "warden.yaml:4: upstream.address: must be HOST:PORT",
        "warden.yaml:5: upstream.usernme: unknown field `usernme`",
        "warden.yaml:8: limits.auth_workers: must be at least 1",
        "a.yaml:3: orgs.o1.secruity: unknown field `secruity`",
        "a.yaml:5: orgs.o1.limits.max_connections: must be at least 1",
        "b.yaml:3: orgs.o2.enabled: invalid type",
        "b.yaml:4: orgs.o2.on_violation: unknown variant `explode`",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert_eq!(stderr.lines().count(), 7, "{stderr}");
}

#[test]
fn check_warns_about_a_missing_secret_and_strict_makes_it_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "warden.yaml",
        "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: \"127.0.0.1:1884\"\n  username: warden\n  password_env: WARDEN_TEST_CLI_SECRET\npolicies: policy.yaml\n",
    );
    write(dir.path(), "policy.yaml", GOOD_POLICY);
    let unset = "warden.yaml:6: upstream.password_env: environment variable WARDEN_TEST_CLI_SECRET is not set";

    let (output, stdout, stderr) = mqtt_warden(dir.path(), &["check", "--config", "warden.yaml"]);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains(&format!("warning: {unset}")), "{stderr}");
    assert!(stdout.contains("warden.yaml: ok"), "{stdout}");
    assert!(stdout.contains("policy.yaml: ok (1 orgs)"), "{stdout}");

    let (output, stdout, stderr) = mqtt_warden(
        dir.path(),
        &["check", "--strict", "--config", "warden.yaml"],
    );
    assert!(!output.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains(unset), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");

    // `run` needs the secret: the same line, as an error, before anything starts.
    let (output, _, stderr) = mqtt_warden(dir.path(), &["run", "--config", "warden.yaml"]);
    assert!(!output.status.success());
    assert_eq!(stderr.trim(), format!("error: {unset}"));
}

#[test]
fn run_prints_its_start_up_error_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "warden.yaml",
        "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: \"127.0.0.1:1884\"\npolicies: missing-policy.yaml\ntelemetry: { log_format: json }\n",
    );
    let (output, _, stderr) = mqtt_warden(dir.path(), &["run", "--config", "warden.yaml"]);
    assert!(!output.status.success());
    assert_eq!(
        stderr.matches("missing-policy.yaml").count(),
        1,
        "the cause is said once:\n{stderr}"
    );
    assert!(stderr.starts_with("error: policy: "), "{stderr}");
}

#[tokio::test]
async fn text_logs_have_no_colour_codes_when_stdout_is_not_a_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "policy.yaml", GOOD_POLICY);
    write(
        dir.path(),
        "warden.yaml",
        "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: \"127.0.0.1:1\"\npolicies: policy.yaml\ntelemetry: { log_format: text }\n",
    );
    let mut child = tokio::process::Command::new(BIN)
        .args(["run", "--config", "warden.yaml"])
        .current_dir(dir.path())
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary runs");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout piped")).lines();
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            let listening = line.contains("listening");
            seen.push(line);
            if listening {
                return;
            }
        }
        panic!("the proxy exited before listening: {seen:?}");
    })
    .await
    .expect("the proxy logs that it listens");
    assert!(seen.iter().any(|line| line.contains(" INFO ")), "{seen:?}");
    for line in &seen {
        assert!(!line.contains('\u{1b}'), "colour code in {line:?}");
    }
}
