//! Every shipped and fixture config: the valid ones parse, the invalid ones
//! fail with the error their first line (`# error: ...`) promises. And the
//! `slb check` / `--version` / `--help` command line on them, and the
//! defaults a listener gets.

use std::path::{Path, PathBuf};
use std::process::Command;

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no yaml files in {}", dir.display());
    files
}

#[test]
fn every_shipped_config_parses() {
    for f in yaml_files("conf") {
        slb::config::load(&f).unwrap_or_else(|e| panic!("{}: {e:#}", f.display()));
    }
}

#[test]
fn default_config_is_the_8999_to_9999_scenario() {
    let c = slb::config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/slb.yaml")).unwrap();
    let l = &c.listeners[0];
    assert_eq!(l.listen.port(), 8999);
    assert_eq!(l.backends[0].address.port(), 9999);
    assert_eq!(l.health_check.as_ref().unwrap().port, Some(9999));
    assert!(l.session_persistence.is_none());
}

#[test]
fn valid_fixtures_parse() {
    for f in yaml_files("tests/fixtures/valid") {
        slb::config::load(&f).unwrap_or_else(|e| panic!("{}: {e:#}", f.display()));
    }
}

#[test]
fn invalid_fixtures_fail_with_the_promised_error() {
    for f in yaml_files("tests/fixtures/invalid") {
        let text = std::fs::read_to_string(&f).unwrap();
        let want = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# error: "))
            .unwrap_or_else(|| panic!("{}: first line must be `# error: ...`", f.display()));
        let err = match slb::config::load(&f) {
            Ok(_) => panic!("{} parsed but should not", f.display()),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains(want),
            "{}:\n  want: {want}\n  got:  {err}",
            f.display()
        );
        assert!(
            err.contains(&*f.to_string_lossy()),
            "error does not name the file: {err}"
        );
    }
}

fn slb(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_slb"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run slb")
}

/// `slb check -c path`, which must exit 0: its stdout.
fn check_ok(path: &str) -> String {
    let out = slb(&["check", "-c", path]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn check_prints_a_summary_and_exits_zero() {
    let stdout = check_ok("conf/slb.yaml");
    assert!(
        stdout.contains("listener \"ai-service\": tcp 0.0.0.0:8999 -> group \"ai-pool\""),
        "{stdout}"
    );
    assert!(stdout.contains("backend 127.0.0.1:9999 weight 10"), "{stdout}");
    assert!(stdout.contains("is valid"), "{stdout}");
}

#[test]
fn check_defaults_to_conf_slb_yaml() {
    assert!(slb(&["check"]).status.success());
}

#[test]
fn check_reports_the_error_and_exits_one() {
    let out = slb(&["check", "-c", "tests/fixtures/invalid/weight-out-of-range.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("weight-out-of-range.yaml") && stderr.contains("weight: 101"),
        "{stderr}"
    );
}

#[test]
fn run_with_a_bad_config_exits_nonzero_before_binding() {
    let out = slb(&["run", "-c", "tests/fixtures/invalid/missing-group.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no backend group named \"nope\""));
}

#[test]
fn missing_file_is_a_clear_error() {
    let out = slb(&["check", "-c", "no/such/file.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file no/such/file.yaml"));
}

#[test]
fn version_and_help() {
    let out = slb(&["--version"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    for (sub, option) in [("run", "--config"), ("check", "--config"), ("status", "--admin")] {
        let out = slb(&[sub, "--help"]);
        assert!(out.status.success(), "slb {sub} --help: {:?}", out.status);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(option),
            "slb {sub} --help does not mention {option}:\n{stdout}"
        );
    }
}

#[test]
fn check_warns_about_an_empty_group_by_name_and_exits_zero() {
    let stdout = check_ok("tests/fixtures/valid/ipv6-and-empty-group.yaml");
    assert!(
        stdout.contains("warning: backend group \"empty\" is empty"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("backend group \"pool\" is empty"),
        "only the empty group is named: {stdout}"
    );
    assert!(stdout.contains("is valid"), "{stdout}");
}

#[test]
fn idle_timeout_defaults_to_60s_for_udp_and_900s_for_tcp() {
    let c = slb::config::parse(
        "listeners:
  - name: t
    protocol: tcp
    listen: 127.0.0.1:0
    backend_group: g
  - name: u
    protocol: udp
    listen: 127.0.0.1:0
    backend_group: g
    health_check:
      enabled: false
backend_groups:
  - name: g
    backends:
      - address: 127.0.0.1:9999
",
    )
    .expect("config");
    let idle = |name: &str| {
        c.listeners
            .iter()
            .find(|l| l.name == name)
            .expect("listener")
            .idle_timeout
    };
    assert_eq!(idle("t"), std::time::Duration::from_secs(900));
    assert_eq!(idle("u"), std::time::Duration::from_secs(60));
}
