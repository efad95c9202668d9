//! Connection setup on loopback, plaintext against mutual TLS 1.3: what
//! each extra channel costs before its first page (connect and, with TLS,
//! the handshake; io_uring rings set up on both sides). The plaintext figure is
//! bimodal: criterion makes thousands of connections, and once loopback's
//! ephemeral ports are all in TIME_WAIT a connect is refused and retried
//! after a backoff; its lower bound is the cost of a fresh connection.
//!
//! `cargo bench -p migration-bench --bench handshake`

use criterion::{Criterion, criterion_group, criterion_main};
use std::time::Duration;
use transport_tcp::{TcpListener, TcpOptions, TlsConfig, TlsFiles};

fn options(tls: Option<TlsConfig>) -> TcpOptions {
    TcpOptions {
        tls,
        io_timeout: Duration::from_secs(10),
        ..TcpOptions::default()
    }
}

fn connect_pairs(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("handshake-bench-{}", std::process::id()));
    transport_tcp::generate_certs(&dir).expect("certificates");
    let files = |side: &str| {
        (
            dir.join(format!("{side}-cert.pem")),
            dir.join(format!("{side}-key.pem")),
        )
    };
    let ca = dir.join("ca.pem");
    let (scert, skey) = files("server");
    let (ccert, ckey) = files("client");
    let server = TlsConfig::server(
        &TlsFiles {
            cert: &scert,
            key: &skey,
            ca: &ca,
        },
        &[],
    )
    .expect("server");
    let client = TlsConfig::client(
        &TlsFiles {
            cert: &ccert,
            key: &ckey,
            ca: &ca,
        },
        None,
    )
    .expect("client");
    let mut group = c.benchmark_group("connect");
    for (name, server, client) in [
        ("plaintext", None, None),
        ("mutual TLS 1.3", Some(server), Some(client)),
    ] {
        let listener = TcpListener::bind("127.0.0.1:0", options(server)).expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        // Accepts until the measurement is over (a client may wait out a
        // connect backoff longer than any fixed accept timeout).
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let accepting = std::thread::spawn({
            let done = std::sync::Arc::clone(&done);
            move || {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    match listener.accept_within(Some(Duration::from_millis(200))) {
                        Ok(_) | Err(migration_core::TransportError::TimedOut(_)) => {}
                        Err(e) => panic!("accept: {e}"),
                    }
                }
            }
        });
        let client = options(client);
        group.bench_function(name, |b| {
            b.iter(|| transport_tcp::connect(&addr, &client).expect("connect"));
        });
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        accepting.join().expect("accept thread");
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(5));
    targets = connect_pairs
}
criterion_main!(benches);
