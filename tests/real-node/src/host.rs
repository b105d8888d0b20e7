//! The host state a node changes, captured before it starts and put back after it stops, even
//! when the test process died without tearing down (the next start finds the saved snapshot).
//!
//! What a kubelet, kube-proxy, containerd and the bridge CNI plugin change on the host (see
//! `tests/real-node/README.md`): iptables chains, a few sysctls, fixed directories, network
//! namespaces under `/var/run/netns`, the bridge, cgroups under `kubepods`, mounts under the
//! node's directory, and container processes (children of containerd's shims, which outlive
//! containerd).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::Error;

/// Where the snapshot of a running node is kept, so that a later start can undo a node whose
/// test process was killed.
const SNAPSHOT_DIR: &str = "/run/ccm-real-node";
/// The lock that keeps two real nodes off one machine (fixed ports, iptables, cgroups).
pub(crate) const LOCK_FILE: &str = "/run/ccm-real-node.lock";
/// The name of the CNI bridge the node's pods hang off.
pub(crate) const BRIDGE: &str = "ccmcni0";
/// The cgroup the kubelet puts pods under (cgroupRoot `/`, cgroupsPerQOS).
const KUBEPODS: &str = "kubepods";
/// Sysctls the kubelet, kube-proxy and the bridge plugin set.
const SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
];
/// Directories created at fixed places whatever the node's root directory is.
const FIXED_DIRS: &[&str] = &[
    "/var/lib/kubelet",
    "/usr/libexec/kubernetes",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/cni",
    "/opt/cni",
    "/etc/cni",
];
/// Network namespaces the CRI plugin creates are named like this.
const CNI_NETNS_PREFIX: &str = "cni-";
/// Where named network namespaces live.
const NETNS_DIR: &str = "/var/run/netns";

/// The host state before a node started.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    /// The node's directory (mounts under it are undone).
    state_dir: PathBuf,
    /// `(restore command, saved rules)` for iptables and ip6tables.
    iptables: Vec<(String, String)>,
    /// `(path under /proc/sys, value)`.
    sysctls: Vec<(String, String)>,
    /// Fixed directories that did not exist (removed afterwards).
    absent_dirs: Vec<PathBuf>,
    /// Network namespaces that existed (newer `cni-*` ones are removed).
    netns: BTreeSet<String>,
}

impl Snapshot {
    /// Reads the current host state and saves it where a later start finds it.
    pub(crate) fn capture(state_dir: &Path) -> Result<Snapshot, Error> {
        let mut iptables = Vec::new();
        for (save, restore) in [
            ("iptables-save", "iptables-restore"),
            ("ip6tables-save", "ip6tables-restore"),
        ] {
            iptables.push((restore.to_owned(), run(Command::new(save))?));
        }
        let sysctls = SYSCTLS
            .iter()
            .filter_map(|name| {
                let value = std::fs::read_to_string(Path::new("/proc/sys").join(name)).ok()?;
                Some(((*name).to_owned(), value.trim().to_owned()))
            })
            .collect();
        let absent_dirs = FIXED_DIRS
            .iter()
            .map(PathBuf::from)
            .filter(|d| !d.exists())
            .collect();
        let snapshot = Snapshot {
            state_dir: state_dir.to_path_buf(),
            iptables,
            sysctls,
            absent_dirs,
            netns: netns_names(),
        };
        std::fs::create_dir_all(SNAPSHOT_DIR)
            .map_err(Error::io(format!("creating {SNAPSHOT_DIR}")))?;
        let json = serde_json::to_vec(&snapshot)
            .map_err(|e| Error::Machine(format!("encoding the host snapshot: {e}")))?;
        let path = Path::new(SNAPSHOT_DIR).join("snapshot.json");
        std::fs::write(&path, json).map_err(Error::io(format!("writing {}", path.display())))?;
        Ok(snapshot)
    }

    /// The snapshot a node whose test process died left behind, if any.
    pub(crate) fn left_behind() -> Option<Snapshot> {
        let bytes = std::fs::read(Path::new(SNAPSHOT_DIR).join("snapshot.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Undoes everything a node did since the snapshot; every step is tried, failures are
    /// logged and returned together.
    pub(crate) fn restore(&self) -> Vec<String> {
        let mut failures = Vec::new();
        let mut note = |step: &str, result: Result<(), String>| {
            if let Err(e) = result {
                tracing::warn!(step, error = %e, "restoring the host after the real node");
                failures.push(format!("{step}: {e}"));
            }
        };
        note("killing container processes", kill_cgroup_members());
        note("stopping containerd shims", kill_shims(&self.state_dir));
        note("unmounting", unmount_under(&self.state_dir));
        note("removing network namespaces", self.remove_netns());
        note("removing the bridge", remove_bridge());
        for (restore, rules) in &self.iptables {
            note("restoring iptables", restore_iptables(restore, rules));
        }
        for (name, value) in &self.sysctls {
            let path = Path::new("/proc/sys").join(name);
            let now = std::fs::read_to_string(&path).unwrap_or_default();
            if now.trim() != value {
                note(
                    "restoring sysctls",
                    std::fs::write(&path, value).map_err(|e| format!("{}: {e}", path.display())),
                );
            }
        }
        note("removing cgroups", remove_cgroups());
        for dir in &self.absent_dirs {
            if dir.exists() {
                note(
                    "removing directories",
                    std::fs::remove_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display())),
                );
            }
        }
        let _ = std::fs::remove_file(Path::new(SNAPSHOT_DIR).join("snapshot.json"));
        failures
    }

    fn remove_netns(&self) -> Result<(), String> {
        for name in netns_names().difference(&self.netns) {
            if !name.starts_with(CNI_NETNS_PREFIX) {
                continue;
            }
            let path = Path::new(NETNS_DIR).join(name);
            let _ = Command::new("umount").arg(&path).output();
            std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    }
}

fn netns_names() -> BTreeSet<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `command`, returning its stdout or an error with its stderr.
pub(crate) fn run(mut command: Command) -> Result<String, Error> {
    let line = format!("{command:?}");
    let output = command
        .output()
        .map_err(Error::io(format!("running {line}")))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: line,
            detail: format!(
                "{}: {}",
                output.status,
                test_support::last_lines(&String::from_utf8_lossy(&output.stderr), 20)
            ),
        })
    }
}

