//! Harness for the end-to-end tests: spawns the shipped `migrate-cli` binary,
//! watches its stderr line by line, and collects its stdout and exit code.
//!
//! Every wait is bounded (see [`WAIT`]) and fails with the output collected
//! so far. Children are killed when their [`Proc`] is dropped. Tests that
//! spawn processes hold [`lock`] so they run one at a time.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

// The embedding guide, `docs/embedding.md`, as this module's docs: its Rust
// example (a whole migration between two threads) is then compiled and run as
// a doctest by `cargo test`, so the guide cannot drift from the API it shows.
#[doc = include_str!("../../docs/embedding.md")]
pub mod embedding_guide {}

/// Bound on every single wait for a child (a stderr line, an exit).
pub const WAIT: Duration = Duration::from_secs(60);

/// Bound on the wait for a whole migration to finish.
pub const MIGRATION_WAIT: Duration = Duration::from_secs(120);

static LOCK: Mutex<()> = Mutex::new(());

/// Serialises cross-process tests. Poison-tolerant: a failed test does not
/// fail every test after it.
pub fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The binary under test: `$MIGRATE_CLI`, else `migrate-cli` next to the
/// test binary's parent directory (test binaries live in `target/<profile>/deps`).
pub fn cli_path() -> PathBuf {
    if let Some(path) = std::env::var_os("MIGRATE_CLI") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "MIGRATE_CLI={} does not exist; build it first: cargo build -p migrate-cli",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("test binary has a directory");
    let path = dir
        .join("..")
        .join(format!("migrate-cli{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} not found; build it first: cargo build -p migrate-cli",
        path.display()
    );
    path
}

/// How a child ended.
#[derive(Debug)]
pub struct Output {
    /// Exit code, `None` if killed by a signal.
    pub code: Option<i32>,
    /// Everything the child wrote on stdout.
    pub stdout: String,
    /// Every line the child wrote on stderr.
    pub stderr: Vec<String>,
}

impl Output {
    /// The single JSON object on stdout; panics with both streams if there is
    /// not exactly one.
    pub fn json(&self) -> Value {
        let text = self.stdout.trim();
        let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
        let first = match stream.next() {
            Some(Ok(value)) => value,
            other => panic!("expected one JSON object on stdout, got {other:?}\n{}", self.describe()),
        };
        assert!(
            stream.next().is_none(),
            "expected exactly one JSON object on stdout\n{}",
            self.describe()
        );
        assert!(first.is_object(), "stdout JSON is not an object\n{}", self.describe());
        first
    }

    /// Both streams, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "exit code: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code,
            self.stdout,
            self.stderr.join("\n")
        )
    }

    /// Whether any stderr line starts with `prefix`.
    pub fn stderr_has(&self, prefix: &str) -> bool {
        self.stderr.iter().any(|line| line.starts_with(prefix))
    }
}

/// A `ulimit` a child runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Address space in KiB (`ulimit -v`): a process that tries a large
    /// allocation then fails instead of succeeding.
    AddressSpaceKib(u64),
    /// Size of any file it writes in KiB (`ulimit -f`): a write past it
    /// fails as on a full disk.
    FileSizeKib(u64),
}

/// A running `migrate-cli`; killed and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    /// `Some(line)` per stderr line, `None` at EOF.
    lines: Receiver<Option<String>>,
    stderr: Vec<String>,
    stderr_done: bool,
    stdout: Option<JoinHandle<String>>,
}

impl Proc {
    /// Spawns `migrate-cli ARGS`, stdin closed, stdout and stderr piped.
    pub fn spawn(name: &str, args: &[&str]) -> Self {
        Self::spawn_limited(name, args, None)
    }

    /// Like [`Proc::spawn`], under `limit` when given.
    pub fn spawn_limited(name: &str, args: &[&str], limit: Option<Limit>) -> Self {
        Self::spawn_program(&cli_path(), name, args, limit)
    }

