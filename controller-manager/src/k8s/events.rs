//! Kubernetes Events as upstream controllers emit them: `core/v1` Events with
//! `source.component` set to the controller's component name, in the object's namespace (or
//! `default` for cluster-scoped objects such as Nodes, which every server version accepts).
//!
//! Repeats of the same (object, type, reason, message) within [`AGGREGATION_WINDOW`] bump the
//! existing Event's `count` instead of creating a new object, so a failing reconcile cannot
//! flood the API server.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use tokio::sync::Mutex;
use tracing::warn;

use super::client::send_write;

/// Request builder for core/v1 Events of one namespace.
fn events_in(namespace: &str) -> kube::core::Request {
    kube::core::Request::new(format!("/api/v1/namespaces/{namespace}/events"))
}

/// Repeats within this window are aggregated into one Event.
pub const AGGREGATION_WINDOW: Duration = Duration::from_secs(600);

/// Severity of an Event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// Expected behaviour.
    Normal,
    /// Something needs attention.
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "Normal",
            Self::Warning => "Warning",
        }
    }
}

#[derive(Hash, PartialEq, Eq, Clone)]
struct Key {
    uid: String,
    name: String,
    type_: EventType,
    reason: String,
    message: String,
}

/// Most aggregation entries kept: each initialised node leaves one `Synced` entry, and a large
/// cluster must not turn the aggregation cache into a per-node memory cost.
const MAX_ENTRIES: usize = 1024;

/// How often expired aggregation entries are dropped (not on every event: that made recording
/// quadratic in the number of recent events).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

struct Seen {
    namespace: String,
    event_name: String,
    count: i32,
    last: Instant,
}

/// Emits Events for one controller.
#[derive(Clone)]
pub struct Recorder {
    client: kube::Client,
    component: String,
    instance: String,
    seen: Arc<Mutex<Aggregation>>,
}

#[derive(Default)]
struct Aggregation {
    entries: HashMap<Key, Seen>,
    last_prune: Option<Instant>,
}

impl Aggregation {
    fn prune(&mut self) {
        if self.last_prune.is_some_and(|at| at.elapsed() < PRUNE_EVERY) {
            return;
        }
        self.entries
            .retain(|_, s| s.last.elapsed() < AGGREGATION_WINDOW);
        self.last_prune = Some(Instant::now());
    }
}

impl Recorder {
    /// A recorder whose Events carry `source.component = component`.
    pub fn new(client: kube::Client, component: &str, instance: &str) -> Self {
        Self {
            client,
            component: component.to_string(),
            instance: instance.to_string(),
            seen: Arc::default(),
        }
    }

    /// Records an Event about `object`; failures are logged, never propagated, because an
    /// Event must not change the outcome of a reconcile.
    pub async fn record(
        &self,
        object: &ObjectReference,
        type_: EventType,
        reason: &str,
        message: &str,
    ) {
        if let Err(err) = self.try_record(object, type_, reason, message).await {
            warn!(error = %err, reason, "failed to record event");
        }
    }

    /// Records an Event, returning API errors.
    async fn try_record(
        &self,
        object: &ObjectReference,
        type_: EventType,
        reason: &str,
        message: &str,
    ) -> Result<(), kube::Error> {
        let key = Key {
            uid: object.uid.clone().unwrap_or_default(),
            name: object.name.clone().unwrap_or_default(),
            type_,
            reason: reason.to_string(),
            message: message.to_string(),
        };
        let now = Timestamp::now();
        // The lock is never held across an API call: events of different objects are written
        // concurrently.
        let repeat = {
            let mut seen = self.seen.lock().await;
            seen.prune();
            seen.entries
                .get_mut(&key)
                .filter(|entry| entry.last.elapsed() < AGGREGATION_WINDOW)
                .map(|entry| {
                    entry.count += 1;
                    entry.last = Instant::now();
                    (
                        entry.namespace.clone(),
                        entry.event_name.clone(),
                        entry.count,
                    )
                })
        };
        if let Some((namespace, event_name, count)) = repeat {
            let patch = serde_json::json!({ "count": count, "lastTimestamp": Time(now) });
            let request = events_in(&namespace).patch(
                &event_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            );
            match send_write(&self.client, request).await {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    self.seen.lock().await.entries.remove(&key);
                }
                Err(err) => return Err(err),
            }
        }
        let namespace = object
            .namespace
            .clone()
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(|| "default".to_string());
        let event_name = format!(
            "{}.{:x}",
            object.name.as_deref().unwrap_or("object"),
            now.as_nanosecond()
        );
        let event = Event {
            metadata: ObjectMeta {
                name: Some(event_name.clone()),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            involved_object: object.clone(),
            reason: Some(reason.to_string()),
            message: Some(message.to_string()),
            type_: Some(type_.as_str().to_string()),
            source: Some(EventSource {
                component: Some(self.component.clone()),
                host: None,
            }),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: None::<MicroTime>,
            count: Some(1),
            reporting_component: Some(self.component.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        let body = serde_json::to_vec(&event).map_err(kube::Error::SerdeError)?;
        send_write(
            &self.client,
            events_in(&namespace).create(&PostParams::default(), body),
        )
        .await?;
        let mut seen = self.seen.lock().await;
        if seen.entries.len() >= MAX_ENTRIES
            && let Some(oldest) = seen
                .entries
                .iter()
                .min_by_key(|(_, s)| s.last)
                .map(|(k, _)| k.clone())
        {
            seen.entries.remove(&oldest);
        }
        seen.entries.insert(
            key,
            Seen {
                namespace,
                event_name,
                count: 1,
                last: Instant::now(),
            },
        );
        Ok(())
    }
}