/// Empties every table, then loads the saved rules: `*-restore` only rewrites the tables its
/// input names, and a host without rules saves none.
fn restore_iptables(restore: &str, rules: &str) -> Result<(), String> {
    use std::io::Write as _;
    let tool = restore.trim_end_matches("-restore");
    for table in ["filter", "nat", "mangle", "raw", "security"] {
        for op in ["-F", "-X"] {
            // A table the kernel does not have is fine to skip.
            let _ = Command::new(tool).args(["-t", table, op]).output();
        }
    }
    let mut child = Command::new(restore)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{restore}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rules.as_bytes())
            .map_err(|e| format!("{restore}: {e}"))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("{restore}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{restore}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Every cgroup hierarchy's `kubepods` directory.
fn kubepods_dirs() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|entries| {
            entries
                .filter_map(|e| Some(e.ok()?.path().join(KUBEPODS)))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// All directories under `root`, deepest first.
fn dirs_deepest_first(root: &Path) -> Vec<PathBuf> {
    let mut all = vec![root.to_path_buf()];
    let mut i = 0;
    while i < all.len() {
        if let Ok(entries) = std::fs::read_dir(&all[i]) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    all.push(entry.path());
                }
            }
        }
        i += 1;
    }
    all.reverse();
    all
}

/// SIGKILLs every process in a `kubepods` cgroup: containers outlive a killed containerd.
fn kill_cgroup_members() -> Result<(), String> {
    let mut pids = BTreeSet::new();
    for root in kubepods_dirs() {
        for dir in dirs_deepest_first(&root) {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(procs.split_whitespace().map(str::to_owned));
            }
        }
    }
    kill_all(&pids)
}

/// SIGKILLs the containerd shims serving this node's containerd (its socket is under `state_dir`).
fn kill_shims(state_dir: &Path) -> Result<(), String> {
    let marker = state_dir.to_string_lossy().into_owned();
    let mut pids = BTreeSet::new();
    for entry in std::fs::read_dir("/proc")
        .map_err(|e| format!("/proc: {e}"))?
        .flatten()
    {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("containerd-shim") && cmdline.contains(&marker) {
            pids.insert(name);
        }
    }
    kill_all(&pids)
}

fn kill_all(pids: &BTreeSet<String>) -> Result<(), String> {
    if pids.is_empty() {
        return Ok(());
    }
    // Through kill(1): the workspace has no unsafe code, so no libc::kill.
    let status = Command::new("kill")
        .arg("-KILL")
        .args(pids)
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("kill: {e}"))?;
    // Some may have exited in the meantime; that is what was wanted.
    let _ = status;
    std::thread::sleep(std::time::Duration::from_millis(200));
    Ok(())
}

/// Unmounts everything mounted under `dir`, deepest first (pod volumes, container root
/// filesystems, sandbox shm).
fn unmount_under(dir: &Path) -> Result<(), String> {
    let prefix = dir.to_string_lossy().into_owned();
    let mounts =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("mountinfo: {e}"))?;
    let mut points: Vec<String> = mounts
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    let mut failed = Vec::new();
    for point in points {
        let ok = Command::new("umount")
            .arg(&point)
            .output()
            .is_ok_and(|o| o.status.success())
            || Command::new("umount")
                .args(["-l", &point])
                .output()
                .is_ok_and(|o| o.status.success());
        if !ok {
            failed.push(point);
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("could not unmount {}", failed.join(", ")))
    }
}

/// `/proc/self/mountinfo` writes space, tab, newline and backslash as octal escapes.
fn unescape_mount_path(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(code) = u8::from_str_radix(&raw[i + 1..i + 4], 8)
        {
            out.push(char::from(code));
            i += 4;
            continue;
        }
        out.push(char::from(bytes[i]));
        i += 1;
    }
    out
}

fn remove_bridge() -> Result<(), String> {
    if Path::new("/sys/class/net").join(BRIDGE).exists() {
        run({
            let mut c = Command::new("ip");
            c.args(["link", "delete", BRIDGE]);
            c
        })
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Removes the `kubepods` cgroups in every hierarchy once their processes are gone.
fn remove_cgroups() -> Result<(), String> {
    let mut left = Vec::new();
    for root in kubepods_dirs() {
        for dir in dirs_deepest_first(&root) {
            if std::fs::remove_dir(&dir).is_err() {
                left.push(dir.display().to_string());
            }
        }
    }
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!("still busy: {}", left.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/a\040b/c"), "/a b/c");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path(r"/end\"), r"/end\");
    }
}
