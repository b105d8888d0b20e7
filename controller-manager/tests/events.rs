//! The event broadcaster against a real kube-apiserver: repeats become one Event with a count,
//! similar events are combined, `record` never waits for the API server, and a full queue
//! drops and counts events.
//!
//! "The API server does not answer" is a TCP proxy in front of the shared control plane that
//! holds every connection until it is resumed: the client's requests reach no one, so the tests
//! observe what happened (or not) instead of measuring durations.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use cloud_controller_manager::events::{
    AGGREGATE_MAX_EVENTS, AGGREGATED_MESSAGE_PREFIX, BroadcasterOptions, EventBroadcaster,
    EventType, MAX_QUEUED_EVENTS, Recorder, SPAM_BURST,
};
use k8s_openapi::api::core::v1::{Event, ObjectReference};
use kube::api::{Api, ListParams};
use test_control_plane::{ControlPlane, unique_name};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const COMPONENT: &str = "events-test";

async fn control_plane() -> &'static ControlPlane {
    let _ = rustls::crypto::ring::default_provider().install_default();
    ControlPlane::shared().await.expect("shared control plane")
}

/// A reference to a Node named `name` (it need not exist: Events about any object are kept).
fn node_ref(name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(name.into()),
        uid: Some(uuid::Uuid::new_v4().to_string()),
        ..ObjectReference::default()
    }
}

/// Every Event about the object named `name`.
async fn events_about(cp: &ControlPlane, name: &str) -> Vec<Event> {
    let events: Api<Event> = Api::namespaced(cp.client().expect("client"), "default");
    events
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .expect("list events")
        .items
}

