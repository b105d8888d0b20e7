//! The process wrapper with real child processes: the program's pid, output, environment and
//! exit status come through the watchdog, and the program dies with the test process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use test_support::{Location, Process, process_alive, temp_dir, wait_for};

/// Set in the child process of `programs_die_with_a_killed_test_process`.
const HELPER_ENV: &str = "TEST_SUPPORT_PROCESS_HOLDER";

fn shell(dir: &std::path::Path, name: &str, script: &str) -> Process {
    Process::builder(name, "/bin/sh", dir.join(format!("{name}.log")))
        .args(["-c", script])
        .envs([("GREETING", "hello")])
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn output_environment_and_exit_status_are_the_programs() {
    let dir = temp_dir("ccm-support-process-", Location::System).unwrap();
    let p = shell(
        dir.path(),
        "exits",
        r#"echo "out $GREETING"; echo err >&2; exit 3"#,
    );
    let status = wait_for("the program to exit", Duration::from_secs(10), || {
        std::future::ready(p.exit_status().ok_or_else(|| "still running".to_owned()))
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(3));
    assert_eq!(p.logs(), "out hello\nerr\n");
    assert_eq!(p.log_tail(1), "err");
    assert_eq!(p.name(), "exits");
}

#[tokio::test]
async fn terminate_and_kill_reach_the_program_itself() {
    let dir = temp_dir("ccm-support-process-", Location::System).unwrap();
    let term = shell(dir.path(), "term", "exec sleep 300");
    let kill = shell(dir.path(), "kill", "exec sleep 300");
    assert!(process_alive(term.pid()) && process_alive(kill.pid()));
    assert_eq!(term.exit_status(), None);

    let status = term
        .terminate(Duration::from_secs(5))
        .expect("exits on SIGTERM");
    assert_eq!(status.signal(), Some(15), "{status}");
    kill.kill();
    assert_eq!(kill.exit_status().and_then(|s| s.signal()), Some(9));
    assert!(!process_alive(term.pid()) && !process_alive(kill.pid()));
}

#[tokio::test]
async fn dropping_stops_the_program() {
    let dir = temp_dir("ccm-support-process-", Location::System).unwrap();
    let p = shell(dir.path(), "dropped", "exec sleep 300");
    let pid = p.pid();
    drop(p);
    assert!(!process_alive(pid));
    assert!(
        dir.path().is_dir(),
        "only an orphaned watchdog removes the directory"
    );
}

/// Runs only inside the child process of `programs_die_with_a_killed_test_process`: starts a
/// program, reports it on stdout, and waits to be killed.
#[test]
#[ignore = "helper process for programs_die_with_a_killed_test_process"]
fn hold_a_program_until_killed() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let dir = temp_dir("ccm-support-orphan-", Location::System).unwrap();
    let p = Process::builder("held", "sleep", dir.path().join("held.log"))
        .args(["300"])
        .remove_when_orphaned(dir.path())
        .spawn()
        .unwrap();
    println!("HOLDING {} {}", p.pid(), dir.path().display());
    std::thread::sleep(Duration::from_secs(300));
}

#[tokio::test]
async fn programs_die_with_a_killed_test_process() {
    let mut holder = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "hold_a_program_until_killed", "--ignored"])
        .args(["--nocapture"])
        .env(HELPER_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let line = BufReader::new(holder.stdout.take().unwrap())
        .lines()
        .map(Result::unwrap)
        .find(|l| l.starts_with("HOLDING "))
        .expect("helper reports its program");
    let (pid, dir) = line["HOLDING ".len()..].split_once(' ').unwrap();
    let (pid, dir): (u32, PathBuf) = (pid.parse().unwrap(), dir.into());
    assert!(process_alive(pid) && dir.is_dir());

    holder.kill().unwrap(); // SIGKILL: no destructor runs in the helper.
    holder.wait().unwrap();

    let gone = || {
        if process_alive(pid) {
            Err(format!("{pid} still running"))
        } else if dir.exists() {
            Err(format!("{} still exists", dir.display()))
        } else {
            Ok(())
        }
    };
    // The program gets SIGTERM within the watchdog's 0.5 s poll, SIGKILL 2 s later at most.
    wait_for(
        "the orphaned program to die and its directory to be removed",
        Duration::from_secs(10),
        || std::future::ready(gone()),
    )
    .await
    .unwrap();
}
