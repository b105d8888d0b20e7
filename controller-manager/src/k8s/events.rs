//! Kubernetes Events as client-go's `tools/record` broadcaster emits them: `core/v1` Events with
//! `source.component` set to the controller's component name, in the object's namespace (or
//! `default` for cluster-scoped objects such as Nodes, which every server version accepts).
//!
//! [`Recorder::record`] never waits for the API server: it puts the event into a bounded queue
//! ([`MAX_QUEUED_EVENTS`]) and returns, so a slow or unreachable API server cannot hold up a
//! reconcile. When the queue is full the event is dropped, counted
//! ([`EventBroadcaster::dropped`]) and logged at warn, at most once per ten seconds.
//!
//! One sink task per [`EventBroadcaster`] takes the events in order and, as client-go's
//! `EventCorrelator` does, before writing them (up to 32 writes in flight, those about one
//! object one after another):
//! - counts identical events (same source, object, type, reason and message) in one Event, whose
//!   `count`, `lastTimestamp` and `message` are patched;
//! - combines similar events (same source, object, type and reason, another message) once
//!   [`AGGREGATE_MAX_EVENTS`] distinct messages came within [`AGGREGATE_INTERVAL`] of each
//!   other, into one Event whose message starts with [`AGGREGATED_MESSAGE_PREFIX`];
//! - lets a source write [`SPAM_BURST`] events about one object, then one per
//!   [`SPAM_REFILL_PERIOD`]; the rest are skipped;
//! - keeps at most [`LRU_CACHE_ENTRIES`] keys in each of these three caches, forgetting the least
//!   recently used.
//!
//! The correlation is a pure function of the event, the caches and the time passed in, so it is
//! tested without a clock or an API server. A failed write is tried [`MAX_TRIES_PER_EVENT`]
//! times, [`RETRY_INTERVAL`] apart (the first pause jittered); a patch of an Event the server no
//! longer has falls back to creating it; a request the server refuses is not retried.
//! [`EventBroadcaster::shutdown`] lets the sink write what is queued (one attempt each) for at
//! most [`BroadcasterOptions::drain_timeout`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, warn};

use super::client::send_write;

/// Events queued before [`Recorder::record`] drops new ones (client-go `maxQueuedEvents`).
pub const MAX_QUEUED_EVENTS: usize = 1000;
/// Longest Event message written (the `events.k8s.io` note limit); longer ones are cut.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Attempts to write one event before giving up on it (client-go `maxTriesPerEvent`).
pub const MAX_TRIES_PER_EVENT: u32 = 12;
/// Pause between two attempts of a failed write; the first is jittered (client-go
/// `defaultSleepDuration`).
pub const RETRY_INTERVAL: Duration = Duration::from_secs(10);
/// Keys kept by each correlation cache (client-go `maxLruCacheEntries`).
pub const LRU_CACHE_ENTRIES: usize = 4096;
/// Distinct messages of similar events after which they are combined (client-go
/// `defaultAggregateMaxEvents`).
pub const AGGREGATE_MAX_EVENTS: usize = 10;
/// Quiet time after which similar events start a new aggregation (client-go
/// `defaultAggregateIntervalInSeconds`).
pub const AGGREGATE_INTERVAL: Duration = Duration::from_secs(600);
/// Prefix of the message of combined events (client-go `EventAggregatorByReasonMessageFunc`).
pub const AGGREGATED_MESSAGE_PREFIX: &str = "(combined from similar events): ";
/// Events a source may write about one object at once (client-go `defaultSpamBurst`).
pub const SPAM_BURST: u32 = 25;
/// Time in which a source earns one more event about an object (client-go `defaultSpamQPS`,
/// 1/300 per second).
pub const SPAM_REFILL_PERIOD: Duration = Duration::from_secs(300);
/// How long [`EventBroadcaster::shutdown`] lets the sink write what is queued, by default.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Least time between two warnings about dropped events: a full queue drops events by the
/// thousand, and one line per drop would flood the log.
const DROP_WARNING_PERIOD: Duration = Duration::from_secs(10);

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

/// Tuning of an [`EventBroadcaster`]; the default holds client-go's values.
#[derive(Debug, Clone)]
pub struct BroadcasterOptions {
    /// Events queued before new ones are dropped.
    pub queue_capacity: usize,
    /// Pause between two attempts of a failed write (the first one jittered).
    pub retry_interval: Duration,
    /// How long [`EventBroadcaster::shutdown`] waits for the queue to be written.
    pub drain_timeout: Duration,
}

impl Default for BroadcasterOptions {
    fn default() -> Self {
        Self {
            queue_capacity: MAX_QUEUED_EVENTS,
            retry_interval: RETRY_INTERVAL,
            drain_timeout: DRAIN_TIMEOUT,
        }
    }
}

/// What the queue carries to the sink task.
enum Queued {
    /// An event to correlate and write.
    Event(Box<Event>),
    /// Answered once everything queued before it has been handled.
    Flush(oneshot::Sender<()>),
}

/// State shared by a broadcaster and its recorders. The sink task holds none of it: once every
/// handle is gone the queue closes and the task ends after writing what is left.
struct Shared {
    queue: mpsc::Sender<Queued>,
    /// `reportingInstance` of every event.
    instance: String,
    dropped: AtomicU64,
    last_drop_warning: Mutex<Option<Instant>>,
    stop: watch::Sender<bool>,
    sink: Mutex<Option<JoinHandle<()>>>,
    drain_timeout: Duration,
}

impl Shared {
    fn count_dropped(&self, object: &ObjectReference, reason: &str) {
        let total = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        let due = {
            let mut last = self
                .last_drop_warning
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let due = last.is_none_or(|at| now.duration_since(at) >= DROP_WARNING_PERIOD);
            if due {
                *last = Some(now);
            }
            due
        };
        if due {
            warn!(
                dropped_total = total,
                queue_capacity = self.queue.max_capacity(),
                reason,
                object = object.name.as_deref().unwrap_or_default(),
                "event queue is full; dropping events (logged at most every {DROP_WARNING_PERIOD:?})"
            );
        }
    }

    async fn flush(&self) {
        let (done, handled) = oneshot::channel();
        if self.queue.send(Queued::Flush(done)).await.is_ok() {
            // An error means the sink task is gone: nothing is left to wait for.
            let _ = handled.await;
        }
    }
}

/// Queues events for the API server and writes them from one background task, as client-go's
/// event broadcaster does; cheap to clone (clones share the queue and the task).
#[derive(Clone)]
pub struct EventBroadcaster {
    shared: Arc<Shared>,
}

impl EventBroadcaster {
    /// Starts a broadcaster writing through `client`, with client-go's limits; its events carry
    /// `reportingInstance = instance`. Must be called inside a Tokio runtime.
    pub fn start(client: kube::Client, instance: &str) -> Self {
        Self::start_with(client, instance, BroadcasterOptions::default())
    }

    /// [`start`](Self::start) with other limits.
    pub fn start_with(client: kube::Client, instance: &str, options: BroadcasterOptions) -> Self {
        Self::spawn(ApiSink { client }, instance, &options)
    }

    fn spawn<S: Sink>(sink: S, instance: &str, options: &BroadcasterOptions) -> Self {
        let (queue, receiver) = mpsc::channel(options.queue_capacity.max(1));
        let (stop, stopped) = watch::channel(false);
        let worker = Worker {
            sink,
            queue: receiver,
            correlator: EventCorrelator::default(),
            retry_interval: options.retry_interval,
            stop: stopped,
            stopping: false,
        };
        let task = tokio::spawn(worker.run());
        Self {
            shared: Arc::new(Shared {
                queue,
                instance: instance.to_string(),
                dropped: AtomicU64::new(0),
                last_drop_warning: Mutex::new(None),
                stop,
                sink: Mutex::new(Some(task)),
                drain_timeout: options.drain_timeout,
            }),
        }
    }