    /// Spawns `path ARGS` as [`Proc::spawn_limited`] does.
    pub fn spawn_program(path: &Path, name: &str, args: &[&str], limit: Option<Limit>) -> Self {
        let path = path.to_path_buf();
        let mut command = match limit {
            Some(limit) => {
                let (flag, kib) = match limit {
                    Limit::AddressSpaceKib(kib) => ("-v", kib),
                    Limit::FileSizeKib(kib) => ("-f", kib),
                };
                let mut c = Command::new("bash");
                c.arg("-c")
                    .arg(format!("ulimit {flag} {kib} && exec \"$0\" \"$@\""))
                    .arg(&path);
                c
            }
            None => Command::new(&path),
        };
        let mut child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} {args:?}: {e}", path.display()));
        let stderr = child.stderr.take().expect("piped stderr");
        let stdout: ChildStdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        let line = line.trim_end_matches(['\n', '\r']).to_owned();
                        if tx.send(Some(line)).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = tx.send(None);
        });
        let stdout = std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = BufReader::new(stdout).read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        });
        Self {
            name: format!("{name} ({} {})", path.display(), args.join(" ")),
            child,
            lines,
            stderr: Vec::new(),
            stderr_done: false,
            stdout: Some(stdout),
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stderr lines seen so far.
    pub fn stderr_so_far(&self) -> &[String] {
        &self.stderr
    }

    /// Waits (at most `timeout`) for the next stderr line matching `pred` and
    /// returns it. Panics with the stderr seen so far on timeout or if the
    /// child closes stderr (exits) first.
    pub fn wait_stderr_line(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            assert!(
                !self.stderr_done,
                "{}: stderr closed before {what}\n--- stderr ---\n{}",
                self.name,
                self.stderr.join("\n")
            );
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(Some(line)) => {
                    self.stderr.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Ok(None) | Err(RecvTimeoutError::Disconnected) => self.stderr_done = true,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: no {what} within {timeout:?}\n--- stderr ---\n{}",
                    self.name,
                    self.stderr.join("\n")
                ),
            }
        }
    }

    /// Waits for the first stderr line starting with `prefix`.
    pub fn wait_stderr_prefix(&mut self, prefix: &str) -> String {
        self.wait_stderr_line(&format!("stderr line starting with {prefix:?}"), WAIT, |l| {
            l.starts_with(prefix)
        })
    }

    /// Waits for the `listening on ADDR` stderr line and returns `ADDR`,
    /// checking it is on 127.0.0.1 with a real port (not 0).
    pub fn wait_listening(&mut self) -> SocketAddr {
        let line = self.wait_stderr_prefix("listening on ");
        let addr = line["listening on ".len()..].trim();
        let addr: SocketAddr = addr.parse().unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"));
        assert_eq!(
            addr.ip().to_string(),
            "127.0.0.1",
            "bound to the asked address: {line:?}"
        );
        assert_ne!(addr.port(), 0, "real port printed, not 0: {line:?}");
        addr
    }

    /// Waits (at most `timeout`) for the child to exit on its own and returns
    /// its output. Panics with the output so far on timeout.
    pub fn wait(mut self, timeout: Duration) -> Output {
        let deadline = Instant::now() + timeout;
        // Exit closes stderr: wait for its EOF, bounded, then reap.
        while !self.stderr_done {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(Some(line)) => self.stderr.push(line),
                Ok(None) | Err(RecvTimeoutError::Disconnected) => self.stderr_done = true,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: did not exit within {timeout:?}\n--- stderr ---\n{}",
                    self.name,
                    self.stderr.join("\n")
                ),
            }
        }
        let status = self.child.wait().expect("wait for child");
        self.finish(status)
    }

    /// Kills the child (SIGKILL), reaps it, and returns its output.
    pub fn kill(mut self) -> Output {
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait for killed child");
        // The pipe closes with the process: drain what it wrote.
        while !self.stderr_done {
            match self.lines.recv_timeout(WAIT) {
                Ok(Some(line)) => self.stderr.push(line),
                Ok(None) | Err(RecvTimeoutError::Disconnected) => self.stderr_done = true,
                Err(RecvTimeoutError::Timeout) => panic!("{}: stderr not closed after kill", self.name),
            }
        }
        self.finish(status)
    }

    fn finish(&mut self, status: ExitStatus) -> Output {
        let stdout = self
            .stdout
            .take()
            .map(|handle| handle.join().expect("stdout reader"))
            .unwrap_or_default();
        Output {
            code: status.code(),
            stdout,
            stderr: std::mem::take(&mut self.stderr),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `migrate-cli recv --listen 127.0.0.1:0 ARGS` and waits for its
/// `listening on ADDR` line; returns the process and the bound address.
pub fn spawn_recv(args: &[&str]) -> (Proc, SocketAddr) {
    let mut all = vec!["recv", "--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let mut proc = Proc::spawn("recv", &all);
    let addr = proc.wait_listening();
    (proc, addr)
}

/// Spawns a destination hardened against a hostile source, as the hostile
/// tests run it: `recv --listen 127.0.0.1:0 --guard-pages --json --run-for
/// 0s ARGS` under a 1 GiB address-space limit (a write outside the
/// announced RAM kills it with SIGSEGV instead of ending in a report, and a
/// large allocation on a peer's word fails); returns it and its address.
pub fn spawn_hardened_recv(args: &[&str]) -> (Proc, SocketAddr) {
    let mut all = vec![
        "recv",
        "--listen",
        "127.0.0.1:0",
        "--guard-pages",
        "--json",
        "--run-for",
        "0s",
    ];
    all.extend_from_slice(args);
    let mut proc = Proc::spawn_limited("recv", &all, Some(Limit::AddressSpaceKib(1 << 20)));
    let addr = proc.wait_listening();
    (proc, addr)
}

/// Spawns `migrate-cli send --to ADDR ARGS`.
pub fn spawn_send(to: SocketAddr, args: &[&str]) -> Proc {
    let to = to.to_string();
    let mut all = vec!["send", "--to", to.as_str()];
    all.extend_from_slice(args);
    Proc::spawn("send", &all)
}

/// Runs `migrate-cli ARGS` to completion (bounded).
pub fn run(args: &[&str]) -> Output {
    Proc::spawn("run", args).wait(WAIT)
}

/// `json[key]`, panicking with the whole object if the key is missing.
pub fn field<'a>(json: &'a Value, key: &str) -> &'a Value {
    json.get(key)
        .unwrap_or_else(|| panic!("JSON has no key {key:?}: {json:#}"))
}

/// Keys both sides print, success or failure, and their types.
pub fn assert_common_keys(json: &Value) {
    let status = field(json, "status")
        .as_str()
        .unwrap_or_else(|| panic!("status not a string: {json:#}"));
    assert!(
        ["completed", "failed", "cancelled"].contains(&status),
        "unknown status {status:?}: {json:#}"
    );
    let error = field(json, "error");
    assert!(error.is_null() || error.is_string(), "error: {json:#}");
    let verified = field(json, "verified");
    assert!(verified.is_null() || verified.is_boolean(), "verified: {json:#}");
    for key in [
        "total_ms",
        "setup_ms",
        "downtime_ms",
        "expected_downtime_ms",
        "transferred_bytes",
        "ram_bytes",
        "iterations",
        "throughput_bytes_per_sec",
        "ram_bytes_per_sec",
        "throttle_percent",
    ] {
        let value = field(json, key);
        assert!(
            value.is_null() || value.is_number(),
            "{key} not a number or null: {json:#}"
        );
    }
}

/// Send-side keys on top of the common ones.
pub fn assert_send_keys(json: &Value) {
    assert_common_keys(json);
    assert!(field(json, "source_resumed").is_boolean(), "source_resumed: {json:#}");
    for key in [
        "writes_after_resume",
        "guest_write_rate_after",
        "zero_pages",
        "plain_pages",
    ] {
        let value = field(json, key);
        assert!(value.is_null() || value.is_number(), "{key}: {json:#}");
    }
}

/// Recv-side keys on top of the common ones.
pub fn assert_recv_keys(json: &Value) {
    assert_common_keys(json);
    let check = field(json, "guest_check");
    assert!(
        check.is_null() || ["passed", "failed", "skipped"].contains(&check.as_str().unwrap_or("")),
        "guest_check: {json:#}"
    );
}

/// A completed, verified migration as one side reports it.
pub fn assert_completed(out: &Output, side: &str) -> Value {
    assert_eq!(out.code, Some(0), "{side} exit code\n{}", out.describe());
    let json = out.json();
    match side {
        "send" => assert_send_keys(&json),
        _ => assert_recv_keys(&json),
    }
    assert_eq!(
        field(&json, "status"),
        "completed",
        "{side}: {json:#}\n{}",
        out.describe()
    );
    assert!(field(&json, "error").is_null(), "{side}: error on success: {json:#}");
    assert_eq!(field(&json, "verified"), true, "{side}: not verified: {json:#}");
    json
}

/// A failed send that left the source running.
pub fn assert_send_failed_resumed(out: &Output) -> Value {
    assert_eq!(out.code, Some(1), "send exit code\n{}", out.describe());
    let json = out.json();
    assert_send_keys(&json);
    assert_eq!(field(&json, "status"), "failed", "{json:#}");
    let error = field(&json, "error")
        .as_str()
        .unwrap_or_else(|| panic!("no error string: {json:#}"));
    assert!(!error.trim().is_empty(), "empty error: {json:#}");
    assert_eq!(field(&json, "source_resumed"), true, "source not resumed: {json:#}");
    assert_ne!(
        field(&json, "verified"),
        true,
        "a failed migration is not verified: {json:#}"
    );
    json
}

/// Asserts a destination that was part of a failed migration did not claim
/// success (it exited non-zero or had to be killed, and printed no
/// completed report).
pub fn assert_recv_not_completed(out: &Output) {
    assert_ne!(
        out.code,
        Some(0),
        "recv exited 0 after a failed migration\n{}",
        out.describe()
    );
    let text = out.stdout.trim();
    if !text.is_empty() {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(json) => assert_ne!(
                field(&json, "status"),
                "completed",
                "recv reported completed after a failed migration: {json:#}"
            ),
            Err(_) => assert!(
                !text.contains("\"completed\""),
                "recv printed a completed status\n{}",
                out.describe()
            ),
        }
    }
}

