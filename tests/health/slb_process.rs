//! `slb run` as a child process whose stderr is collected line by line while
//! it runs, for tests of what slb logs. Lines written with `--log-format json`
//! are parsed. Shared by the health and observability tests (included by
//! path; it needs `crate::common`).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::common::{timeout, DEADLINE};

/// A running `slb run` (killed on drop) and every stderr line so far.
pub struct SlbProcess {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    _config: ConfigFile,
}

impl SlbProcess {
    /// `slb ARGS run -c FILE`, with `yaml` in FILE and `RUST_LOG=rust_log`.
    pub fn spawn(yaml: &str, args: &[&str], rust_log: &str) -> SlbProcess {
        let config = ConfigFile::new(yaml);
        let mut child = Command::new(env!("CARGO_BIN_EXE_slb"))
            .args(args)
            .arg("run")
            .arg("-c")
            .arg(&config.0)
            .env("RUST_LOG", rust_log)
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn slb");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = tokio::spawn(async move {
            let mut r = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = r.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        SlbProcess {
            child,
            lines,
            reader: Some(reader),
            _config: config,
        }
    }

    /// `slb --log-format json run`, at `RUST_LOG=info`.
    pub fn json(yaml: &str) -> SlbProcess {
        SlbProcess::spawn(yaml, &["--log-format", "json"], "info")
    }

    /// Whether slb has exited.
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().expect("slb status").is_some()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The JSON lines so far, in order (other lines are skipped).
    pub fn events(&self) -> Vec<Value> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// How many JSON lines so far match (see [`matches`]).
    pub fn count(&self, message: &str, fields: &[(&str, &str)]) -> usize {
        self.events()
            .iter()
            .filter(|e| matches(e, message, fields))
            .count()
    }

    /// Wait up to [`DEADLINE`] for the first matching JSON line.
    pub async fn wait_for(&mut self, message: &str, fields: &[(&str, &str)]) -> Value {
        self.wait_for_all(1, message, fields).await.remove(0)
    }

    /// Wait up to [`DEADLINE`] for `n` matching JSON lines; returns all the
    /// matching lines (at least `n`).
    pub async fn wait_for_all(&mut self, n: usize, message: &str, fields: &[(&str, &str)]) -> Vec<Value> {
        let end = Instant::now() + DEADLINE;
        loop {
            let found: Vec<Value> = self
                .events()
                .into_iter()
                .filter(|e| matches(e, message, fields))
                .collect();
            if found.len() >= n {
                return found;
            }
            let exited = self.child.try_wait().expect("slb status");
            assert!(exited.is_none(), "slb exited ({exited:?}):\n{}", self.stderr());
            assert!(
                Instant::now() < end,
                "timed out waiting for {n} log lines {message:?} {fields:?}:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The address listener `name` bound, from its "listener up" line (JSON).
    pub async fn listen_addr(&mut self, name: &str) -> SocketAddr {
        let up = self.wait_for("listener up", &[("listener", name)]).await;
        let addr = up["fields"]["listen"].as_str().expect("listen field");
        addr.parse().expect("listen is an address")
    }

    /// Kill slb and wait until all it wrote is collected; returns it.
    pub async fn stop(&mut self) -> String {
        let _ = self.child.start_kill();
        timeout(self.child.wait()).await.expect("wait for slb");
        if let Some(reader) = self.reader.take() {
            timeout(reader).await.expect("stderr reader");
        }
        self.stderr()
    }
}

/// Whether JSON log line `event`'s message starts with `message` and it has
/// every field in `fields` (compared as strings: `("failures", "2")` matches
/// the number 2).
pub fn matches(event: &Value, message: &str, fields: &[(&str, &str)]) -> bool {
    let f = &event["fields"];
    let is = |v: &Value, want: &str| match v {
        Value::String(s) => s == want,
        Value::Null => false,
        v => serde_json::from_str::<Value>(want).is_ok_and(|w| w == *v),
    };
    f["message"].as_str().is_some_and(|m| m.starts_with(message))
        && fields.iter().all(|(k, want)| is(&f[*k], want))
}

/// A configuration file in the temporary directory, removed on drop.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(yaml: &str) -> ConfigFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("slb-test-{}-{}.yaml", std::process::id(), N.fetch_add(1, Relaxed));
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, yaml).expect("write config");
        ConfigFile(path)
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
