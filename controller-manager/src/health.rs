//! Named health checks behind `/healthz`, `/readyz` and `/livez`.

use std::sync::{Arc, RwLock};

/// Which endpoints a health check contributes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `/livez` and `/healthz`: failing means "restart me".
    Live,
    /// `/readyz` and `/healthz`: failing means "don't count on me yet".
    Ready,
}

/// A named health check.
pub type Check = Arc<dyn Fn() -> Result<(), Unhealthy> + Send + Sync>;

/// Why a health check fails, as shown in the verbose report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unhealthy(pub String);

/// The set of registered health checks.
#[derive(Default, Clone)]
pub struct Health {
    checks: Arc<RwLock<Vec<(String, Scope, Check)>>>,
    /// The last failure reason logged per check, so each change is logged once.
    logged: Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
}

impl Health {
    /// Registers a check.
    pub fn add(&self, name: &str, scope: Scope, check: Check) {
        // Checks are only ever pushed whole, so a poisoned list is still a consistent one.
        self.checks
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((name.to_string(), scope, check));
    }

    /// Runs the checks of `scopes`; returns (all ok, verbose report). As upstream's healthz,
    /// the report says which check failed but withholds why (anyone may ask); the reason is
    /// logged instead, once each time it changes.
    pub fn evaluate(&self, scopes: &[Scope]) -> (bool, String) {
        let mut ok = true;
        let mut report = String::new();
        let checks = self
            .checks
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (name, scope, check) in checks.iter() {
            if !scopes.contains(scope) {
                continue;
            }
            match check() {
                Ok(()) => {
                    report.push_str(&format!("[+]{name} ok\n"));
                    self.log_change(name, None);
                }
                Err(reason) => {
                    ok = false;
                    report.push_str(&format!("[-]{name} failed: reason withheld\n"));
                    self.log_change(name, Some(&reason));
                }
            }
        }
        (ok, report)
    }

    fn log_change(&self, name: &str, failure: Option<&Unhealthy>) {
        // Entries are replaced whole: a poisoned map is still consistent.
        let mut logged = self
            .logged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match failure {
            Some(reason) if logged.get(name) != Some(&reason.0) => {
                tracing::warn!(check = name, reason = %reason, "health check failing");
                logged.insert(name.to_string(), reason.0.clone());
            }
            None if logged.remove(name).is_some() => {
                tracing::info!(check = name, "health check passing again");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_reasons_are_withheld_from_the_report() {
        let health = Health::default();
        health.add("ok", Scope::Live, Arc::new(|| Ok(())));
        health.add(
            "shim",
            Scope::Ready,
            Arc::new(|| Err(Unhealthy("dial unix /run/secret.sock: refused".into()))),
        );
        let (ok, report) = health.evaluate(&[Scope::Live, Scope::Ready]);
        assert!(!ok);
        assert_eq!(report, "[+]ok ok\n[-]shim failed: reason withheld\n");
        let (live, _) = health.evaluate(&[Scope::Live]);
        assert!(live);
    }
}