    /// A recorder whose events carry `source.component = component`.
    pub fn new_recorder(&self, component: &str) -> Recorder {
        Recorder {
            shared: self.shared.clone(),
            component: component.to_string(),
        }
    }

    /// Waits until every event queued before the call has been written, skipped or given up.
    pub async fn flush(&self) {
        self.shared.flush().await;
    }

    /// Events dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Events (and flush requests) waiting in the queue.
    pub fn queued(&self) -> usize {
        self.shared.queue.max_capacity() - self.shared.queue.capacity()
    }

    /// Stops taking events and lets the sink write what is queued, one attempt each, for at
    /// most the drain timeout; what is left then is lost (and logged).
    pub async fn shutdown(&self) {
        self.shared.stop.send_replace(true);
        let sink = self
            .shared
            .sink
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(mut sink) = sink else {
            return;
        };
        if tokio::time::timeout(self.shared.drain_timeout, &mut sink)
            .await
            .is_err()
        {
            sink.abort();
            warn!(
                timeout = ?self.shared.drain_timeout,
                "events still queued at shutdown were not written in time; dropping them"
            );
        }
    }
}

/// Emits Events for one controller through its broadcaster.
#[derive(Clone)]
pub struct Recorder {
    shared: Arc<Shared>,
    component: String,
}

impl Recorder {
    /// Queues an Event about `object` and returns at once: an Event must neither delay nor
    /// change the outcome of a reconcile, so nothing here waits for the API server or fails.
    pub fn record(&self, object: &ObjectReference, type_: EventType, reason: &str, message: &str) {
        let now = Timestamp::now();
        // Messages often carry a provider's or the API server's error text, of any length.
        let message = super::truncated(message.to_string(), MAX_MESSAGE_BYTES);
        let event = new_event(
            object,
            type_,
            reason,
            &message,
            (&self.component, &self.shared.instance),
            now,
            unique_name_suffix(now),
        );
        match self.shared.queue.try_send(Queued::Event(Box::new(event))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.shared.count_dropped(object, reason),
            Err(TrySendError::Closed(_)) => {
                debug!(reason, "event broadcaster is shut down; event not recorded");
            }
        }
    }

    /// Waits until every event queued before the call has been written, skipped or given up.
    pub async fn flush(&self) {
        self.shared.flush().await;
    }
}

/// The Event `record` queues (client-go `makeEvent` plus the recorder's source): count 1,
/// first and last timestamp `now`, in the object's namespace or `default`.
fn new_event(
    object: &ObjectReference,
    type_: EventType,
    reason: &str,
    message: &str,
    (component, instance): (&str, &str),
    now: Timestamp,
    name_suffix: u64,
) -> Event {
    let namespace = object
        .namespace
        .clone()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| "default".to_string());
    Event {
        metadata: ObjectMeta {
            name: Some(event_name(
                object.name.as_deref().unwrap_or_default(),
                name_suffix,
            )),
            namespace: Some(namespace),
            ..ObjectMeta::default()
        },
        involved_object: object.clone(),
        reason: Some(reason.to_string()),
        message: Some(message.to_string()),
        type_: Some(type_.as_str().to_string()),
        source: Some(EventSource {
            component: Some(component.to_string()),
            host: None,
        }),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        reporting_component: Some(component.to_string()),
        reporting_instance: Some(instance.to_string()),
        ..Event::default()
    }
}

/// `<object>.<suffix in hex>`, or a random UUID when that is no valid object name (as client-go
/// `GenerateEventName`).
fn event_name(object: &str, suffix: u64) -> String {
    let name = format!("{object}.{suffix:x}");
    if is_dns_subdomain(&name) {
        name
    } else {
        uuid::Uuid::new_v4().to_string()
    }
}

/// Whether `name` is a DNS-1123 subdomain, the rule for Event names.
fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            let bytes = label.as_bytes();
            bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
                && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
                && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        })
}

/// The Unix time of `now` in nanoseconds, made strictly increasing within the process: two
/// different events about one object recorded in the same nanosecond would otherwise get the
/// same name, and the second would be refused as already existing.
fn unique_name_suffix(now: Timestamp) -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let wanted = u64::try_from(now.as_nanosecond()).unwrap_or(0);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = wanted.max(last.saturating_add(1));
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(actual) => last = actual,
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Correlation (client-go `events_cache.go`): pure, with `now` passed in
// ------------------------------------------------------------------------------------------------

/// A 64-bit digest of a cache key. The caches keep digests, not the keys' strings: a key is
/// up to a dozen strings, and thousands of them (one per node of a large cluster) would cost
/// megabytes; two keys of one cache colliding among a few thousand is a 2^-40 event.
fn digest(key: &impl Hash) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish()
}

/// A map that forgets its least recently used key beyond `capacity` keys (by key digest).
struct Lru<K, V> {
    capacity: usize,
    clock: u64,
    entries: HashMap<u64, (u64, V)>,
    /// Key digests by last use, oldest first.
    order: BTreeMap<u64, u64>,
    keys: std::marker::PhantomData<fn(&K)>,
}

impl<K: Hash, V> Lru<K, V> {
    fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            clock: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            keys: std::marker::PhantomData,
        }
    }

    /// The value of `key`, inserted with `make` when absent; either way now the most recent.
    fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        let key = digest(&key);
        self.clock += 1;
        let stamp = self.clock;
        if let Some((used, _)) = self.entries.get(&key) {
            self.order.remove(used);
        } else {
            while self.entries.len() >= self.capacity {
                let Some((_, oldest)) = self.order.pop_first() else {
                    break;
                };
                self.entries.remove(&oldest);
            }
        }
        self.order.insert(stamp, key);
        let entry = self.entries.entry(key).or_insert_with(|| (stamp, make()));
        entry.0 = stamp;
        &mut entry.1
    }
}

/// `Option<String>` as client-go's plain strings: absent and empty are the same.
fn text(value: Option<&String>) -> String {
    value.cloned().unwrap_or_default()
}

/// Source and object of an event, and its type: the spam filter's key (client-go `getSpamKey`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SpamKey {
    component: String,
    host: String,
    kind: String,
    namespace: String,
    name: String,
    uid: String,
    api_version: String,
    type_: String,
}

impl SpamKey {
    fn of(event: &Event) -> Self {
        let source = event.source.as_ref();
        let object = &event.involved_object;
        Self {
            component: text(source.and_then(|s| s.component.as_ref())),
            host: text(source.and_then(|s| s.host.as_ref())),
            kind: text(object.kind.as_ref()),
            namespace: text(object.namespace.as_ref()),
            name: text(object.name.as_ref()),
            uid: text(object.uid.as_ref()),
            api_version: text(object.api_version.as_ref()),
            type_: text(event.type_.as_ref()),
        }
    }
}

/// What similar events share (client-go `EventAggregatorByReasonFunc`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct AggregateKey {
    object: SpamKey,
    reason: String,
    reporting_component: String,
    reporting_instance: String,
}

impl AggregateKey {
    fn of(event: &Event) -> Self {
        Self {
            object: SpamKey::of(event),
            reason: text(event.reason.as_ref()),
            reporting_component: text(event.reporting_component.as_ref()),
            reporting_instance: text(event.reporting_instance.as_ref()),
        }
    }
}

/// Which Event an occurrence counts into: its own (client-go `getEventKey`) or its aggregate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ObservationKey {
    Event {
        object: SpamKey,
        field_path: String,
        reason: String,
        message: String,
    },
    Aggregate(AggregateKey),
}