/// The error string of a JSON report, lower-cased.
pub fn error_text(json: &Value) -> String {
    field(json, "error").as_str().unwrap_or_default().to_lowercase()
}

/// A number field as u64, panicking with the object otherwise.
pub fn num(json: &Value, key: &str) -> u64 {
    field(json, key)
        .as_u64()
        .unwrap_or_else(|| panic!("{key} not a non-negative integer: {json:#}"))
}

/// Deterministic "random-ish" bytes (xorshift), never a valid frame: bytes
/// 4..6 (the frame kind) are set to a kind no version defines.
pub fn garbage(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out: Vec<u8> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    if out.len() >= 6 {
        out[4] = 0x77;
        out[5] = 0x77;
    }
    out
}

/// A file removed on drop.
#[derive(Debug)]
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// A unique path in `/dev/shm` (or the temp dir) for this process and `tag`.
    pub fn new(tag: &str) -> Self {
        let dir = PathBuf::from("/dev/shm");
        let dir = if dir.is_dir() { dir } else { std::env::temp_dir() };
        let path = dir.join(format!("migration-tests-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Self(path)
    }

    /// The path as a `&str` for command lines.
    pub fn as_str(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A directory removed on drop (with everything in it).
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A unique path in the temp dir for this process and `tag`; nothing is
    /// there (whatever was is removed) until the test makes it.
    pub fn new(tag: &str) -> Self {
        Self::new_in(&std::env::temp_dir(), tag)
    }

    /// Like [`TempDir::new`], under `base` if it is a directory (else the temp dir).
    pub fn new_in(base: &Path, tag: &str) -> Self {
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("migration-tests-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }

    /// Creates the directory (and its parents).
    pub fn create(self) -> Self {
        std::fs::create_dir_all(&self.0).expect("creating a test directory");
        self
    }

    /// The path as a `&str` for command lines.
    pub fn as_str(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }

    /// The path of `name` in the directory, for command lines.
    pub fn file(&self, name: &str) -> String {
        self.0.join(name).to_str().expect("utf-8 temp path").to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits for a migration between `send` and `recv` and checks both report
/// it completed and verified. If one side fails, the panic shows both sides
/// (a destination still waiting after a failed send is killed first).
pub fn assert_pair_completed(send: Proc, recv: Proc) -> (Value, Value) {
    let send_out = send.wait(MIGRATION_WAIT);
    if send_out.code != Some(0) {
        let recv_out = recv.kill();
        panic!(
            "send failed\n=== send ===\n{}\n=== recv (killed after send exited) ===\n{}",
            send_out.describe(),
            recv_out.describe()
        );
    }
    let recv_out = recv.wait(MIGRATION_WAIT);
    if recv_out.code != Some(0) {
        panic!(
            "recv failed\n=== send ===\n{}\n=== recv ===\n{}",
            send_out.describe(),
            recv_out.describe()
        );
    }
    (assert_completed(&send_out, "send"), assert_completed(&recv_out, "recv"))
}

/// A forwarding proxy on loopback, outside the product, that cuts one of
/// the connections through it after a number of bytes from the client:
/// connection `cut_connection` (0 is the first accepted) is shut down both
/// ways once `cut_after` bytes went through it towards the server.
#[derive(Debug)]
pub struct CutProxy {
    pub addr: SocketAddr,
    /// Becomes true once the cut happened.
    pub cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CutProxy {
    pub fn start(server: SocketAddr, cut_connection: usize, cut_after: u64) -> Self {
        use std::io::{Read, Write};
        use std::net::Shutdown;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let cut = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&cut);
        // Client to server counting and maybe cutting; server to client as is.
        let addr = proxy(server, move |index, way, mut from, mut to, both| {
            let limit = (index == cut_connection && way == Toward::Destination).then_some(cut_after);
            let mut buf = vec![0u8; 64 << 10];
            let mut total = 0u64;
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if let Some(limit) = limit
                    && total + n as u64 >= limit
                {
                    flag.store(true, Ordering::SeqCst);
                    for s in &both {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                    return;
                }
                total += n as u64;
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
        Self { addr, cut }
    }
}

/// Binds a forwarding proxy to `server` on loopback and returns its address.
/// For every accepted connection (numbered from 0) it connects to `server`
/// and runs `pump(index, way, from, to, [client, upstream])` on its own
/// thread for each way.
fn proxy<P>(server: SocketAddr, pump: P) -> SocketAddr
where
    P: Fn(usize, Toward, std::net::TcpStream, std::net::TcpStream, [std::net::TcpStream; 2]) + Send + Clone + 'static,
{
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
    let addr = listener.local_addr().expect("proxy addr");
    std::thread::spawn(move || {
        for (index, client) in listener.incoming().enumerate() {
            let Ok(client) = client else { return };
            let Ok(upstream) = TcpStream::connect(server) else {
                return;
            };
            let clone = |s: &TcpStream| s.try_clone().expect("clone");
            for (way, from, to) in [
                (Toward::Destination, &client, &upstream),
                (Toward::Source, &upstream, &client),
            ] {
                let (from, to, both) = (clone(from), clone(to), [clone(&client), clone(&upstream)]);
                let pump = pump.clone();
                std::thread::spawn(move || pump(index, way, from, to, both));
            }
        }
    });
    addr
}

/// Which way a frame travels through a [`FaultProxy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toward {
    /// Source to destination.
    Destination,
    /// Destination to source (the return path).
    Source,
}

/// What a [`FaultProxy`] does to the frame it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Drop it and shut the connection down both ways.
    Cut,
    /// Flip a bit of it (of its body, or of its checksum when the body is
    /// empty) and forward it.
    Corrupt,
    /// Forward nothing from it on (that way), keeping the connection open
    /// until the sender closes: the moment to kill a side at that phase.
    Hold,
}

/// A forwarding proxy on loopback, outside the product, that reads the
/// frames of one connection with `migration-wire` and applies a fault to
/// the `nth` (from 1) frame of a kind going one way; everything else is
/// forwarded as it is.
#[derive(Debug)]
pub struct FaultProxy {
    pub addr: SocketAddr,
    /// Becomes true once the fault was applied.
    pub fired: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FaultProxy {
    pub fn start(
        server: SocketAddr,
        connection: usize,
        toward: Toward,
        kind: migration_wire::MessageKind,
        nth: usize,
        fault: Fault,
    ) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        let fired = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&fired);
        let addr = proxy(server, move |index, way, from, to, both| {
            let rule = (index == connection && way == toward).then_some((kind, nth, fault));
            pump_frames(from, to, rule, &flag, &both);
        });
        Self { addr, fired }
    }

    /// Waits (bounded) until the fault was applied.
    pub fn wait_fired(&self, what: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.fired.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "{what}: the fault never fired");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A `send` with `args` (after `--to`) whose link is cut when its device
/// state goes out, after the source paused; checks the cut came and returns
/// the sender's output.
pub fn send_cut_at_device_state(args: &[&str]) -> Output {
    let (recv, addr) = spawn_recv(&["--json"]);
    let proxy = FaultProxy::start(
        addr,
        0,
        Toward::Destination,
        migration_wire::MessageKind::DeviceState,
        1,
        Fault::Cut,
    );
    let out = spawn_send(proxy.addr, args).wait(MIGRATION_WAIT);
    let _ = recv.kill();
    assert!(
        proxy.fired.load(std::sync::atomic::Ordering::SeqCst),
        "the cut never came\n{}",
        out.describe()
    );
    out
}

/// Forwards frames from `from` to `to`, applying `rule` (kind, nth, fault).
fn pump_frames(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    rule: Option<(migration_wire::MessageKind, usize, Fault)>,
    fired: &std::sync::atomic::AtomicBool,
    both: &[std::net::TcpStream; 2],
) {
    use std::io::{Read, Write};
    use std::net::Shutdown;
    let mut seen = 0;
    loop {
        let mut head = [0u8; migration_wire::FRAME_HEADER_LEN];
        if from.read_exact(&mut head).is_err() {
            break;
        }
        let Ok(header) = migration_wire::FrameHeader::decode(&head, migration_wire::MAX_FRAME_BODY) else {
            // Not a frame: pass the rest through untouched.
            let _ = to.write_all(&head);
            let _ = std::io::copy(&mut from, &mut to);
            break;
        };
        let mut body = vec![0u8; header.len as usize];
        if from.read_exact(&mut body).is_err() {
            break;
        }
        if let Some((kind, nth, fault)) = rule
            && header.kind == kind
        {
            seen += 1;
            if seen == nth {
                fired.store(true, std::sync::atomic::Ordering::SeqCst);
                match fault {
                    Fault::Cut => {
                        for s in both {
                            let _ = s.shutdown(Shutdown::Both);
                        }
                        return;
                    }
                    Fault::Hold => {
                        let _ = std::io::copy(&mut from, &mut std::io::sink());
                        break;
                    }
                    Fault::Corrupt if body.is_empty() => head[migration_wire::FRAME_HEADER_LEN - 1] ^= 0x10,
                    Fault::Corrupt => {
                        let at = body.len() / 2;
                        body[at] ^= 0x10;
                    }
                }
            }
        }
        if to.write_all(&head).is_err() || to.write_all(&body).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Reads from `stream` until the peer closes (a reset counts as a close),
/// bounded by the stream's read timeout; panics if it never closes.
pub fn read_until_closed(stream: &mut std::net::TcpStream) -> Vec<u8> {
    use std::io::{ErrorKind, Read};
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return reply,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return reply,
            Err(e) => panic!("the peer did not close the connection ({e}); got {} bytes", reply.len()),
        }
    }
}
