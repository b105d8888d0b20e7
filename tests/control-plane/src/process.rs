//! Server processes that cannot outlive the test process.
//!
//! Each server runs under a small `sh` watchdog (no `unsafe`, so no `prctl(PR_SET_PDEATHSIG)`):
//! the watchdog starts the server in the background, records its pid, and polls every 0.5 s
//! whether the test process is still its parent. As soon as it is not (the test binary exited,
//! panicked at exit, or was killed with SIGKILL), the watchdog sends SIGTERM, then SIGKILL after
//! 2 s, and removes the control plane's state directory. The `static` shared control plane,
//! which is never dropped, relies on this; dropped instances are stopped by [`Drop`].

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::Error;

/// `sh -c` script: `$1` = test pid, `$2` = pid file, `$3` = dir to remove when orphaned,
/// `$4…` = the server command line.
const WATCHDOG: &str = r#"
parent=$1 pidfile=$2 cleanup=$3
shift 3
"$@" </dev/null &
child=$!
echo "$child" >"$pidfile.tmp" && mv "$pidfile.tmp" "$pidfile"
orphaned() {
  kill -0 "$parent" 2>/dev/null || return 0
  read -r _ _ _ ppid _ </proc/$$/stat 2>/dev/null || return 0
  [ "$ppid" != "$parent" ]
}
(
  while ! orphaned; do sleep 0.5; done
  kill -TERM "$child" 2>/dev/null
  sleep 2
  kill -KILL "$child" 2>/dev/null
) &
watchdog=$!
trap 'kill -TERM "$child" 2>/dev/null' INT TERM HUP
while :; do
  wait "$child"
  status=$?
  kill -0 "$child" 2>/dev/null || break
done
kill "$watchdog" 2>/dev/null
if orphaned; then rm -rf "$cleanup"; fi
exit "$status"
"#;

/// How long a server gets between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(2);

/// One server (etcd or kube-apiserver) running under the watchdog.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    name: &'static str,
    /// The watchdog shell; its exit status is the server's.
    wrapper: Mutex<Child>,
    pid: u32,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts `program args…` under the watchdog, output appended to `log`.
    pub(crate) async fn spawn(
        name: &'static str,
        program: &Path,
        args: &[OsString],
        log: &Path,
        cleanup_dir: &Path,
    ) -> Result<ServerProcess, Error> {
        let out = File::create(log).map_err(Error::io(format!("creating {}", log.display())))?;
        let err = out.try_clone().map_err(Error::io(format!(
            "duplicating handle of {}",
            log.display()
        )))?;
        let pid_file = log.with_extension("pid");
        let child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg(format!("ccm-test-{name}-watchdog"))
            .arg(std::process::id().to_string())
            .arg(&pid_file)
            .arg(cleanup_dir)
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(Error::io(format!(
                "spawning {name} ({}) under sh",
                program.display()
            )))?;
        let mut process = ServerProcess {
            name,
            wrapper: Mutex::new(child),
            pid: 0,
            log: log.to_path_buf(),
        };
        // The pid file appears right after the fork; a watchdog that cannot even fork exits.
        const PID_FILE_TIMEOUT: Duration = Duration::from_secs(10);
        let deadline = Instant::now() + PID_FILE_TIMEOUT;
        loop {
            if let Ok(text) = std::fs::read_to_string(&pid_file)
                && let Ok(pid) = text.trim().parse()
            {
                process.pid = pid;
                return Ok(process);
            }
            if let Some(status) = process.exit_status() {
                return Err(process.exited_early(status));
            }
            if Instant::now() > deadline {
                return Err(process.not_ready(
                    PID_FILE_TIMEOUT,
                    format!("no pid file {} from the watchdog", pid_file.display()),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The server's (not the watchdog's) process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// The server's log file.
    pub(crate) fn log(&self) -> &Path {
        &self.log
    }

    /// The exit status if the server (and so its watchdog) has exited.
    pub(crate) fn exit_status(&self) -> Option<ExitStatus> {
        let mut wrapper = self.wrapper.lock().unwrap_or_else(|p| p.into_inner());
        wrapper.try_wait().ok().flatten()
    }

    /// The error for a server that exited during start-up.
    pub(crate) fn exited_early(&self, status: ExitStatus) -> Error {
        Error::ExitedEarly {
            process: self.name,
            status: status.to_string(),
            log: self.log.clone(),
            tail: log_tail(&self.log, 30),
        }
    }

    /// The error for a server that did not become ready in `waited`.
    pub(crate) fn not_ready(&self, waited: Duration, last_check: String) -> Error {
        Error::NotReady {
            process: self.name,
            waited,
            last_check,
            log: self.log.clone(),
            tail: log_tail(&self.log, 30),
        }
    }

    /// Stops the server: SIGTERM, SIGKILL after the grace period, then reaps the watchdog.
    pub(crate) fn stop(&self) {
        let mut wrapper = self.wrapper.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(wrapper.try_wait(), Ok(Some(_))) {
            return; // Already gone; its pid may have been reused, so send nothing.
        }
        if self.pid != 0 {
            signal(self.pid, "TERM");
            if wait_for(&mut wrapper, GRACE) {
                return;
            }
            signal(self.pid, "KILL");
            if wait_for(&mut wrapper, GRACE) {
                return;
            }
        }
        // The watchdog itself is stuck (or never reported a pid): kill it; its poller then
        // notices the lost parent link and takes the server down.
        let _ = wrapper.kill();
        let _ = wrapper.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `child` until it exits or `timeout` passes; true if it exited.
fn wait_for(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Sends `SIG<sig>` to `pid` through the shell's `kill` builtin (no `unsafe` libc call).
fn signal(pid: u32, sig: &str) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(r#"kill -s "$1" "$2" 2>/dev/null"#)
        .arg("sh")
        .arg(sig)
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether a process with this pid exists and is not a zombie (Linux `/proc`).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain ") ".
        Ok(stat) => stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// The last `lines` lines of a log file (reads at most its last 64 KiB).
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    const MAX: u64 = 64 * 1024;
    let mut buf = Vec::new();
    let read = File::open(path).and_then(|mut f| {
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(MAX)))?;
        f.read_to_end(&mut buf)
    });
    if let Err(e) = read {
        return format!("(cannot read {}: {e})", path.display());
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    let tail = &all[all.len().saturating_sub(lines)..];
    if tail.is_empty() {
        "(log is empty)".to_owned()
    } else {
        tail.join("\n")
    }
}
