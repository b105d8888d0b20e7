//! Child processes that cannot outlive the test process.
//!
//! Each program runs under a small `sh` watchdog (no `unsafe`, so no `prctl(PR_SET_PDEATHSIG)`):
//! the watchdog starts the program in the background, reports its pid on a pipe, and polls every
//! 0.5 s whether the test process is still its parent. As soon as it is not (the test binary
//! exited, panicked at exit, or was killed with SIGKILL), the watchdog sends SIGTERM, then
//! SIGKILL after 2 s, and removes the directory given to
//! [`ProcessBuilder::remove_when_orphaned`]. `test-control-plane`'s shared control plane, which
//! is never dropped, relies on this; a dropped [`Process`] is stopped by [`Drop`].

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::Error;

/// `sh -c` script: `$1` = test pid, `$2` = dir to remove when orphaned (or empty), `$3…` = the
/// program's command line. Its stdout (a pipe) carries the program's pid and is then closed; the
/// program's output goes to the watchdog's stderr, the log file.
const WATCHDOG: &str = r#"
parent=$1 cleanup=$2
shift 2
"$@" </dev/null >&2 &
child=$!
echo "$child"
exec >/dev/null
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
if [ -n "$cleanup" ] && orphaned; then rm -rf "$cleanup"; fi
# A program ended by SIGHUP, SIGINT, SIGKILL or SIGTERM: end the same way, so that the exit
# status seen by the test is the program's own, not the shell's 128+N.
case $status in
  129|130|137|143) trap - INT TERM HUP; kill -$((status - 128)) $$ ;;
esac
exit "$status"
"#;

/// How long a program gets between SIGTERM and SIGKILL when it is dropped, and after SIGKILL.
const GRACE: Duration = Duration::from_secs(2);

/// A program running under the watchdog; stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Process {
    name: String,
    /// The watchdog shell; its exit status is the program's.
    watchdog: Mutex<Child>,
    pid: u32,
    log: PathBuf,
    show_log_on_panic: bool,
}

/// How to start a [`Process`]: its command line, environment and log file.
#[derive(Debug, Clone)]
#[must_use]
pub struct ProcessBuilder {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    log: PathBuf,
    cleanup: Option<PathBuf>,
    show_log_on_panic: bool,
}

impl ProcessBuilder {
    /// Appends command-line arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets environment variables (later ones win), on top of the test process's environment.
    pub fn envs<I, K, V>(mut self, env: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        self.env.extend(
            env.into_iter()
                .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned())),
        );
        self
    }

    /// Has the watchdog remove `dir` once it has stopped the program because the test process
    /// went away (a dropped [`Process`] leaves `dir` to its owner).
    pub fn remove_when_orphaned(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cleanup = Some(dir.into());
        self
    }

    /// Starts the program under the watchdog, its stdout and stderr written to the log file.
    pub fn spawn(self) -> Result<Process, Error> {
        let log = File::create(&self.log)
            .map_err(Error::io(format!("creating {}", self.log.display())))?;
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg(format!("{}-watchdog", self.name))
            .arg(std::process::id().to_string())
            .arg(self.cleanup.as_deref().unwrap_or(Path::new("")))
            .arg(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(Error::io(format!(
                "spawning {} ({}) under sh",
                self.name,
                self.program.display()
            )))?;
        // The watchdog prints the pid right after the fork and closes the pipe, so this read
        // ends at once; only a watchdog that cannot fork ends it without a pid.
        let pid = watchdog.stdout.take().and_then(|out| {
            let mut line = String::new();
            BufReader::new(out).read_line(&mut line).ok()?;
            line.trim().parse::<u32>().ok()
        });
        let Some(pid) = pid else {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
            return Err(Error::Watchdog {
                tail: log_tail(&self.log, 30),
                name: self.name,
                log: self.log,
            });
        };
        Ok(Process {
            name: self.name,
            watchdog: Mutex::new(watchdog),
            pid,
            log: self.log,
            show_log_on_panic: self.show_log_on_panic,
        })
    }
}