/// A TCP proxy to the API server that leaves every connection unanswered until resumed.
struct PausedProxy {
    address: SocketAddr,
    resume: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Drop for PausedProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PausedProxy {
    async fn start(cp: &ControlPlane) -> Self {
        let upstream: SocketAddr = cp
            .server_url()
            .trim_start_matches("https://")
            .parse()
            .expect("API server address");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let address = listener.local_addr().expect("proxy address");
        let (resume, mut resumed) = watch::channel(false);
        let task = tokio::spawn(async move {
            // Until resumed, connections wait in the listen backlog: the client's TLS handshake
            // and request are sent and never answered.
            if resumed.wait_for(|resumed| *resumed).await.is_err() {
                return;
            }
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self {
            address,
            resume,
            task,
        }
    }

    /// An admin client of the control plane that goes through the proxy.
    fn client(&self, cp: &ControlPlane) -> kube::Client {
        let mut config = cp.kube_config();
        config.cluster_url = format!("https://{}", self.address)
            .parse()
            .expect("proxy URL");
        kube::Client::try_from(config).expect("client through the proxy")
    }

    fn resume(&self) {
        self.resume.send_replace(true);
    }
}

/// A broadcaster and recorder, and the object the test records events about.
struct Subject {
    name: String,
    object: ObjectReference,
    broadcaster: EventBroadcaster,
    recorder: Recorder,
}

impl Subject {
    /// Events about a new object named after `prefix`, written through `client` with `options`.
    fn new(prefix: &str, client: kube::Client, options: BroadcasterOptions) -> Self {
        let name = unique_name(prefix);
        let broadcaster = EventBroadcaster::start_with(client, "events-test-instance", options);
        Self {
            object: node_ref(&name),
            name,
            recorder: broadcaster.new_recorder(COMPONENT),
            broadcaster,
        }
    }

    /// Writing straight to the API server, with client-go's limits.
    fn direct(cp: &ControlPlane, prefix: &str) -> Self {
        Self::new(prefix, cp.client().unwrap(), BroadcasterOptions::default())
    }

    fn record(&self, type_: EventType, reason: &str, message: &str) {
        self.recorder.record(&self.object, type_, reason, message);
    }
}

/// A [`Subject`] writing through a paused proxy, with the proxy and the control plane.
async fn unanswered(
    prefix: &str,
    options: BroadcasterOptions,
) -> (&'static ControlPlane, PausedProxy, Subject) {
    let cp = control_plane().await;
    let proxy = PausedProxy::start(cp).await;
    let subject = Subject::new(prefix, proxy.client(cp), options);
    (cp, proxy, subject)
}

#[tokio::test]
async fn a_burst_of_identical_events_is_one_event_with_their_count() {
    let cp = control_plane().await;
    let s = Subject::direct(cp, "identical");
    for _ in 0..20 {
        s.record(EventType::Warning, "Failed", "the same failure");
    }
    s.broadcaster.flush().await;

    let events = events_about(cp, &s.name).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let event = &events[0];
    assert_eq!(event.count, Some(20));
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.reason.as_deref(), Some("Failed"));
    assert_eq!(event.message.as_deref(), Some("the same failure"));
    assert_eq!(
        event.source.as_ref().and_then(|s| s.component.as_deref()),
        Some(COMPONENT)
    );
    assert_eq!(event.involved_object.uid, s.object.uid);
    let first = event.first_timestamp.clone().expect("firstTimestamp").0;
    let last = event.last_timestamp.clone().expect("lastTimestamp").0;
    assert!(first <= last, "{first} > {last}");
}

#[tokio::test]
async fn similar_events_are_combined() {
    let cp = control_plane().await;
    let s = Subject::direct(cp, "similar");
    let total = AGGREGATE_MAX_EVENTS + 2;
    for i in 0..total {
        s.record(EventType::Warning, "Failed", &format!("failure {i}"));
    }
    s.broadcaster.flush().await;

    let events = events_about(cp, &s.name).await;
    let (combined, single): (Vec<&Event>, Vec<&Event>) = events.iter().partition(|e| {
        e.message
            .as_deref()
            .is_some_and(|m| m.starts_with(AGGREGATED_MESSAGE_PREFIX))
    });
    assert_eq!(single.len(), AGGREGATE_MAX_EVENTS - 1, "{events:?}");
    assert!(single.iter().all(|e| e.count == Some(1)), "{events:?}");
    assert_eq!(combined.len(), 1, "{events:?}");
    // The threshold-th message and the two after it, with the last message.
    assert_eq!(combined[0].count, Some(3));
    assert_eq!(
        combined[0].message.as_deref(),
        Some(format!("{AGGREGATED_MESSAGE_PREFIX}failure {}", total - 1).as_str())
    );
}

#[tokio::test]
async fn record_does_not_wait_for_the_api_server() {
    let (cp, proxy, s) = unanswered("unanswered", BroadcasterOptions::default()).await;

    // `record` is not async: these return while the API server has answered nothing.
    s.record(EventType::Normal, "Synced", "first");
    s.record(EventType::Normal, "Synced", "first");
    s.record(EventType::Warning, "Failed", "second");
    assert_eq!(s.broadcaster.dropped(), 0);
    let mut flush = std::pin::pin!(s.broadcaster.flush());
    assert!(
        tokio::time::timeout(Duration::from_millis(300), flush.as_mut())
            .await
            .is_err(),
        "nothing can have been written through the paused proxy"
    );
    assert_eq!(events_about(cp, &s.name).await, vec![]);

    proxy.resume();
    tokio::time::timeout(Duration::from_secs(30), flush)
        .await
        .expect("written once the API server answers");
    let mut events: Vec<(String, Option<i32>)> = events_about(cp, &s.name)
        .await
        .into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.count))
        .collect();
    events.sort();
    let expected = [("Failed", Some(1)), ("Synced", Some(2))].map(|(r, c)| (r.to_string(), c));
    assert_eq!(events, expected);
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_events() {
    let (cp, proxy, s) = unanswered("full-queue", BroadcasterOptions::default()).await;

    // The sink takes the first event and waits for the API server, which does not answer;
    // it takes the second too, and holds it until the first one's write (same object) ends.
    for first in ["Reason-first", "Reason-second"] {
        s.record(EventType::Normal, first, "m");
        test_support::wait_for("the sink to take the event", Duration::from_secs(5), || {
            let queued = s.broadcaster.queued();
            async move {
                if queued == 0 {
                    Ok(())
                } else {
                    Err(format!("{queued} queued"))
                }
            }
        })
        .await
        .expect("the sink holds the event");
    }
    let extra = 7;
    for i in 0..MAX_QUEUED_EVENTS + extra {
        s.record(EventType::Normal, &format!("Reason-{i}"), "m");
    }
    assert_eq!(s.broadcaster.queued(), MAX_QUEUED_EVENTS);
    assert_eq!(s.broadcaster.dropped(), u64::try_from(extra).unwrap());

    // Once the API server answers, the spam filter lets one source write a burst of events
    // about one object and skips the rest of the queue.
    proxy.resume();
    tokio::time::timeout(Duration::from_secs(60), s.broadcaster.flush())
        .await
        .expect("queue written");
    let written = events_about(cp, &s.name).await.len();
    assert_eq!(written, usize::try_from(SPAM_BURST).unwrap());
}

#[tokio::test]
async fn shutdown_writes_what_is_queued() {
    let cp = control_plane().await;
    let s = Subject::direct(cp, "shutdown");
    for i in 0..5 {
        s.record(EventType::Normal, &format!("Reason-{i}"), "m");
    }
    s.broadcaster.shutdown().await;
    assert_eq!(events_about(cp, &s.name).await.len(), 5);

    s.record(EventType::Normal, "Late", "m");
    assert_eq!(
        s.broadcaster.queued(),
        0,
        "a shut down broadcaster takes no events"
    );
}

#[tokio::test]
async fn shutdown_is_bounded_when_the_api_server_does_not_answer() {
    let options = BroadcasterOptions {
        drain_timeout: Duration::from_millis(500),
        ..BroadcasterOptions::default()
    };
    let (_cp, _proxy, s) = unanswered("stuck", options).await;
    s.record(EventType::Normal, "Stuck", "m");
    tokio::time::timeout(Duration::from_secs(20), s.broadcaster.shutdown())
        .await
        .expect("shutdown gives up after the drain timeout");
}