impl ObservationKey {
    fn of(event: &Event) -> Self {
        Self::Event {
            object: SpamKey::of(event),
            field_path: text(event.involved_object.field_path.as_ref()),
            reason: text(event.reason.as_ref()),
            message: text(event.message.as_ref()),
        }
    }
}

/// Distinct messages (their digests) of similar events seen recently.
struct AggregateRecord {
    messages: HashSet<u64>,
    last: Timestamp,
}

/// The Event an observation key was last written as.
#[derive(Default)]
struct Observation {
    count: i32,
    first_timestamp: Option<Time>,
    name: Option<String>,
}

impl Observation {
    fn of(event: &Event) -> Self {
        Self {
            count: event.count.unwrap_or(1),
            first_timestamp: event.first_timestamp.clone(),
            name: event.metadata.name.clone(),
        }
    }
}

/// Token bucket of one source and object, full at creation.
struct SpamBucket {
    tokens: f64,
    last: Timestamp,
}

impl SpamBucket {
    fn try_accept(&mut self, now: Timestamp, burst: f64) -> bool {
        let earned = elapsed(self.last, now).as_secs_f64() / SPAM_REFILL_PERIOD.as_secs_f64();
        self.tokens = (self.tokens + earned).min(burst);
        self.last = self.last.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Time from `since` to `now`, zero when the clock went backwards.
fn elapsed(since: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(since)).unwrap_or(Duration::ZERO)
}

/// What the sink writes for one recorded event.
#[derive(Debug, Clone, PartialEq)]
struct Write {
    /// The Event to create (or to create when the patched one is gone).
    event: Event,
    /// Strategic merge patch of the existing Event named `event.metadata.name`, for a repeat.
    patch: Option<serde_json::Value>,
}

/// Filters, combines and counts events before they are written (client-go `EventCorrelator`).
struct EventCorrelator {
    aggregates: Lru<AggregateKey, AggregateRecord>,
    observations: Lru<ObservationKey, Observation>,
    spam: Lru<SpamKey, SpamBucket>,
    spam_burst: f64,
}

impl Default for EventCorrelator {
    fn default() -> Self {
        Self {
            aggregates: Lru::new(LRU_CACHE_ENTRIES),
            observations: Lru::new(LRU_CACHE_ENTRIES),
            spam: Lru::new(LRU_CACHE_ENTRIES),
            spam_burst: f64::from(SPAM_BURST),
        }
    }
}

impl EventCorrelator {
    /// What to write for `event` at `now`, or `None` when the spam filter skips it.
    fn correlate(&mut self, event: Event, now: Timestamp) -> Option<Write> {
        let (event, key) = self.aggregate(event, now);
        let write = self.observe(event, key);
        // As client-go: the occurrence is counted even when the filter skips it, so the next
        // write carries the true count.
        (!self.spam_filtered(&write.event, now)).then_some(write)
    }

    /// Records what the server now holds after a successful write.
    fn update_state(&mut self, written: &Event) {
        *self
            .observations
            .get_or_insert_with(ObservationKey::of(written), Observation::default) =
            Observation::of(written);
    }

    /// The event itself, or from the `AGGREGATE_MAX_EVENTS`-th distinct message of similar
    /// events, the combined event; with the key its occurrences count under.
    fn aggregate(&mut self, event: Event, now: Timestamp) -> (Event, ObservationKey) {
        let key = AggregateKey::of(&event);
        let message = text(event.message.as_ref());
        let record = self
            .aggregates
            .get_or_insert_with(key.clone(), || AggregateRecord {
                messages: HashSet::new(),
                last: now,
            });
        if elapsed(record.last, now) > AGGREGATE_INTERVAL {
            record.messages.clear();
        }
        record.last = now;
        record.messages.insert(digest(&message));
        if record.messages.len() < AGGREGATE_MAX_EVENTS {
            let key = ObservationKey::of(&event);
            return (event, key);
        }
        // Keep the set below the threshold so every further new message is combined too.
        // (client-go drops an arbitrary message; dropping this one keeps the outcome stable.)
        record.messages.remove(&digest(&message));
        let nanos = u64::try_from(now.as_nanosecond()).unwrap_or(0);
        let combined = Event {
            metadata: ObjectMeta {
                name: Some(event_name(
                    event.involved_object.name.as_deref().unwrap_or_default(),
                    nanos,
                )),
                namespace: event.metadata.namespace,
                ..ObjectMeta::default()
            },
            count: Some(1),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            involved_object: event.involved_object,
            message: Some(format!("{AGGREGATED_MESSAGE_PREFIX}{message}")),
            type_: event.type_,
            reason: event.reason,
            source: event.source,
            // Beyond client-go, which leaves them out of the combined event.
            reporting_component: event.reporting_component,
            reporting_instance: event.reporting_instance,
            ..Event::default()
        };
        (combined, ObservationKey::Aggregate(key))
    }

    /// Counts an occurrence under `key`: a repeat takes the name and first timestamp of the
    /// Event already written and becomes a patch of its count, last timestamp and message.
    fn observe(&mut self, mut event: Event, key: ObservationKey) -> Write {
        let seen = self
            .observations
            .get_or_insert_with(key, Observation::default);
        let patch = (seen.count > 0).then(|| {
            event.metadata.name.clone_from(&seen.name);
            event.first_timestamp.clone_from(&seen.first_timestamp);
            event.count = Some(seen.count.saturating_add(1));
            serde_json::json!({
                "count": event.count,
                "lastTimestamp": event.last_timestamp,
                "message": event.message,
            })
        });
        *seen = Observation::of(&event);
        Write { event, patch }
    }

    /// Whether the source has used up its events about this object.
    fn spam_filtered(&mut self, event: &Event, now: Timestamp) -> bool {
        let burst = self.spam_burst;
        let bucket = self
            .spam
            .get_or_insert_with(SpamKey::of(event), || SpamBucket {
                tokens: burst,
                last: now,
            });
        !bucket.try_accept(now, burst)
    }
}

// ------------------------------------------------------------------------------------------------
// The sink task (client-go `recordToSink`)
// ------------------------------------------------------------------------------------------------

/// Where events are written: the API server, or a fake in the unit tests.
trait Sink: Clone + Send + Sync + 'static {
    /// Creates `event`.
    fn create(&self, event: &Event) -> impl Future<Output = Result<(), kube::Error>> + Send;
    /// Applies `patch` to the Event named as `event`.
    fn patch(
        &self,
        event: &Event,
        patch: &serde_json::Value,
    ) -> impl Future<Output = Result<(), kube::Error>> + Send;
}

/// Writes events through the API client (and so under its rate limit).
#[derive(Clone)]
struct ApiSink {
    client: kube::Client,
}

/// Request builder for the core/v1 Events of `event`'s namespace.
fn events_of(event: &Event) -> kube::core::Request {
    let namespace = event.metadata.namespace.as_deref().unwrap_or("default");
    kube::core::Request::new(format!("/api/v1/namespaces/{namespace}/events"))
}

impl Sink for ApiSink {
    async fn create(&self, event: &Event) -> Result<(), kube::Error> {
        let body = serde_json::to_vec(event).map_err(kube::Error::SerdeError)?;
        let request = events_of(event).create(&PostParams::default(), body);
        send_write(&self.client, request).await
    }

    async fn patch(&self, event: &Event, patch: &serde_json::Value) -> Result<(), kube::Error> {
        let name = event.metadata.name.as_deref().unwrap_or_default();
        let request =
            events_of(event).patch(name, &PatchParams::default(), &Patch::Strategic(patch));
        send_write(&self.client, request).await
    }
}

