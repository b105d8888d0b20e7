//! Counters of the shared watches: what each delivered and how often it failed, so that a watch
//! that stopped delivering can be told apart from a cluster where nothing changes.

use futures::{Stream, StreamExt as _};
use kube::runtime::watcher;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Labels of `ccm_watch_events_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    /// The watched resource (`nodes`, `services`).
    resource: &'static str,
    /// What the watch delivered (see [`event_name`]).
    event: &'static str,
}

/// Labels of `ccm_watch_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    /// The watched resource.
    resource: &'static str,
}

/// `ccm_watch_events_total{resource,event}` and `ccm_watch_errors_total{resource}`. The default
/// value counts into metrics no registry serves (tests that need no scrape).
#[derive(Clone, Debug, Default)]
pub struct WatchMetrics {
    events: Family<EventLabels, Counter>,
    errors: Family<ResourceLabels, Counter>,
}

impl WatchMetrics {
    /// Creates the metrics and registers them in `registry` under the `ccm_` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let ours = registry.sub_registry_with_prefix("ccm");
        ours.register(
            "watch_events",
            "Events delivered by the manager's shared watches, by resource and event (apply and delete while watching; init, init_apply and init_done for each (re)list).",
            metrics.events.clone(),
        );
        ours.register(
            "watch_errors",
            "Failed watch or list requests of the manager's shared watches, each retried with backoff.",
            metrics.errors.clone(),
        );
        metrics
    }

    /// `stream` (a watcher's) with each of its events and errors counted for `resource`, as it
    /// is read: the one place both watches are counted, so they count alike.
    pub(crate) fn counted<K, S>(
        &self,
        resource: &'static str,
        stream: S,
    ) -> impl Stream<Item = S::Item> + use<K, S>
    where
        S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    {
        let metrics = self.clone();
        stream.inspect(move |item| match item {
            Ok(event) => metrics.event(resource, event),
            Err(_) => metrics.error(resource),
        })
    }

    /// Counts one event of `resource`'s watch.
    fn event<K>(&self, resource: &'static str, event: &watcher::Event<K>) {
        self.events
            .get_or_create(&EventLabels {
                resource,
                event: event_name(event),
            })
            .inc();
    }

    /// Counts one failed request of `resource`'s watch.
    fn error(&self, resource: &'static str) {
        self.errors
            .get_or_create(&ResourceLabels { resource })
            .inc();
    }
}

/// The `event` label of a watcher event.
fn event_name<K>(event: &watcher::Event<K>) -> &'static str {
    match event {
        watcher::Event::Apply(_) => "apply",
        watcher::Event::Delete(_) => "delete",
        watcher::Event::Init => "init",
        watcher::Event::InitApply(_) => "init_apply",
        watcher::Event::InitDone => "init_done",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn events_and_errors_are_counted_per_resource_and_event() {
        let mut registry = Registry::default();
        let metrics = WatchMetrics::register(&mut registry);
        let services = futures::stream::iter([
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(())),
            Ok(watcher::Event::InitApply(())),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(())),
        ]);
        let nodes = futures::stream::iter([
            Ok(watcher::Event::Delete(())),
            Err(watcher::Error::NoResourceVersion),
        ]);
        // Every item is passed on as it was.
        assert_eq!(metrics.counted("services", services).count().await, 5);
        assert_eq!(metrics.counted("nodes", nodes).count().await, 2);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"ccm_watch_events_total{resource="services",event="init"} 1"#,
            r#"ccm_watch_events_total{resource="services",event="init_apply"} 2"#,
            r#"ccm_watch_events_total{resource="services",event="init_done"} 1"#,
            r#"ccm_watch_events_total{resource="services",event="apply"} 1"#,
            r#"ccm_watch_events_total{resource="nodes",event="delete"} 1"#,
            r#"ccm_watch_errors_total{resource="nodes"} 1"#,
        ] {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
    }
}
