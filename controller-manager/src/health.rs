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

    /// Runs the checks of `scopes`; returns (all ok, verbose report).
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
                Ok(()) => report.push_str(&format!("[+]{name} ok\n")),
                Err(reason) => {
                    ok = false;
                    report.push_str(&format!("[-]{name} failed: {reason}\n"));
                }
            }
        }
        (ok, report)
    }
}