/// Whether a failed write is worth another attempt.
#[derive(Debug, PartialEq, Eq)]
enum Retry {
    /// The API server could not be reached or was unavailable.
    Later,
    /// The request will fail the same way again; `expected` for an Event that already exists or
    /// a namespace being deleted (logged at debug only, as client-go does).
    Never { expected: bool },
}

/// client-go gives up on every error status (its REST client has already retried 429 and 5xx
/// answers by then); ours does not retry, so those are retried here.
fn retry_policy(err: &kube::Error) -> Retry {
    match err {
        kube::Error::Api(status) => {
            if status.code == 408 || status.code == 429 || status.code >= 500 {
                Retry::Later
            } else {
                let terminating = status.details.as_ref().is_some_and(|details| {
                    details
                        .causes
                        .iter()
                        .any(|cause| cause.reason == "NamespaceTerminating")
                });
                Retry::Never {
                    expected: status.is_already_exists() || terminating,
                }
            }
        }
        kube::Error::BuildRequest(_) | kube::Error::SerdeError(_) | kube::Error::HttpError(_) => {
            Retry::Never { expected: false }
        }
        _ => Retry::Later,
    }
}

/// The pause after the `attempt`-th failure: `interval`, the first one scaled by `unit_random`
/// (in [0, 1)) so that clients do not all retry together when the API server comes back.
fn retry_delay(attempt: u32, interval: Duration, unit_random: f64) -> Duration {
    if attempt == 1 {
        interval.mul_f64(unit_random.clamp(0.0, 1.0))
    } else {
        interval
    }
}

/// One attempt: the patch of a repeat (falling back to a create when the Event has expired
/// from the server), or a create.
async fn attempt_write<S: Sink>(sink: &S, write: &Write) -> Result<(), kube::Error> {
    if let Some(patch) = &write.patch {
        match sink.patch(&write.event, patch).await {
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            done => return done,
        }
    }
    sink.create(&write.event).await
}

/// Writes in flight at once. One writer in order (as client-go) cannot keep up with a burst
/// such as a thousand nodes joining at once, and the bounded queue would then drop events; the
/// writes of one object still happen one after another, in order.
const MAX_WRITES_IN_FLIGHT: usize = 32;

/// The object an event is about: writes about one object are never concurrent, so its
/// deduplication state is always up to date when its next event is correlated.
fn object_key(event: &Event) -> String {
    let object = &event.involved_object;
    format!(
        "{}/{}/{}/{}",
        text(object.kind.as_ref()),
        text(object.namespace.as_ref()),
        text(object.name.as_ref()),
        text(object.uid.as_ref())
    )
}

/// How a write ended.
struct Written {
    /// The object the event is about.
    key: String,
    /// The event as written, when the write succeeded.
    written: Option<Event>,
    /// Whether the broadcaster was shut down while the write waited to retry.
    stopped: bool,
}

/// The sink task: takes queued events in order, correlates them, and writes them with at most
/// [`MAX_WRITES_IN_FLIGHT`] writes in flight, one at a time per object.
struct Worker<S> {
    sink: S,
    queue: mpsc::Receiver<Queued>,
    correlator: EventCorrelator,
    retry_interval: Duration,
    stop: watch::Receiver<bool>,
    /// Shutting down: the queue takes nothing more and each event gets one attempt.
    stopping: bool,
}

impl<S: Sink> Worker<S> {
    async fn run(mut self) {
        let mut in_flight: JoinSet<Written> = JoinSet::new();
        let mut busy: HashSet<String> = HashSet::new();
        loop {
            let next = if self.stopping {
                self.queue.recv().await
            } else {
                let stopped = tokio::select! {
                    next = self.queue.recv() => Ok(next),
                    _ = self.stop.wait_for(|stop| *stop) => Err(()),
                };
                let Ok(next) = stopped else {
                    self.begin_stopping();
                    continue;
                };
                next
            };
            match next {
                None => {
                    while self.finish_one(&mut in_flight, &mut busy).await {}
                    return;
                }
                Some(Queued::Flush(done)) => {
                    while self.finish_one(&mut in_flight, &mut busy).await {}
                    let _ = done.send(());
                }
                Some(Queued::Event(event)) => {
                    let key = object_key(&event);
                    // The previous write about this object must have updated the caches.
                    while busy.contains(&key) || in_flight.len() >= MAX_WRITES_IN_FLIGHT {
                        self.finish_one(&mut in_flight, &mut busy).await;
                    }
                    let Some(write) = self.correlator.correlate(*event, Timestamp::now()) else {
                        debug!("event skipped: too many events about this object");
                        continue;
                    };
                    busy.insert(key.clone());
                    let sink = self.sink.clone();
                    let mut stop = self.stop.clone();
                    let (retry_interval, stopping) = (self.retry_interval, self.stopping);
                    in_flight.spawn(async move {
                        let outcome =
                            write_with_retries(&sink, &write, retry_interval, &mut stop, stopping)
                                .await;
                        Written {
                            key,
                            written: outcome.written.then_some(write.event),
                            stopped: outcome.stopped,
                        }
                    });
                }
            }
        }
    }

    /// Waits for one write in flight and records its outcome; false when none was in flight.
    async fn finish_one(
        &mut self,
        in_flight: &mut JoinSet<Written>,
        busy: &mut HashSet<String>,
    ) -> bool {
        let Some(joined) = in_flight.join_next().await else {
            return false;
        };
        match joined {
            Ok(done) => {
                busy.remove(&done.key);
                if let Some(event) = &done.written {
                    self.correlator.update_state(event);
                }
                if done.stopped && !self.stopping {
                    self.begin_stopping();
                }
            }
            // A write task panicked: its object stays marked busy only until the set is empty.
            Err(err) => {
                warn!(error = %err, "event write task failed");
                if in_flight.is_empty() {
                    busy.clear();
                }
            }
        }
        true
    }

    /// Closes the queue; what it holds is still handed out.
    fn begin_stopping(&mut self) {
        self.stopping = true;
        self.queue.close();
    }

    /// Writes one correlated event, retrying transient failures, and records it.
    #[cfg(test)]
    async fn write(&mut self, write: &Write) {
        let outcome = write_with_retries(
            &self.sink,
            write,
            self.retry_interval,
            &mut self.stop,
            self.stopping,
        )
        .await;
        if outcome.written {
            self.correlator.update_state(&write.event);
        }
        if outcome.stopped {
            self.begin_stopping();
        }
    }
}

/// How [`write_with_retries`] ended.
struct Outcome {
    /// The event was written.
    written: bool,
    /// The broadcaster was shut down while waiting to retry.
    stopped: bool,
}

