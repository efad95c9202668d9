//! TLS between two processes: a migration over mutual TLS with several
//! channels and compression, and every refusal named on both sides while
//! nothing reaches guest memory.

use migration_tests::{
    MIGRATION_WAIT, Proc, TempDir, TempFile, assert_pair_completed, error_text, lock, spawn_recv, spawn_send,
};

/// `migrate-cli gen-certs` output in a directory removed on drop.
struct Pki(TempDir);

impl Pki {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(&format!("pki-{tag}"));
        let out = Proc::spawn("gen-certs", &["gen-certs", dir.as_str()]).wait(MIGRATION_WAIT);
        assert_eq!(out.code, Some(0), "gen-certs\n{}", out.describe());
        for name in [
            "ca.pem",
            "server-cert.pem",
            "server-key.pem",
            "client-cert.pem",
            "client-key.pem",
        ] {
            assert!(dir.0.join(name).is_file(), "gen-certs wrote {name}");
        }
        Self(dir)
    }

    /// `--tls-cert --tls-key --tls-ca` for `side` ("server" or "client"),
    /// trusting `ca`'s CA.
    fn args(&self, side: &str, ca: &Pki) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.0.file(&format!("{side}-cert.pem")),
            "--tls-key".into(),
            self.0.file(&format!("{side}-key.pem")),
            "--tls-ca".into(),
            ca.0.file("ca.pem"),
        ]
    }
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn a_guest_migrates_over_mutual_tls_with_channels_and_compression() {
    let _lock = lock();
    let pki = Pki::new("ok");
    let server = pki.args("server", &pki);
    let mut recv_args = strs(&server);
    recv_args.extend(["--json", "--run-for", "0s"]);
    let (recv, addr) = spawn_recv(&recv_args);
    let client = pki.args("client", &pki);
    let mut send_args = strs(&client);
    send_args.extend([
        "--mem-size",
        "64M",
        "--dirty-rate",
        "16M",
        "--content",
        "text",
        "--channels",
        "3",
        "--compress",
        "lz4",
        "--json",
    ]);
    let (send_json, recv_json) = assert_pair_completed(spawn_send(addr, &send_args), recv);
    assert_eq!(migration_tests::num(&send_json, "channels"), 3, "{send_json:#}");
    assert!(
        migration_tests::num(&send_json, "compression_saved_bytes") > 0,
        "{send_json:#}"
    );
    assert_eq!(
        migration_tests::field(&recv_json, "guest_check"),
        "passed",
        "{recv_json:#}"
    );
}

#[test]
fn postcopy_over_mutual_tls_serves_page_requests_on_the_urgent_channel() {
    let _lock = lock();
    let pki = Pki::new("postcopy");
    let server = pki.args("server", &pki);
    let mut recv_args = strs(&server);
    recv_args.extend(["--json", "--run-for", "0s"]);
    let (recv, addr) = spawn_recv(&recv_args);
    let client = pki.args("client", &pki);
    let mut send_args = strs(&client);
    send_args.extend([
        "--mem-size",
        "64M",
        "--dirty-rate",
        "16M",
        "--postcopy",
        "--postcopy-after",
        "0",
        "--json",
    ]);
    let (send_json, recv_json) = assert_pair_completed(spawn_send(addr, &send_args), recv);
    // Two data channels and the urgent one, all over TLS.
    assert_eq!(migration_tests::num(&send_json, "channels"), 3, "{send_json:#}");
    let postcopy = migration_tests::field(&recv_json, "postcopy");
    assert!(migration_tests::num(postcopy, "requested_pages") > 0, "{recv_json:#}");
    assert_eq!(
        migration_tests::field(&recv_json, "guest_check"),
        "passed",
        "{recv_json:#}"
    );
}

/// A refused source: exit 1, its error names the problem, its guest runs on.
fn assert_refused(out: migration_tests::Output, problem: &str) {
    let json = migration_tests::assert_send_failed_resumed(&out);
    assert!(error_text(&json).contains(problem), "wanted {problem:?}: {json:#}");
}

