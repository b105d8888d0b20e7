//! The generic cloud-controller-manager: watches the API server and drives a provider shim over the CPI.
