//! The Kubernetes side of the manager: names of the API's well-known labels, taints and
//! conditions.

pub mod well_known;
