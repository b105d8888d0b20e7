//! The reload thread must not outlive the TLS handles (its own binary, so no other test's
//! threads are counted).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{Ca, Pki, tls_files};
use cpi_transport::{ClientTls, ServerTls};

/// Threads of this process whose name starts with `prefix` (Linux truncates names to 15 bytes).
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).ok())
        .filter(|name| name.trim_end().starts_with(prefix))
        .count()
}

/// Waits up to 2 s for exactly `expected` reload threads (threads name themselves on start-up).
fn wait_for_threads(expected: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let found = threads_named("tls-reload");
        if found == expected {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expected {expected} reload threads, found {found}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn reload_threads_stop_when_all_handles_are_dropped() {
    let pki = Pki::new().unwrap();
    let ca = Ca::new("ca").unwrap();
    let leaf = ca.issue(&["localhost"]).unwrap();
    let files = tls_files(&pki.write_tls_files("tls", &leaf, ca.cert_pem()).unwrap());
    assert_eq!(threads_named("tls-reload"), 0);

    // A long interval: the thread must exit because the handles went away, not because it
    // happened to wake up.
    let server = ServerTls::new(files.clone(), Vec::new(), Duration::from_secs(3600)).unwrap();
    let client = ClientTls::new(files, "localhost".into(), Duration::from_secs(3600)).unwrap();
    let server_clone = server.clone();
    wait_for_threads(2);

    drop(server);
    drop(client);
    // One server handle is still alive, so exactly its thread must still be running.
    wait_for_threads(1);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(threads_named("tls-reload"), 1);

    drop(server_clone);
    wait_for_threads(0);
}