#[test]
fn every_wrong_peer_is_refused_on_both_sides_and_nothing_reaches_guest_memory() {
    let _lock = lock();
    let (pki, other) = (Pki::new("refuse"), Pki::new("other"));
    let mem = TempFile::new("tls-refusals.ram");
    let server = pki.args("server", &pki);
    let mut recv_args = strs(&server);
    recv_args.extend(["--mem-file", mem.as_str(), "--json", "--run-for", "0s"]);
    let (mut recv, addr) = spawn_recv(&recv_args);
    let guest = ["--mem-size", "16M", "--json"];

    // A plaintext source.
    assert_refused(spawn_send(addr, &guest).wait(MIGRATION_WAIT), "requires tls");
    let line = recv.wait_stderr_prefix("accept failed: ");
    assert!(line.contains("does not speak TLS"), "{line}");

    // A certificate from another CA.
    let foreign = other.args("client", &pki);
    let mut args = strs(&foreign);
    args.extend(guest);
    assert_refused(spawn_send(addr, &args).wait(MIGRATION_WAIT), "certificate");
    let line = recv.wait_stderr_prefix("accept failed: ");
    assert!(line.contains("invalid peer certificate"), "{line}");

    // A destination that does not carry the name the source expects.
    let client = pki.args("client", &pki);
    let mut args = strs(&client);
    args.extend(["--tls-server-name", "elsewhere.example"]);
    args.extend(guest);
    assert_refused(spawn_send(addr, &args).wait(MIGRATION_WAIT), "not valid for name");
    let line = recv.wait_stderr_prefix("accept failed: ");
    assert!(line.contains("TLS handshake"), "{line}");

    // Nothing was accepted, so no guest memory was even made.
    assert!(!mem.0.exists(), "guest memory was created for a refused peer");

    // The destination still waits: the right source gets through.
    let mut args = strs(&client);
    args.extend(guest);
    assert_pair_completed(spawn_send(addr, &args), recv);
}

#[test]
fn a_tls_source_at_a_plaintext_destination_is_refused_on_both_sides() {
    let _lock = lock();
    let pki = Pki::new("plain-dest");
    let (mut recv, addr) = spawn_recv(&["--json", "--run-for", "0s"]);
    let client = pki.args("client", &pki);
    let mut args = strs(&client);
    args.extend(["--mem-size", "16M", "--json"]);
    let out = spawn_send(addr, &args).wait(MIGRATION_WAIT);
    migration_tests::assert_send_failed_resumed(&out);
    let line = recv.wait_stderr_prefix("refused connection from ");
    assert!(line.contains("speaks TLS"), "{line}");
    recv.kill();
}

#[test]
fn tls_allow_limits_the_client_identities_accepted() {
    let _lock = lock();
    let pki = Pki::new("allow");
    let server = pki.args("server", &pki);
    let client = pki.args("client", &pki);
    let mut send_args = strs(&client);
    send_args.extend(["--mem-size", "16M", "--json"]);

    // gen-certs' client is "migrate-client": another name is refused.
    let mut recv_args = strs(&server);
    recv_args.extend(["--tls-allow", "backup-host", "--json", "--run-for", "0s"]);
    let (mut recv, addr) = spawn_recv(&recv_args);
    assert_refused(spawn_send(addr, &send_args).wait(MIGRATION_WAIT), "allows");
    let line = recv.wait_stderr_prefix("accept failed: ");
    assert!(line.contains("backup-host"), "{line}");
    recv.kill();

    let mut recv_args = strs(&server);
    recv_args.extend([
        "--tls-allow",
        "backup-host",
        "--tls-allow",
        "migrate-client",
        "--json",
        "--run-for",
        "0s",
    ]);
    let (recv, addr) = spawn_recv(&recv_args);
    assert_pair_completed(spawn_send(addr, &send_args), recv);
}
