//! A real PostgreSQL server for the tests: Debian's `postgresql` (scripts/test.sh installs it),
//! started once per test process on a free port in a temporary directory (`initdb` and `pg_ctl`
//! run as the `postgres` user when the tests run as root: initdb refuses root), stopped by a
//! watchdog when the test process ends, however it ends. Every caller gets a database of its own.
//! A test that stops the server on purpose (an outage) starts one of its own ([`own_server`]).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

pub struct Server {
    port: u16,
    bin: PathBuf,
    data: PathBuf,
    options: String,
    log: PathBuf,
    /// Outlives this process on purpose: it stops the server once we are gone.
    _watchdog: std::process::Child,
}

static SERVER: OnceLock<Server> = OnceLock::new();

/// A server of the caller's own, to stop and start (stopped with the test process, like the
/// shared one). Durable, as in production: a commit it acknowledged survives its crash (the
/// shared server trades that for speed, and would lose the last commits before a stop).
pub fn own_server() -> Server {
    start(true)
}

impl Server {
    /// The URL of a new, empty database on this server.
    pub fn database(&self) -> String {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "qtune",
            ])
            .args([
                "-d",
                "postgres",
                "-q",
                "-c",
                &format!("CREATE DATABASE {name}"),
            ])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "CREATE DATABASE: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!("postgres://qtune@127.0.0.1:{}/{name}", self.port)
    }

    /// `pg_ctl stop -m immediate`: the server quits without a clean shutdown, as in a crash
    /// (recovery replays its log at the next start); every connection is cut.
    pub fn stop_immediately(&self) {
        self.pg_ctl(&["-m", "immediate", "stop"]);
    }

    /// Starts the stopped server again on the same port, and waits until it accepts connections.
    pub fn start_again(&self) {
        self.pg_ctl(&[
            "-o",
            &self.options,
            "-l",
            self.log.to_str().unwrap(),
            "-w",
            "start",
        ]);
    }

    fn pg_ctl(&self, args: &[&str]) {
        let out = as_server_user(&self.bin, "pg_ctl")
            .args(["-D", self.data.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Which database the service tests run on: `QTUNE_TEST_BACKEND=postgres` puts them on
/// PostgreSQL (scripts/test.sh runs the API and queue tests a second time so); SQLite otherwise.
pub fn selected() -> bool {
    match std::env::var("QTUNE_TEST_BACKEND").as_deref() {
        Ok("postgres") => true,
        Ok("sqlite") | Err(_) => false,
        Ok(other) => panic!("QTUNE_TEST_BACKEND={other}: expected sqlite or postgres"),
    }
}

/// The URL of a new, empty database on the test server (started on first use).
pub fn database() -> String {
    SERVER.get_or_init(|| start(false)).database()
}

/// One value from `sql` on the database at `url` (psql's unaligned output, trimmed).
pub fn query(url: &str, sql: &str) -> String {
    let out = Command::new(bin_dir().join("psql"))
        .args([url, "-tAq", "-c", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn bin_dir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    found.retain(|b| b.join("initdb").is_file());
    found.sort();
    found.pop().expect(
        "PostgreSQL's server programs (/usr/lib/postgresql/N/bin/initdb) are missing: \
         `apt-get install postgresql` (scripts/test.sh does)",
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a server program, as the `postgres` user when we are root.
fn as_server_user(bin: &std::path::Path, program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(program));
        c
    } else {
        Command::new(bin.join(program))
    }
}

fn start(durable: bool) -> Server {
    let bin = bin_dir();
    let dir = tempfile::Builder::new()
        .prefix("qtune-pg-")
        .tempdir()
        .unwrap()
        .keep();
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "postgres:", dir.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(ok.success(), "chown {}", dir.display());
    }
    let data = dir.join("data");
    let out = as_server_user(&bin, "initdb")
        .args(["-D", data.to_str().unwrap(), "-U", "qtune", "--auth=trust"])
        .args(["--no-sync", "-E", "UTF8"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = super::process::free_port();
    // many small pools at once; durability only where it is under test
    let mut options = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=400",
        dir.display()
    );
    if !durable {
        options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off";
    }
    let log = dir.join("log");
    // The watchdog: once this process is gone, stop the server and remove its directory.
    let stop = format!(
        "{} {} -D {} -m immediate stop",
        if is_root() {
            "runuser -u postgres --"
        } else {
            ""
        },
        bin.join("pg_ctl").display(),
        data.display()
    );
    let watchdog = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        dir = dir.display()
    );
    let watchdog = Command::new("sh")
        .args(["-c", &watchdog])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sh runs");
    let server = Server {
        port,
        bin,
        data,
        options,
        log,
        _watchdog: watchdog,
    };
    server.start_again();
    server
}