impl Process {
    /// A builder for `program`, called `name` in messages, logging to the file `log`.
    pub fn builder(
        name: impl Into<String>,
        program: impl Into<PathBuf>,
        log: impl Into<PathBuf>,
    ) -> ProcessBuilder {
        ProcessBuilder {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            log: log.into(),
            cleanup: None,
            show_log_on_panic: false,
        }
    }

    /// A builder for the workspace binary `binary` (see [`workspace_binary`]) called `label`,
    /// logging to `<log_dir>/<label>.log`, with `RUST_LOG=info` unless [`ProcessBuilder::envs`]
    /// says otherwise; its log is printed when it is dropped by a panicking test.
    pub fn for_workspace_binary(
        binary: &str,
        label: &str,
        log_dir: &Path,
    ) -> Result<ProcessBuilder, Error> {
        let mut builder = Self::builder(
            label,
            workspace_binary(binary)?,
            log_dir.join(format!("{label}.log")),
        )
        .envs([("RUST_LOG", "info")]);
        builder.show_log_on_panic = true;
        Ok(builder)
    }

    /// The name given to the builder.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The program's (not the watchdog's) process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The log file (the program's stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the program has logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the log (reading at most its last 64 KiB), or why it could not
    /// be read.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// The exit status once the program (and so its watchdog) has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.lock().try_wait().ok().flatten()
    }

    /// Kills the program hard (SIGKILL), as a crashed machine would, and reaps it.
    pub fn kill(&self) {
        self.stop("KILL", GRACE);
    }

    /// Asks the program to stop (SIGTERM) and waits up to `grace` for it; its exit status if it
    /// exited by then, else `None` after killing it.
    pub fn terminate(&self, grace: Duration) -> Option<ExitStatus> {
        self.stop("TERM", grace)
    }

    fn lock(&self) -> MutexGuard<'_, Child> {
        self.watchdog.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `SIG<first>`, waits `grace`, then SIGKILL; `Some` if the first signal was enough.
    fn stop(&self, first: &str, grace: Duration) -> Option<ExitStatus> {
        let mut watchdog = self.lock();
        if let Ok(Some(status)) = watchdog.try_wait() {
            return Some(status); // Already gone; its pid may have been reused, so send nothing.
        }
        signal(self.pid, first);
        if let Some(status) = reaped(&mut watchdog, grace) {
            return Some(status);
        }
        signal(self.pid, "KILL");
        if reaped(&mut watchdog, GRACE).is_none() {
            // The watchdog itself is stuck: kill it; its poller then notices the lost parent
            // link and takes the program down.
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.exit_status().is_none() {
            self.terminate(GRACE);
        }
        if self.show_log_on_panic && std::thread::panicking() {
            eprintln!("---- logs of {} ----\n{}", self.name, self.logs());
        }
    }
}

/// Polls `child` until it exits or `timeout` passes; its exit status if it exited.
fn reaped(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) | Err(_) => return None,
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

/// Path of a binary of this workspace: next to the running executable, or one directory up
/// from a test executable in `target/<profile>/deps/`.
pub fn workspace_binary(name: &str) -> Result<PathBuf, Error> {
    let exe = std::env::current_exe().map_err(Error::io("locating the running executable"))?;
    let here = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let candidates = [
        here.join(name),
        here.parent().map(|p| p.join(name)).unwrap_or_default(),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| Error::MissingBinary {
            name: name.into(),
            path: candidates[1].clone(),
        })
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

/// The last `lines` lines of a log file (reads at most its last 64 KiB), or what kept it from
/// being read.
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
    let tail = last_lines(&String::from_utf8_lossy(&buf), lines);
    if tail.is_empty() {
        "(log is empty)".to_owned()
    } else {
        tail
    }
}

/// The last `lines` lines of `text`.
pub fn last_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn log_tail_and_process_alive() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        let text: String = (1..=100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text).unwrap();
        assert_eq!(log_tail(&log, 3), "line 98\nline 99\nline 100");
        assert!(log_tail(&dir.path().join("missing"), 3).contains("cannot read"));
        assert!(process_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
    }
}
