//! The per-test deadline ([`rmig_tests::Deadline`]) turns a hang into a failure: checked by
//! running a test that hangs in a child process and watching it die, with the test's name.

use std::process::Command;
use std::time::{Duration, Instant};

use rmig_tests::Deadline;

#[test]
fn hangs_past_its_deadline_when_asked_to() {
    // Only in the child started below: hangs with a one-second deadline.
    if std::env::var_os("RMIG_TEST_HANG").is_none() {
        return;
    }
    let _deadline = Deadline::secs(1);
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn a_hanging_test_is_aborted_with_its_name() {
    let t = Instant::now();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "hangs_past_its_deadline_when_asked_to",
            "--nocapture",
        ])
        .env("RMIG_TEST_HANG", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The child's own deadline is one second; ours for it is thirty.
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the deadline did not end the hanging test");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{status:?}");
    assert!(
        err.contains("hangs_past_its_deadline_when_asked_to: still running after its deadline"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

#[test]
fn a_deadline_dropped_in_time_does_nothing() {
    let t = Instant::now();
    drop(Deadline::secs(1));
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "disarming is prompt"
    );
}
