//! The Kubernetes side of the manager: the API clients, Events, the shared Node watch and its
//! compact cache, the Service watch and its compact cache, the watches' counters, and the API's well-known label,
//! taint, annotation, finalizer and condition names.

mod cached_node;
mod cached_service;
mod client;
pub mod events;
mod informer;
mod watch_metrics;
pub mod well_known;

/// `text` cut to at most `max` bytes on a character boundary, marked when cut: error texts
/// from a provider or the API server are unbounded, the objects we write them into are not.
pub fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max.saturating_sub(3);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

pub use cached_node::{CachedNode, Labels};
pub use cached_service::{CachedService, ServiceChange, ServiceInformer, services};
pub use client::{ClientError, ClientMetrics, build_clients, load_config, nodes, send_write};
pub use events::{EventBroadcaster, EventType, Recorder};
pub use informer::NodeInformer;
pub use watch_metrics::WatchMetrics;
