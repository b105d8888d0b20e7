//! [`Netns`]: a network namespace made for one test, with `ip` for setting it up and reading
//! its routing tables (the product itself programs routes over netlink; tests check the result
//! with the same tool an operator would).

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::Error;
use crate::process::process_alive;

/// The prefix of every namespace this crate makes: `ccm-t-<pid>-<n>`.
const PREFIX: &str = "ccm-t-";

/// A network namespace with its loopback up, deleted when dropped. Needs root (or
/// `CAP_SYS_ADMIN` and `CAP_NET_ADMIN`) and iproute2's `ip`.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Makes a fresh namespace; first removes namespaces left by test processes that died
    /// without dropping theirs.
    pub fn create() -> Result<Self, Error> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        remove_orphans();
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(&["netns", "add", &name])?;
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// Its name, as `ip netns` and the shim's `--route-netns` take it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <name> <args>` and returns its standard output.
    pub fn ip(&self, args: &[&str]) -> Result<String, Error> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Adds an interface `ifname`, up, with `addresses` (CIDR notation): node addresses
    /// inside them are reachable next hops. It is one end of a veth pair whose other end
    /// (`<ifname>p`) is up in the same namespace: these machines' kernels have no dummy links.
    pub fn add_link(&self, ifname: &str, addresses: &[&str]) -> Result<(), Error> {
        let peer = format!("{ifname}p");
        self.ip(&["link", "add", ifname, "type", "veth", "peer", "name", &peer])?;
        self.ip(&["link", "set", &peer, "up"])?;
        for address in addresses {
            // IPv6 addresses would otherwise be tentative (unusable) until DAD finishes.
            let mut args = vec!["addr", "add", address, "dev", ifname];
            if address.contains(':') {
                args.push("nodad");
            }
            self.ip(&args)?;
        }
        self.ip(&["link", "set", ifname, "up"])?;
        Ok(())
    }

    /// The IPv4 and IPv6 routes of routing table `table`, one `ip route` line each (a family
    /// whose table does not exist yet has none).
    pub fn routes(&self, table: &str) -> Result<Vec<String>, Error> {
        let mut lines = Vec::new();
        for family in ["-4", "-6"] {
            let out = match self.ip(&[family, "route", "show", "table", table]) {
                Ok(out) => out,
                Err(Error::Command { stderr, .. }) if stderr.contains("table does not exist") => {
                    continue;
                }
                Err(e) => return Err(e),
            };
            lines.extend(out.lines().map(|l| l.trim().to_string()));
        }
        Ok(lines)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run(&["netns", "del", &self.name]) {
            eprintln!("test-support: could not delete network namespace: {e}");
        }
    }
}

/// Deletes `ccm-t-<pid>-*` namespaces whose process is gone.
fn remove_orphans() {
    let Ok(listing) = run(&["netns", "list"]) else {
        return;
    };
    for line in listing.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !process_alive(pid) {
            let _ = run(&["netns", "del", name]);
        }
    }
}

fn run(args: &[&str]) -> Result<String, Error> {
    let context = format!("ip {}", args.join(" "));
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(Error::io(format!(
            "{context} (iproute2's `ip` is needed: install Debian's iproute2 package)"
        )))?;
    if !output.status.success() {
        return Err(Error::Command {
            command: context,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_namespace_has_its_link_routes_and_goes_away_when_dropped() {
        let netns = Netns::create().unwrap();
        let name = netns.name().to_string();
        netns
            .add_link("ccm0", &["10.99.0.1/16", "fd99::1/64"])
            .unwrap();
        let routes = netns.routes("main").unwrap();
        assert!(
            routes
                .iter()
                .any(|r| r.starts_with("10.99.0.0/16 dev ccm0")),
            "{routes:?}"
        );
        assert!(
            routes.iter().any(|r| r.starts_with("fd99::/64 dev ccm0")),
            "{routes:?}"
        );
        assert!(netns.routes("200").unwrap().is_empty());
        drop(netns);
        let listing = run(&["netns", "list"]).unwrap();
        assert!(!listing.contains(&name), "{name} still listed: {listing}");
    }
}
