//! A real `tokenvault serve` process and the binary's command line, for the tests of the binary
//! (`cli.rs`) and of the client crate (`client.rs`). Both include `api/helpers.rs` as `helpers`.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helpers::TestApp;

/// The binary, with no setting inherited from the environment the tests run in, and pretty logs.
pub fn tokenvault() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tokenvault"));
    for (name, _) in std::env::vars() {
        if name == "DATABASE_URL" || name.starts_with("TOKENVAULT_") || name.starts_with("OTEL_") {
            command.env_remove(name);
        }
    }
    command.env("TOKENVAULT_LOG_FORMAT", "pretty");
    command
}

/// The command with the settings of `app` (its database, key ring and fake Trackunit).
pub fn tokenvault_for(app: &TestApp) -> Command {
    let mut command = tokenvault();
    command
        .env("DATABASE_URL", &app.database_url)
        .env("TOKENVAULT_ENCRYPTION_KEYS", &app.encryption_keys)
        .env("TOKENVAULT_TRACKUNIT_JWKS_URL", format!("{}/jwks", app.trackunit.uri()))
        .env("TOKENVAULT_TRACKUNIT_TOKEN_URL", format!("{}/apptoken", app.trackunit.uri()));
    command
}

/// A `tokenvault serve` process, killed when dropped: a test that fails half-way leaves none behind.
pub struct Served(pub std::process::Child);

impl std::ops::Deref for Served {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Served {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `tokenvault serve` for `app` against `database_url` on free ports, its log (at `info`) going to
/// `log` and `vars` set on top, and waits until it answers; returns it and its public and internal ports.
pub async fn serve_with(
    app: &TestApp,
    database_url: &str,
    log: impl Into<Stdio>,
    vars: &[(&str, &str)],
) -> (Served, u16, u16) {
    let (public, internal) = (free_port(), free_port());
    let mut child = tokenvault_for(app)
        .arg("serve")
        .env("DATABASE_URL", database_url)
        .env("TOKENVAULT_PUBLIC_ADDR", format!("127.0.0.1:{public}"))
        .env("TOKENVAULT_INTERNAL_ADDR", format!("127.0.0.1:{internal}"))
        .env("RUST_LOG", "info")
        .envs(vars.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    for _ in 0..100 {
        let ready = app.http.get(format!("http://127.0.0.1:{public}/readyz")).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            return (Served(child), public, internal);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("serve did not become ready");
}

/// A log file for a served process, in the temporary directory, removed when dropped.
pub struct LogFile(std::path::PathBuf);

impl LogFile {
    pub fn new(label: &str) -> Self {
        Self(std::env::temp_dir().join(format!("tokenvault-{label}-{}.log", uuid::Uuid::new_v4().simple())))
    }

    /// A new, empty file to hand the process as its stderr.
    pub fn writer(&self) -> std::fs::File {
        std::fs::File::create(&self.0).unwrap()
    }

    /// What was written so far.
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.0).unwrap()
    }

    /// The first JSON log line whose text contains `needle`.
    pub fn json_line(&self, needle: &str) -> serde_json::Value {
        let text = self.text();
        let line = text.lines().find(|line| line.contains(needle));
        serde_json::from_str(line.unwrap_or_else(|| panic!("no log line with {needle:?}:\n{text}"))).unwrap()
    }
}

impl Drop for LogFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
