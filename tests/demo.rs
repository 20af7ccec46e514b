//! `marquee demo` runs with nothing installed and prints its first window within 15 seconds.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[test]
fn demo_prints_a_closed_window_within_15_seconds() {
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_marquee"))
        .args([
            "demo",
            "--rate",
            "500",
            "--http",
            &format!("127.0.0.1:{port}"),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("marquee demo starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let viewers = |line: &str| -> u64 {
        line.split("viewers")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("viewers count in {line:?}"))
    };
    // The first window may have begun before the generator did and hold only session starts
    // (0 viewers, correctly): wait for one with viewers.
    let mut windows = Vec::new();
    while started.elapsed() < Duration::from_secs(15) {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            if line.contains(" window 5s ") && line.contains("viewers") {
                let watched = viewers(&line) > 0;
                windows.push(line);
                if watched {
                    break;
                }
            }
        }
    }
    // SIGTERM: the demo stops cleanly.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(
        windows.last().is_some_and(|l| viewers(l) > 0),
        "a closed window with viewers printed within 15 s of start: {windows:?}"
    );
    assert!(status.success(), "demo exits cleanly on SIGTERM: {status}");
}
