//! Child processes of the tests: servers (VictoriaMetrics, influxd) that
//! count as started only when they listen on their port themselves, their
//! logs, signals and exits.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The TCP ports process `pid` listens on, read from /proc: its socket
/// inodes matched against the kernel's table of listening sockets of the
/// process's own network namespace (`/proc/PID/net`, so that a server in a
/// test's namespace is found too).
pub fn listening_ports(pid: u32) -> HashSet<u16> {
    let inodes: HashSet<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports = HashSet::new();
    for table in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for row in text.lines().skip(1) {
            let cols: Vec<&str> = row.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if cols.len() > 9 && cols[3] == "0A" && inodes.contains(cols[9]) {
                let port = cols[1].rsplit(':').next().unwrap_or("");
                if let Ok(p) = u16::from_str_radix(port, 16) {
                    ports.insert(p);
                }
            }
        }
    }
    ports
}

/// How a server child came up in [`spawn_server`].
pub enum Spawned {
    /// It listens on the port itself and answers its readiness check.
    Ready(Child),
    /// It exited because the port was taken: pick another and try again.
    PortTaken,
}

/// Starts `cmd` (a server told to listen on `port`) and waits until the
/// child itself listens on `port` and `ready()` holds. A server that merely
/// answers on the port is not enough: if someone else took the port first,
/// that someone would answer, and a test would talk to the wrong server.
pub fn spawn_server(
    name: &str,
    cmd: &mut Command,
    port: u16,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> Spawned {
    let mut child = super::spawn_past_exec(cmd);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let text = tail(log, 30);
            if text.contains("address already in use") {
                return Spawned::PortTaken;
            }
            panic!("{name} exited with {status} on start:\n{text}");
        }
        if listening_ports(child.id()).contains(&port) && ready() {
            return Spawned::Ready(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{name} not listening on port {port} and ready within 30 s:\n{}",
                tail(log, 30)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(super) fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub(super) fn print_tail_if_panicking(name: &str, path: &Path, lines: usize) {
    if std::thread::panicking() {
        eprintln!(
            "----- last lines of {name} log ({}) -----\n{}\n----- end of {name} log -----",
            path.display(),
            tail(path, lines)
        );
    }
}

pub(super) fn signal(child: &Child, sig: &str) {
    kill_pid(child.id(), sig);
}

/// Sends signal `sig` (e.g. "TERM", "KILL") to `pid` with kill(1).
pub fn kill_pid(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// Waits for `child` to exit, up to `timeout`; `None` if it is still running.
pub(super) fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(super) fn log_file(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

pub(super) fn mark_log(path: &Path, what: &str) {
    let _ = writeln!(log_file(path), "===== test harness: {what} =====");
}

/// A server child of a test (VictoriaMetrics, influxd): its process and its
/// log. Started only through [`spawn_server`], stopped politely or killed,
/// started again on the same port; killed on drop, with the tail of its log
/// printed when the test panics.
pub struct ServerProcess {
    name: &'static str,
    log: PathBuf,
    child: Option<Child>,
}

impl ServerProcess {
    /// A server named `name` (for messages) that logs to `log`; not running.
    pub fn new(name: &'static str, log: PathBuf) -> ServerProcess {
        ServerProcess {
            name,
            log,
            child: None,
        }
    }

    /// Process id of the server, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Starts `cmd` (told to listen on `port`) with its output in the log;
    /// false if the port was taken by another process.
    pub fn try_start(&mut self, cmd: &mut Command, port: u16, ready: impl FnMut() -> bool) -> bool {
        assert!(self.child.is_none(), "{} already running", self.name);
        mark_log(&self.log, "start");
        let log = log_file(&self.log);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        match spawn_server(self.name, cmd, port, &self.log, ready) {
            Spawned::Ready(child) => {
                self.child = Some(child);
                true
            }
            Spawned::PortTaken => false,
        }
    }

    /// Starts `cmd` on `port` again: a restart must keep the URL the agent
    /// has, so it waits (up to 30 s) for a port someone else took meanwhile.
    pub fn start_again(&mut self, cmd: &mut Command, port: u16, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.try_start(cmd, port, &mut ready) {
            assert!(
                Instant::now() < deadline,
                "{}: port {port} taken by another process for 30 s",
                self.name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM, then SIGKILL after 15 s: the agent then sees connection
    /// refused.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "TERM");
            if wait_exit(&mut child, Duration::from_secs(15)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            mark_log(&self.log, "stopped");
        }
    }

    /// SIGKILL, for tests about the remote crashing.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            mark_log(&self.log, "killed");
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        print_tail_if_panicking(self.name, &self.log, 20);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