/// Writes one correlated event, retrying transient failures up to [`MAX_TRIES_PER_EVENT`]
/// times; once `stopping`, a failure is not retried.
async fn write_with_retries<S: Sink>(
    sink: &S,
    write: &Write,
    retry_interval: Duration,
    stop: &mut watch::Receiver<bool>,
    stopping: bool,
) -> Outcome {
    let event = &write.event;
    let object = event.involved_object.name.as_deref().unwrap_or_default();
    let reason = event.reason.as_deref().unwrap_or_default();
    let done = |written| Outcome {
        written,
        stopped: false,
    };
    for attempt in 1..=MAX_TRIES_PER_EVENT {
        let err = match attempt_write(sink, write).await {
            Ok(()) => return done(true),
            Err(err) => err,
        };
        match retry_policy(&err) {
            Retry::Never { expected: true } => {
                debug!(object, reason, error = %err, "server rejected event (will not retry)");
                return done(false);
            }
            Retry::Never { expected: false } => {
                warn!(object, reason, error = %err, "server rejected event (will not retry)");
                return done(false);
            }
            Retry::Later => {}
        }
        if attempt == MAX_TRIES_PER_EVENT {
            warn!(object, reason, error = %err, attempts = attempt, "unable to write event (retry limit exceeded)");
            return done(false);
        }
        if stopping {
            warn!(object, reason, error = %err, "unable to write event (event broadcaster is shut down)");
            return done(false);
        }
        debug!(object, reason, error = %err, attempt, "unable to write event (will retry)");
        let delay = retry_delay(attempt, retry_interval, rand::random());
        // A zero pause (the jitter can draw one) need not wait for the timer.
        let stopped = if delay.is_zero() {
            *stop.borrow()
        } else {
            tokio::select! {
                () = tokio::time::sleep(delay) => false,
                _ = stop.wait_for(|stop| *stop) => true,
            }
        };
        if stopped {
            warn!(object, reason, error = %err, "unable to write event (event broadcaster is shut down)");
            return Outcome {
                written: false,
                stopped: true,
            };
        }
    }
    done(false)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    use kube::core::Status;
    use kube::core::response::{StatusCause, StatusDetails};

    // ---- Fixtures (client-go `events_cache_test.go`) ----

    fn object_reference(kind: &str, name: &str, namespace: &str) -> ObjectReference {
        ObjectReference {
            kind: Some(kind.into()),
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            uid: Some("C934D34AFB20242".into()),
            api_version: Some("version".into()),
            field_path: Some("spec.containers{mycontainer}".into()),
            ..ObjectReference::default()
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).unwrap()
    }

    fn make_event(reason: &str, message: &str, object: ObjectReference) -> Event {
        Event {
            metadata: ObjectMeta {
                namespace: object.namespace.clone(),
                ..ObjectMeta::default()
            },
            reason: Some(reason.into()),
            message: Some(message.into()),
            involved_object: object,
            source: Some(EventSource {
                component: Some("kubelet".into()),
                host: Some("kublet.node1".into()),
            }),
            count: Some(1),
            first_timestamp: Some(Time(at(0))),
            last_timestamp: Some(Time(at(0))),
            type_: Some("Normal".into()),
            ..Event::default()
        }
    }

    /// [`make_event`] about the Pod `pod` in `namespace`.
    fn pod_event(pod: &str, namespace: &str, reason: &str, message: &str) -> Event {
        make_event(reason, message, object_reference("Pod", pod, namespace))
    }

    fn make_events(n: usize, template: &Event) -> Vec<Event> {
        vec![template.clone(); n]
    }

    fn make_unique_events(n: usize) -> Vec<Event> {
        (0..n)
            .map(|i| {
                make_event(
                    &format!("reason-{i}"),
                    &format!("message-{i}"),
                    object_reference("Pod", &format!("pod-{i}"), &format!("ns-{i}")),
                )
            })
            .collect()
    }

    fn make_similar_events(n: usize, template: &Event, prefix: &str) -> Vec<Event> {
        (0..n)
            .map(|i| {
                let mut event = template.clone();
                event.message = Some(format!(
                    "{prefix}-{i}-{}",
                    template.message.clone().unwrap_or_default()
                ));
                event
            })
            .collect()
    }

    fn with_count(mut event: Event, count: i32) -> Event {
        event.count = Some(count);
        event
    }

    fn stamped(mut event: Event, now: Timestamp) -> Event {
        event.first_timestamp = Some(Time(now));
        event.last_timestamp = Some(Time(now));
        event
    }

    /// Plays `previous` one `interval` apart into a fresh correlator (updating its state after
    /// every write, as the sink does), then correlates `new` one `interval` later.
    fn correlate_after(previous: &[Event], new: &Event, interval: i64) -> Option<Write> {
        let mut correlator = EventCorrelator::default();
        let mut now = 0;
        for event in previous {
            now += interval;
            if let Some(write) = correlator.correlate(stamped(event.clone(), at(now)), at(now)) {
                correlator.update_state(&write.event);
            }
        }
        now += interval;
        correlator.correlate(stamped(new.clone(), at(now)), at(now))
    }

    /// client-go `validateEvent`: timestamps differ exactly when the event was counted more
    /// than once, the name starts with the expected one, and the rest is as expected.
    fn validate_event(scenario: &str, actual: &Event, expected: &Event) {
        let first = actual.first_timestamp.clone().expect("first timestamp");
        let last = actual.last_timestamp.clone().expect("last timestamp");
        let compressed = expected.count.unwrap_or(1) > 1;
        assert_eq!(
            first != last,
            compressed,
            "{scenario}: timestamps {actual:?}"
        );
        let name = actual.metadata.name.clone().unwrap_or_default();
        let prefix = expected.metadata.name.clone().unwrap_or_default();
        assert!(name.starts_with(&prefix), "{scenario}: name {name:?}");
        let mut actual = actual.clone();
        actual.first_timestamp = expected.first_timestamp.clone();
        actual.last_timestamp = expected.last_timestamp.clone();
        actual.metadata.name = expected.metadata.name.clone();
        assert_eq!(&actual, expected, "{scenario}");
    }

    // ---- TestEventAggregatorByReasonFunc, TestEventAggregatorByReasonMessageFunc ----

    #[test]
    fn event_aggregator_by_reason_func() {
        let event1 = pod_event("pod1", "other", "end-of-world", "it was fun");
        let event2 = pod_event("pod1", "other", "end-of-world", "it was awful");
        let event3 = pod_event("pod1", "other", "nevermind", "it was a bug");
        assert_eq!(AggregateKey::of(&event1), AggregateKey::of(&event2));
        assert_ne!(ObservationKey::of(&event1), ObservationKey::of(&event2));
        assert_ne!(AggregateKey::of(&event1), AggregateKey::of(&event3));
    }

    #[test]
    fn event_aggregator_by_reason_message_func() {
        let similar = make_similar_events(
            AGGREGATE_MAX_EVENTS,
            &pod_event("pod1", "other", "end-of-world", "it was fun"),
            "m",
        );
        let mut correlator = EventCorrelator::default();
        let last = similar
            .into_iter()
            .filter_map(|event| correlator.correlate(event, at(1)))
            .last()
            .unwrap();
        let message = last.event.message.unwrap();
        assert!(
            message.starts_with("(combined from similar events): "),
            "{message}"
        );
    }

    // ---- TestEventCorrelator ----

    fn duplicate_event() -> Event {
        pod_event("my-pod", "my-ns", "duplicate", "me again")
    }

    fn similar_event() -> Event {
        let mut event = pod_event("my-pod", "my-ns", "similar", "similar message");
        event.involved_object.field_path = Some("spec.containers{container1}".into());
        event
    }

    fn aggregate_event() -> Event {
        let similar = similar_event();
        make_event(
            "similar",
            &format!("{AGGREGATED_MESSAGE_PREFIX}similar message"),
            similar.involved_object,
        )
    }

    /// Correlates `new` after `previous` (see [`correlate_after`]) and validates the result
    /// against `expected`.
    fn scenario(
        name: &str,
        previous: &[Event],
        new: &Event,
        interval: i64,
        expected: Event,
    ) -> Write {
        let write = correlate_after(previous, new, interval)
            .unwrap_or_else(|| panic!("{name}: skipped as spam"));
        validate_event(name, &write.event, &expected);
        write
    }

    #[test]
    fn event_correlator_create_a_single_event() {
        let first = pod_event("my-pod", "my-ns", "first", "i am first");
        let write = scenario(
            "create-a-single-event",
            &[],
            &first,
            5,
            with_count(first.clone(), 1),
        );
        assert_eq!(write.patch, None);
    }

    #[test]
    fn event_correlator_the_same_event_should_just_count() {
        let duplicate = duplicate_event();
        let write = scenario(
            "the-same-event-should-just-count",
            &make_events(1, &duplicate),
            &duplicate,
            5,
            with_count(duplicate.clone(), 2),
        );
        let count = write.patch.as_ref().map(|p| p["count"].clone());
        assert_eq!(count, Some(serde_json::json!(2)));
    }

    #[test]
    fn event_correlator_the_same_event_should_just_count_even_if_more_than_aggregate() {
        // A longer interval lets the events aggregate but keeps them below the spam limit.
        let duplicate = duplicate_event();
        let previous = make_events(AGGREGATE_MAX_EVENTS, &duplicate);
        let expected = with_count(duplicate.clone(), 11);
        scenario(
            "the-same-event-should-just-count-even-if-more-than-aggregate",
            &previous,
            &duplicate,
            30,
            expected,
        );
    }

    #[test]
    fn event_correlator_the_same_event_is_spam_if_happens_too_frequently() {
        let previous = make_events(SPAM_BURST as usize + 1, &duplicate_event());
        assert_eq!(correlate_after(&previous, &duplicate_event(), 1), None);
    }

    #[test]
    fn event_correlator_create_many_unique_events() {
        let unique = pod_event("my-pod", "my-ns", "unique", "snowflake");
        let expected = with_count(unique.clone(), 1);
        scenario(
            "create-many-unique-events",
            &make_unique_events(30),
            &unique,
            5,
            expected,
        );
    }

    #[test]
    fn event_correlator_similar_events_should_aggregate_event() {
        let similar = similar_event();
        let previous = make_similar_events(AGGREGATE_MAX_EVENTS - 1, &similar, "similar message");
        let expected = with_count(aggregate_event(), 1);
        let write = scenario(
            "similar-events-should-aggregate-event",
            &previous,
            &similar,
            5,
            expected,
        );
        assert_eq!(write.patch, None);
    }

    #[test]
    fn event_correlator_similar_events_many_times_should_count_the_aggregate() {
        let similar = similar_event();
        let previous = make_similar_events(AGGREGATE_MAX_EVENTS, &similar, "similar message");
        let expected = with_count(aggregate_event(), 2);
        let write = scenario(
            "similar-events-many-times-should-count-the-aggregate",
            &previous,
            &similar,
            5,
            expected,
        );
        assert!(write.patch.is_some());
    }

    #[test]
    fn event_correlator_events_from_different_containers_do_not_aggregate() {
        let similar = similar_event();
        let mut other_container = similar.clone();
        other_container.involved_object.field_path = Some("spec.containers{container2}".into());
        let previous = make_events(1, &other_container);
        let expected = with_count(similar.clone(), 1);
        scenario(
            "events-from-different-containers-do-not-aggregate",
            &previous,
            &similar,
            5,
            expected,
        );
    }

    #[test]
    fn event_correlator_similar_events_whose_interval_is_greater_than_aggregate_interval_do_not_aggregate()
     {
        let similar = similar_event();
        let previous = make_similar_events(AGGREGATE_MAX_EVENTS - 1, &similar, "similar message");
        let interval = i64::try_from(AGGREGATE_INTERVAL.as_secs()).unwrap() + 1;
        let expected = with_count(similar.clone(), 1);
        scenario(
            "similar-events-whose-interval-is-greater-than-aggregate-interval-do-not-aggregate",
            &previous,
            &similar,
            interval,
            expected,
        );
    }

    // ---- TestEventSpamFilter (the default key; client-go's custom key functions are not ours) ----

    #[test]
    fn event_spam_filter_event_should_be_reported_as_spam_if_object_reference_is_the_same() {
        let object = || object_reference("Pod", "my-pod", "my-ns");
        let mut correlator = EventCorrelator {
            spam_burst: 1.0,
            ..EventCorrelator::default()
        };
        let original = make_event("original", "i am first", object());
        let write = correlator.correlate(original, at(1)).unwrap();
        correlator.update_state(&write.event);
        let different_reason = make_event("duplicate", "me again", object());
        assert_eq!(correlator.correlate(different_reason, at(2)), None);
    }

    /// Beyond client-go's tests: the bucket earns one event per refill period, and the skipped
    /// occurrences are still counted.
    #[test]
    fn spam_filter_refills_one_event_per_refill_period() {
        let mut correlator = EventCorrelator::default();
        let burst = i32::try_from(SPAM_BURST).unwrap();
        for i in 0..burst {
            let write = correlator.correlate(duplicate_event(), at(0)).unwrap();
            assert_eq!(write.event.count, Some(i + 1));
            correlator.update_state(&write.event);
        }
        assert_eq!(correlator.correlate(duplicate_event(), at(1)), None);
        let refill = i64::try_from(SPAM_REFILL_PERIOD.as_secs()).unwrap();
        let write = correlator
            .correlate(duplicate_event(), at(refill + 1))
            .expect("one event earned");
        assert_eq!(write.event.count, Some(burst + 2));
        assert_eq!(
            correlator.correlate(duplicate_event(), at(refill + 1)),
            None
        );
    }

    #[test]
    fn lru_forgets_the_least_recently_used_key() {
        let mut lru = Lru::new(2);
        *lru.get_or_insert_with("a", || 0) = 1;
        *lru.get_or_insert_with("b", || 0) = 2;
        assert_eq!(*lru.get_or_insert_with("a", || 0), 1);
        *lru.get_or_insert_with("c", || 0) = 3;
        assert_eq!(lru.entries.len(), 2);
        assert_eq!(
            *lru.get_or_insert_with("b", || 0),
            0,
            "b was the least recent"
        );
        assert_eq!(*lru.get_or_insert_with("c", || 0), 3);
    }

    #[test]
    fn event_names_are_valid_object_names() {
        assert_eq!(event_name("node-1", 255), "node-1.ff");
        let long = "a".repeat(260);
        let fallback = event_name(&long, 255);
        assert!(uuid::Uuid::parse_str(&fallback).is_ok(), "{fallback}");
        assert!(uuid::Uuid::parse_str(&event_name("Upper", 1)).is_ok());
        assert!(unique_name_suffix(at(0)) < unique_name_suffix(at(0)));
    }

    // ---- The sink (client-go `event_test.go`) ----

    #[derive(Debug, Clone, PartialEq)]
    enum Call {
        Create(Event),
        Patch(Event, serde_json::Value),
    }

    type Failure = Arc<dyn Fn(&Call, usize) -> Option<kube::Error> + Send + Sync>;

    /// A sink that records its calls, fails as `fail` says (given the call and how many calls
    /// it has seen) and answers only while `open` is true.
    #[derive(Clone)]
    struct FakeSink {
        calls: Arc<Mutex<Vec<Call>>>,
        fail: Option<Failure>,
        open: watch::Receiver<bool>,
        /// Calls begun, answered or not.
        started: Arc<AtomicU64>,
    }

    impl FakeSink {
        fn new() -> Self {
            Self {
                calls: Arc::default(),
                fail: None,
                open: watch::channel(true).1,
                started: Arc::default(),
            }
        }

        fn failing(
            fail: impl Fn(&Call, usize) -> Option<kube::Error> + Send + Sync + 'static,
        ) -> Self {
            Self {
                fail: Some(Arc::new(fail)),
                ..Self::new()
            }
        }

        /// A sink that answers once the returned switch is set.
        fn paused() -> (Self, watch::Sender<bool>) {
            let (resume, open) = watch::channel(false);
            (
                Self {
                    open,
                    ..Self::new()
                },
                resume,
            )
        }

        fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }

        async fn answer(&self, call: Call) -> Result<(), kube::Error> {
            self.started.fetch_add(1, Ordering::SeqCst);
            let _ = self.open.clone().wait_for(|open| *open).await;
            let seen = {
                let mut calls = self.calls.lock().unwrap();
                calls.push(call.clone());
                calls.len()
            };
            match self.fail.as_ref().and_then(|fail| fail(&call, seen)) {
                Some(err) => Err(err),
                None => Ok(()),
            }
        }
    }

    impl Sink for FakeSink {
        async fn create(&self, event: &Event) -> Result<(), kube::Error> {
            self.answer(Call::Create(event.clone())).await
        }

        async fn patch(&self, event: &Event, patch: &serde_json::Value) -> Result<(), kube::Error> {
            self.answer(Call::Patch(event.clone(), patch.clone())).await
        }
    }

    fn api_error(code: u16, reason: &str) -> kube::Error {
        kube::Error::Api(Box::new(Status::failure("refused", reason).with_code(code)))
    }

    fn transport_error() -> kube::Error {
        kube::Error::Service("connection reset".into())
    }

    fn quick() -> BroadcasterOptions {
        BroadcasterOptions {
            retry_interval: Duration::ZERO,
            drain_timeout: Duration::from_millis(200),
            ..BroadcasterOptions::default()
        }
    }

    /// A broadcaster over `sink` and its recorder of source `eventTest`.
    fn start(
        sink: &FakeSink,
        instance: &str,
        options: &BroadcasterOptions,
    ) -> (EventBroadcaster, Recorder) {
        let broadcaster = EventBroadcaster::spawn(sink.clone(), instance, options);
        let recorder = broadcaster.new_recorder("eventTest");
        (broadcaster, recorder)
    }

    fn worker(sink: FakeSink) -> (Worker<FakeSink>, watch::Sender<bool>) {
        let (stop, stopped) = watch::channel(false);
        let worker = Worker {
            sink,
            queue: mpsc::channel(1).1,
            correlator: EventCorrelator::default(),
            retry_interval: Duration::ZERO,
            stop: stopped,
            stopping: false,
        };
        (worker, stop)
    }

    /// Waits (bounded) until `sink` has begun `n` calls.
    async fn begun(sink: &FakeSink, n: u64) {
        for _ in 0..200 {
            if sink.started.load(Ordering::SeqCst) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("only {} calls begun", sink.started.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn writes_about_different_objects_overlap_up_to_the_limit() {
        let (sink, resume) = FakeSink::paused();
        let (broadcaster, recorder) = start(&sink, "overlap", &quick());
        let objects = MAX_WRITES_IN_FLIGHT + 2;
        for i in 0..objects {
            recorder.record(
                &pod_ref(&format!("uid-{i}"), None),
                EventType::Normal,
                "Started",
                "m",
            );
        }
        begun(&sink, u64::try_from(MAX_WRITES_IN_FLIGHT).unwrap()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            sink.started.load(Ordering::SeqCst),
            u64::try_from(MAX_WRITES_IN_FLIGHT).unwrap(),
            "no more than the limit in flight"
        );
        resume.send_replace(true);
        broadcaster.flush().await;
        assert_eq!(sink.calls().len(), objects);
    }

    #[tokio::test]
    async fn writes_about_one_object_stay_in_order_one_at_a_time() {
        let (sink, resume) = FakeSink::paused();
        let (broadcaster, recorder) = start(&sink, "in-order", &quick());
        let object = pod_ref("uid-1", None);
        for reason in ["First", "Second", "Third"] {
            recorder.record(&object, EventType::Normal, reason, "m");
        }
        begun(&sink, 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            sink.started.load(Ordering::SeqCst),
            1,
            "one write per object"
        );
        resume.send_replace(true);
        broadcaster.flush().await;
        let reasons: Vec<String> = sink
            .calls()
            .into_iter()
            .map(|call| match call {
                Call::Create(event) | Call::Patch(event, _) => event.reason.unwrap_or_default(),
            })
            .collect();
        assert_eq!(reasons, ["First", "Second", "Third"]);
    }

    fn write_of(event: Event) -> Write {
        Write { event, patch: None }
    }

    fn pod_ref(uid: &str, field_path: Option<&str>) -> ObjectReference {
        ObjectReference {
            kind: Some("Pod".into()),
            name: Some("foo".into()),
            namespace: Some("baz".into()),
            uid: Some(uid.into()),
            api_version: Some("v1".into()),
            field_path: field_path.map(Into::into),
            ..ObjectReference::default()
        }
    }

    /// client-go `TestWriteEventError`, plus server errors, which are retried here.
    #[tokio::test]
    async fn write_event_error() {
        type MakeError = fn() -> kube::Error;
        let cases: [(&str, MakeError, usize); 6] = [
            (
                "giveUp1",
                || kube::Error::BuildRequest(kube::core::request::Error::Validation("bad".into())),
                1,
            ),
            ("giveUp2", || api_error(400, "BadRequest"), 1),
            ("alreadyExists", || api_error(409, "AlreadyExists"), 1),
            ("retry1", || api_error(503, "ServiceUnavailable"), 12),
            ("retry2", transport_error, 12),
            ("succeedEventually", transport_error, 2),
        ];
        for (case, error, attempts) in cases {
            let times_to_fail = if case == "succeedEventually" { 2 } else { 1000 };
            let sink = FakeSink::failing(move |_, seen| (seen < times_to_fail).then(error));
            let (mut worker, _stop) = worker(sink.clone());
            worker.write(&write_of(Event::default())).await;
            assert_eq!(sink.calls().len(), attempts, "case {case}");
        }
    }

    #[test]
    fn namespace_terminating_is_not_retried() {
        let status = Status::failure("namespace is terminating", "Forbidden")
            .with_code(403)
            .with_details(StatusDetails {
                name: String::new(),
                group: String::new(),
                kind: String::new(),
                uid: String::new(),
                causes: vec![StatusCause {
                    reason: "NamespaceTerminating".into(),
                    message: String::new(),
                    field: String::new(),
                }],
                retry_after_seconds: 0,
            });
        assert_eq!(
            retry_policy(&kube::Error::Api(Box::new(status))),
            Retry::Never { expected: true }
        );
        assert_eq!(
            retry_policy(&api_error(403, "Forbidden")),
            Retry::Never { expected: false }
        );
        assert_eq!(
            retry_policy(&api_error(429, "TooManyRequests")),
            Retry::Later
        );
    }

    #[test]
    fn only_the_first_retry_pause_is_jittered() {
        assert_eq!(
            retry_delay(1, RETRY_INTERVAL, 0.25),
            Duration::from_millis(2500)
        );
        assert_eq!(retry_delay(2, RETRY_INTERVAL, 0.25), RETRY_INTERVAL);
        assert_eq!(retry_delay(11, RETRY_INTERVAL, 0.0), RETRY_INTERVAL);
    }

    /// client-go `TestUpdateExpiredEvent`: a repeat whose Event is gone is created again.
    #[tokio::test]
    async fn update_expired_event() {
        let sink = FakeSink::failing(|call, _| {
            matches!(call, Call::Patch(..)).then(|| api_error(404, "NotFound"))
        });
        let (mut worker, _stop) = worker(sink.clone());
        let mut event = pod_event("p", "ns", "expired", "gone");
        event.count = Some(2);
        let patch = serde_json::json!({ "count": 2 });
        worker
            .write(&Write {
                event: event.clone(),
                patch: Some(patch.clone()),
            })
            .await;
        assert_eq!(
            sink.calls(),
            vec![Call::Patch(event.clone(), patch), Call::Create(event)]
        );
    }

    /// client-go `TestCancelEvent`: once the broadcaster is shut down, one attempt only.
    #[tokio::test]
    async fn cancel_event() {
        let sink = FakeSink::failing(|_, _| Some(transport_error()));
        let (mut worker, stop) = worker(sink.clone());
        stop.send_replace(true);
        worker.write(&write_of(Event::default())).await;
        assert_eq!(sink.calls().len(), 1);
    }

    /// client-go `TestEventf`: what each recorded event is written as.
    #[tokio::test]
    async fn eventf() {
        let sink = FakeSink::new();
        let (broadcaster, recorder) = start(&sink, "test-host", &quick());
        let container2 = pod_ref("bar", Some("spec.containers[2]"));
        let pod = pod_ref("bar", None);
        let container3 = pod_ref("differentUid", Some("spec.containers[3]"));
        let table = [
            (&container2, "Started", "some verbose message: 1", 1),
            (&pod, "Killed", "some other verbose message: 1", 1),
            (&container2, "Started", "some verbose message: 1", 2),
            (&container3, "Started", "some verbose message: 1", 1),
            (&container2, "Started", "some verbose message: 1", 3),
            (&container3, "Stopped", "some verbose message: 1", 1),
            (&container3, "Stopped", "some verbose message: 1", 2),
        ];
        for (object, reason, message, _) in &table {
            recorder.record(object, EventType::Normal, reason, message);
        }
        broadcaster.flush().await;
        let calls = sink.calls();
        assert_eq!(calls.len(), table.len(), "{calls:?}");
        for (call, (object, reason, message, count)) in calls.iter().zip(&table) {
            let (event, update) = match call {
                Call::Create(event) => (event, false),
                Call::Patch(event, _) => (event, true),
            };
            assert_eq!(update, *count > 1, "{call:?}");
            let mut expected = Event {
                metadata: ObjectMeta {
                    name: Some("foo".into()),
                    namespace: Some("baz".into()),
                    ..ObjectMeta::default()
                },
                involved_object: (*object).clone(),
                reason: Some((*reason).into()),
                message: Some((*message).into()),
                source: Some(EventSource {
                    component: Some("eventTest".into()),
                    host: None,
                }),
                reporting_component: Some("eventTest".into()),
                reporting_instance: Some("test-host".into()),
                count: Some(*count),
                type_: Some("Normal".into()),
                ..Event::default()
            };
            let name = event.metadata.name.clone().unwrap_or_default();
            assert!(name.starts_with("foo."), "{name}");
            expected.metadata.name = Some(name);
            expected.first_timestamp = event.first_timestamp.clone();
            expected.last_timestamp = event.last_timestamp.clone();
            assert_eq!(event, &expected);
        }
    }

    /// client-go `TestEventfNoNamespace`: events about cluster-scoped objects go to `default`.
    #[test]
    fn eventf_no_namespace() {
        let mut object = pod_ref("bar", Some("spec.containers[2]"));
        object.namespace = None;
        let event = new_event(
            &object,
            EventType::Normal,
            "Started",
            "some verbose message: 1",
            ("eventTest", "host"),
            at(0),
            1,
        );
        assert_eq!(event.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(event.metadata.name.as_deref(), Some("foo.1"));
        assert_eq!(event.involved_object.namespace, None);
        assert_eq!(event.count, Some(1));
        assert_eq!(event.first_timestamp, event.last_timestamp);
    }

    /// client-go `TestLotsOfEvents`: a full queue of events that each fail four times is
    /// written completely.
    #[tokio::test]
    async fn lots_of_events() {
        let attempts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let counted = attempts.clone();
        let sink = FakeSink::failing(move |call, _| {
            let Call::Create(event) = call else {
                return None;
            };
            let mut attempts = counted.lock().unwrap();
            let n = attempts
                .entry(event.message.clone().unwrap_or_default())
                .or_default();
            *n += 1;
            (*n < 5).then(transport_error)
        });
        let (broadcaster, recorder) = start(&sink, "host", &quick());
        for i in 0..MAX_QUEUED_EVENTS {
            // A unique object avoids the spam filter, a unique reason the aggregation.
            let mut object = pod_ref("bar", None);
            object.name = Some(format!("foo-{i}"));
            recorder.record(
                &object,
                EventType::Normal,
                &format!("Reason-{i}"),
                &i.to_string(),
            );
        }
        assert_eq!(broadcaster.dropped(), 0);
        broadcaster.flush().await;
        let attempts = attempts.lock().unwrap();
        assert_eq!(attempts.len(), MAX_QUEUED_EVENTS);
        assert!(attempts.values().all(|n| *n == 5), "{attempts:?}");
    }

    /// Beyond client-go's tests: a full queue drops (and counts) events instead of blocking.
    #[tokio::test]
    async fn a_full_queue_drops_and_counts_events() {
        let (sink, resume) = FakeSink::paused();
        let options = BroadcasterOptions {
            queue_capacity: 3,
            ..quick()
        };
        let (broadcaster, recorder) = start(&sink, "host", &options);
        let record = |reason: &str| {
            recorder.record(&pod_ref("bar", None), EventType::Normal, reason, "m");
        };
        record("first");
        while broadcaster.queued() > 0 {
            tokio::task::yield_now().await;
        }
        // The sink holds the first event and does not answer: three fit, two are dropped.
        for reason in ["a", "b", "c", "d", "e"] {
            record(reason);
        }
        assert_eq!(broadcaster.queued(), 3);
        assert_eq!(broadcaster.dropped(), 2);
        resume.send_replace(true);
        broadcaster.flush().await;
        let reasons: Vec<String> = sink
            .calls()
            .iter()
            .filter_map(|call| match call {
                Call::Create(event) => event.reason.clone(),
                Call::Patch(..) => None,
            })
            .collect();
        assert_eq!(reasons, ["first", "a", "b", "c"]);
    }

    /// `flush` returns only once what was queued before it has been written.
    #[tokio::test]
    async fn flush_waits_for_queued_events() {
        let (sink, resume) = FakeSink::paused();
        let (_broadcaster, recorder) = start(&sink, "host", &quick());
        recorder.record(&pod_ref("bar", None), EventType::Warning, "Failed", "m");
        let mut flush = std::pin::pin!(recorder.flush());
        assert!(futures::poll!(flush.as_mut()).is_pending());
        tokio::task::yield_now().await;
        assert!(futures::poll!(flush.as_mut()).is_pending());
        assert!(sink.calls().is_empty());
        resume.send_replace(true);
        flush.await;
        assert_eq!(sink.calls().len(), 1);
    }

    /// Shutdown writes what is queued, then refuses new events.
    #[tokio::test]
    async fn shutdown_drains_the_queue() {
        let sink = FakeSink::new();
        let (broadcaster, recorder) = start(&sink, "host", &quick());
        for reason in ["a", "b", "c"] {
            recorder.record(&pod_ref("bar", None), EventType::Normal, reason, "m");
        }
        broadcaster.shutdown().await;
        assert_eq!(sink.calls().len(), 3);
        recorder.record(&pod_ref("bar", None), EventType::Normal, "late", "m");
        assert_eq!(broadcaster.queued(), 0);
        assert_eq!(broadcaster.dropped(), 0);
        broadcaster.flush().await;
        broadcaster.shutdown().await;
    }

    /// Shutdown gives up after the drain timeout when the sink does not answer.
    #[tokio::test]
    async fn shutdown_is_bounded_when_the_sink_does_not_answer() {
        let (sink, _resume) = FakeSink::paused();
        let (broadcaster, recorder) = start(&sink, "host", &quick());
        recorder.record(&pod_ref("bar", None), EventType::Normal, "stuck", "m");
        tokio::time::timeout(Duration::from_secs(10), broadcaster.shutdown())
            .await
            .expect("shutdown bounded by the drain timeout");
        assert!(sink.calls().is_empty());
    }
}
