//! The upstream `controllers/nodelifecycle/node_lifecycle_controller_test.go` table tests, one
//! `#[tokio::test]` per case, each running one `monitor_nodes()` pass against a real
//! kube-apiserver and the fake provider served over a real Unix socket.
//!
//! Test names are `<upstream test function>_<upstream case name>` in snake case:
//! `nodes_deleted_*` ← `Test_NodesDeleted` (`instance_v2_*` for the `[instancev2]` cases),
//! `nodes_shutdown_*` ← `Test_NodesShutdown`, `get_provider_id_*` ← `Test_GetProviderID` (the
//! legacy-Instances cases, observed through the provider ID the existence check is asked about).
//! The three InstancesV2 `Test_GetProviderID` cases are not mirrored: with InstancesV2 the
//! existence and shutdown checks hand the whole Node to the provider, so no provider ID is ever
//! resolved during a pass (upstream's `MonitorNodes` never reaches that branch either).
//!
//! Isolation: `monitor_nodes` walks its whole node cache, so each test builds a cache that
//! watches only its own node (`fieldSelector=metadata.name=<unique name>`). Tests therefore run
//! in parallel on the control plane shared by this binary without ever seeing each other's
//! nodes, and need no private control plane or global lock.
//!
//! Fixture adaptations: upstream's provider ID `node0` (not of the `<provider>://<id>` form)
//! becomes `fake://node0`, because this project leaves nodes whose provider ID another provider
//! owns alone (and the shim framework refuses malformed IDs). The API server adds
//! `node.kubernetes.io/not-ready:NoSchedule` to every created node; taint comparisons leave it
//! out. Every Event written about the node is checked: `involvedObject.apiVersion` must be set
//! (as upstream's `Test_NodesShutdown` asserts), and the reasons must be exactly the expected ones.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use cloud_controller_manager::well_known::TAINT_SHUTDOWN;
use cloud_controller_manager::{DeletionPolicy, NodeLifecycleController};
use fake_provider::{CpiError, FakeCall, FakeCloud, ServedFake, call, proto::Existence};
use k8s_openapi::api::core::v1::{Event, Node, NodeCondition, NodeSpec, NodeStatus, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use support::{harness, taints_of};
use test_control_plane::unique_name;

// ------------------------------------------------------------------------------------------------
// Harness (the fake provider, `Cloud`, client and node cache are in `support`)
// ------------------------------------------------------------------------------------------------

/// What one `monitor_nodes` pass left behind.
struct Outcome {
    fake: ServedFake,
    before: Node,
    /// `None` when the node was deleted.
    after: Option<Node>,
    events: Vec<Event>,
}

/// Serves `fake`, creates `node` (status through the status subresource), runs one
/// `monitor_nodes` pass over a cache holding only that node, and reads back the node and every
/// Event about it.
async fn monitor(fake: FakeCloud, node: Node) -> Outcome {
    monitor_with(fake, node, DeletionPolicy::upstream(), 1).await
}

/// [`monitor`] with a deletion policy and several passes.
async fn monitor_with(
    fake: FakeCloud,
    node: Node,
    policy: DeletionPolicy,
    passes: usize,
) -> Outcome {
    let h = harness(fake).await;
    let before = h.create(node).await;
    let name = before.name_any();
    let cache = h.cache_for(&before).await;
    let controller = NodeLifecycleController::new(
        h.client.clone(),
        h.cloud.clone(),
        cache.store.clone(),
        h.recorder("cloud-node-lifecycle-controller"),
    )
    .with_deletion_policy(policy);
    for _ in 0..passes {
        controller.monitor_nodes().await;
    }

    // Events are written off the reconcile path: wait for the ones recorded by the passes.
    h.events.flush().await;
    let after = h.nodes().get_opt(&name).await.expect("get node");
    let events: Api<Event> = Api::namespaced(h.client.clone(), "default");
    let events = events
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .expect("list events")
        .items;
    Outcome {
        fake: h.fake,
        before,
        after,
        events,
    }
}

impl Outcome {
    fn name(&self) -> String {
        self.before.name_any()
    }

    /// Every Event names the node with an apiVersion (upstream's check), and the reasons are
    /// exactly `reasons`.
    fn assert_events(&self, reasons: &[&str]) {
        for event in &self.events {
            assert_eq!(
                event.involved_object.api_version.as_deref(),
                Some("v1"),
                "event involvedObject.apiVersion must be set: {event:?}"
            );
            assert_eq!(event.involved_object.kind.as_deref(), Some("Node"));
        }
        let mut got: Vec<&str> = self
            .events
            .iter()
            .map(|e| e.reason.as_deref().unwrap_or_default())
            .collect();
        got.sort_unstable();
        let mut want = reasons.to_vec();
        want.sort_unstable();
        assert_eq!(got, want, "events: {:?}", self.events);
    }

    /// The node was deleted, with upstream's `DeletingNode` event.
    fn assert_deleted(&self) {
        assert!(self.after.is_none(), "node should have been deleted");
        self.assert_events(&["DeletingNode"]);
        let event = &self.events[0];
        assert_eq!(event.type_.as_deref(), Some("Normal"));
        assert_eq!(
            event.message.as_deref(),
            Some(
                format!(
                    "Deleting node {} because it does not exist in the cloud provider",
                    self.name()
                )
                .as_str()
            )
        );
        assert_eq!(event.involved_object.uid, self.before.metadata.uid);
    }

    fn after(&self) -> &Node {
        self.after.as_ref().expect("node should still exist")
    }

    /// The node was not written at all, and nothing was recorded about it.
    fn assert_unchanged(&self) {
        self.assert_node_unchanged();
        self.assert_events(&[]);
    }

    /// The node was not written and nothing but the Warning `DeletionSuppressed` (our addition
    /// to upstream: a NotReady node whose existence could not be checked says so) was emitted.
    fn assert_kept_with_warning(&self) {
        self.assert_node_unchanged();
        self.assert_events(&["DeletionSuppressed"]);
    }

    fn assert_node_unchanged(&self) {
        let after = self.after();
        assert_eq!(
            after.resource_version(),
            self.before.resource_version(),
            "node was written"
        );
        assert_eq!(after, &self.before);
    }

    /// Only the shutdown taint was added.
    fn assert_shutdown_tainted(&self) {
        let after = self.after();
        assert_eq!(
            taints_of(after),
            vec![Taint {
                key: TAINT_SHUTDOWN.to_string(),
                value: None,
                effect: "NoSchedule".to_string(),
                time_added: None,
            }]
        );
        assert_eq!(
            after.spec.as_ref().and_then(|s| s.provider_id.clone()),
            self.before
                .spec
                .as_ref()
                .and_then(|s| s.provider_id.clone())
        );
        assert_eq!(after.status, self.before.status);
        assert_eq!(after.metadata.labels, self.before.metadata.labels);
        self.assert_events(&[]);
    }

    fn calls(&self) -> Vec<String> {
        self.fake.calls()
    }

    fn log(&self) -> Vec<FakeCall> {
        self.fake.call_log()
    }
}

// ------------------------------------------------------------------------------------------------
// Fixtures
// ------------------------------------------------------------------------------------------------

/// Upstream's `node0` with a Ready condition of `ready` (and 2015 heartbeat/transition times).
fn node(ready: &str, provider_id: Option<&str>) -> Node {
    let time = Time("2015-01-01T12:00:00Z".parse().unwrap());
    let mut node = Node::default();
    node.metadata.name = Some(unique_name("node0"));
    node.spec = Some(NodeSpec {
        provider_id: provider_id.map(str::to_string),
        ..Default::default()
    });
    node.status = Some(NodeStatus {
        conditions: Some(vec![NodeCondition {
            type_: "Ready".to_string(),
            status: ready.to_string(),
            last_heartbeat_time: Some(time.clone()),
            last_transition_time: Some(time),
            ..Default::default()
        }]),
        ..Default::default()
    });
    node
}

fn err(message: &str) -> Option<CpiError> {
    Some(CpiError::Cloud(message.to_string()))
}

fn calls_of(methods: &[&str]) -> Vec<String> {
    methods.iter().map(|m| m.to_string()).collect()
}

fn legacy(fake: FakeCloud) -> FakeCloud {
    fake
}

fn v2(fake: FakeCloud) -> FakeCloud {
    FakeCloud {
        instances_v2_enabled: true,
        ..fake
    }
}

// ------------------------------------------------------------------------------------------------
// Test_NodesDeleted
// ------------------------------------------------------------------------------------------------

/// Upstream "node is not ready and does not exist".
#[tokio::test]
async fn nodes_deleted_node_is_not_ready_and_does_not_exist() {
    let o = monitor(
        legacy(FakeCloud {
            exists_by_provider_id: false,
            ..FakeCloud::default()
        }),
        node("False", None),
    )
    .await;
    o.assert_deleted();
    // No provider ID and no instance ID: gone before any other call.
    assert_eq!(o.calls(), calls_of(&[call::INSTANCE_ID]));
}

/// Upstream "node is not ready and provider returns err": an error is never "gone".
#[tokio::test]
async fn nodes_deleted_node_is_not_ready_and_provider_returns_err() {
    let o = monitor(
        legacy(FakeCloud {
            exists_by_provider_id: false,
            err_by_provider_id: err("err!"),
            ..FakeCloud::default()
        }),
        node("False", Some("fake://node0")),
    )
    .await;
    o.assert_kept_with_warning();
    assert_eq!(
        o.log(),
        vec![FakeCall {
            method: call::INSTANCE_EXISTS_BY_PROVIDER_ID,
            subject: "fake://node0".into()
        }]
    );
}

/// Upstream "node is not ready but still exists".
#[tokio::test]
async fn nodes_deleted_node_is_not_ready_but_still_exists() {
    let o = monitor(
        legacy(FakeCloud {
            exists_by_provider_id: true,
            ..FakeCloud::default()
        }),
        node("False", Some("fake://node0")),
    )
    .await;
    o.assert_unchanged();
    assert_eq!(
        o.calls(),
        calls_of(&[
            call::INSTANCE_EXISTS_BY_PROVIDER_ID,
            call::INSTANCE_SHUTDOWN_BY_PROVIDER_ID
        ])
    );
}

/// Upstream "node ready condition is unknown, node doesn't exist".
#[tokio::test]
async fn nodes_deleted_node_ready_condition_is_unknown_node_doesnt_exist() {
    let o = monitor(
        legacy(FakeCloud {
            exists_by_provider_id: false,
            ..FakeCloud::default()
        }),
        node("Unknown", None),
    )
    .await;
    o.assert_deleted();
    // No provider ID and no instance ID: gone before any other call.
    assert_eq!(o.calls(), calls_of(&[call::INSTANCE_ID]));
}

/// Upstream "node ready condition is unknown, node exists".
#[tokio::test]
async fn nodes_deleted_node_ready_condition_is_unknown_node_exists() {
    let n = node("Unknown", None);
    let o = monitor(
        legacy(FakeCloud {
            node_shutdown: false,
            exists_by_provider_id: true,
            ext_id: HashMap::from([(n.name_any(), "foo://12345".to_string())]),
            ..FakeCloud::default()
        }),
        n,
    )
    .await;
    o.assert_unchanged();
    assert_eq!(
        o.log(),
        vec![
            FakeCall {
                method: call::INSTANCE_ID,
                subject: o.name()
            },
            FakeCall {
                method: call::INSTANCE_EXISTS_BY_PROVIDER_ID,
                subject: "fake://foo://12345".into()
            },
            FakeCall {
                method: call::INSTANCE_ID,
                subject: o.name()
            },
            FakeCall {
                method: call::INSTANCE_SHUTDOWN_BY_PROVIDER_ID,
                subject: "fake://foo://12345".into()
            },
        ]
    );
}

/// Upstream "node is ready, but provider said it is deleted (maybe a bug in provider)": Ready
/// nodes are never checked.
#[tokio::test]
async fn nodes_deleted_node_is_ready_but_provider_said_it_is_deleted_maybe_a_bug_in_provider() {
    let o = monitor(
        legacy(FakeCloud {
            exists_by_provider_id: false,
            ..FakeCloud::default()
        }),
        node("True", Some("fake://node0")),
    )
    .await;
    o.assert_unchanged();
    assert_eq!(o.calls(), Vec::<String>::new());
}

/// Upstream "[instance2] node is not ready and does not exist".
#[tokio::test]
async fn nodes_deleted_instance_v2_node_is_not_ready_and_does_not_exist() {
    let o = monitor(
        v2(FakeCloud {
            exists_by_provider_id: false,
            ..FakeCloud::default()
        }),
        node("False", None),
    )
    .await;
    o.assert_deleted();
    assert_eq!(o.calls(), calls_of(&[call::INSTANCE_EXISTS]));
}

/// Upstream "[instancev2] node is not ready and provider returns err".
#[tokio::test]
async fn nodes_deleted_instance_v2_node_is_not_ready_and_provider_returns_err() {
    let o = monitor(
        v2(FakeCloud {
            exists_by_provider_id: false,
            err_by_provider_id: err("err!"),
            ..FakeCloud::default()
        }),
        node("False", Some("fake://node0")),
    )
    .await;
    o.assert_kept_with_warning();
    assert_eq!(o.calls(), calls_of(&[call::INSTANCE_EXISTS]));
}

/// Upstream "[instancev2] node is not ready but still exists".
#[tokio::test]
async fn nodes_deleted_instance_v2_node_is_not_ready_but_still_exists() {
    let o = monitor(
        v2(FakeCloud {
            exists_by_provider_id: true,
            ..FakeCloud::default()
        }),
        node("False", Some("fake://node0")),
    )
    .await;
    o.assert_unchanged();
    assert_eq!(
        o.calls(),
        calls_of(&[call::INSTANCE_EXISTS, call::INSTANCE_SHUTDOWN])
    );
}

/// Upstream "[instancev2] node ready condition is unknown, node doesn't exist".
#[tokio::test]
async fn nodes_deleted_instance_v2_node_ready_condition_is_unknown_node_doesnt_exist() {
    let o = monitor(
        v2(FakeCloud {
            exists_by_provider_id: false,
            ..FakeCloud::default()
        }),
        node("Unknown", None),
    )
    .await;
    o.assert_deleted();
    assert_eq!(o.calls(), calls_of(&[call::INSTANCE_EXISTS]));
}

/// Upstream "[instancev2] node ready condition is unknown, node exists".
#[tokio::test]
async fn nodes_deleted_instance_v2_node_ready_condition_is_unknown_node_exists() {
    let n = node("Unknown", None);
    let o = monitor(
        v2(FakeCloud {
            node_shutdown: false,
            exists_by_provider_id: true,
            ext_id: HashMap::from([(n.name_any(), "foo://12345".to_string())]),
            ..FakeCloud::default()
        }),
        n,
    )
    .await;
    o.assert_unchanged();
    assert_eq!(
        o.calls(),
        calls_of(&[call::INSTANCE_EXISTS, call::INSTANCE_SHUTDOWN])
    );
}

/// Upstream "[instancev2] node is ready, but provider said it is deleted (maybe a bug in
/// provider)".
#[tokio::test]
async fn nodes_deleted_instance_v2_node_is_ready_but_provider_said_it_is_deleted_maybe_a_bug_in_provider()
 {
    let o = monitor(
        v2(FakeCloud {
            exists_by_provider_id: false,
            ..FakeCloud::default()
        }),
        node("True", Some("fake://node0")),
    )
    .await;
    o.assert_unchanged();
    assert_eq!(o.calls(), Vec::<String>::new());
}

// ------------------------------------------------------------------------------------------------
// Test_NodesShutdown
// ------------------------------------------------------------------------------------------------

/// Upstream "node is not ready and was shutdown, but exists".
#[tokio::test]
async fn nodes_shutdown_node_is_not_ready_and_was_shutdown_but_exists() {
    let o = monitor(
        FakeCloud {
            node_shutdown: true,
            exists_by_provider_id: true,
            err_shutdown_by_provider_id: None,
            ..FakeCloud::default()
        },
        node("False", Some("fake://node0")),
    )
    .await;
    o.assert_shutdown_tainted();
}

/// Upstream "node with empty spec providerID is not ready and was shutdown, but exists": the
/// provider ID is resolved through InstanceID for the shutdown check too, and is not written.
#[tokio::test]
async fn nodes_shutdown_node_with_empty_spec_provider_id_is_not_ready_and_was_shutdown_but_exists()
{
    let n = node("False", None);
    let o = monitor(
        FakeCloud {
            node_shutdown: true,
            exists_by_provider_id: true,
            err_shutdown_by_provider_id: None,
            ext_id: HashMap::from([(n.name_any(), "foo://12345".to_string())]),
            ..FakeCloud::default()
        },
        n,
    )
    .await;
    o.assert_shutdown_tainted();
    assert_eq!(
        o.log().last(),
        Some(&FakeCall {
            method: call::INSTANCE_SHUTDOWN_BY_PROVIDER_ID,
            subject: "fake://foo://12345".into()
        })
    );
}

/// Upstream "node with non-existing providerID (missing in cloud provider) gets deleted":
/// InstanceID answers an empty ID.
#[tokio::test]
async fn nodes_shutdown_node_with_non_existing_provider_id_missing_in_cloud_provider_gets_deleted()
{
    let n = node("False", None);
    let o = monitor(
        FakeCloud {
            err_shutdown_by_provider_id: None,
            ext_id: HashMap::from([(n.name_any(), String::new())]),
            ..FakeCloud::default()
        },
        n,
    )
    .await;
    o.assert_deleted();
    // No provider ID and no instance ID: gone before any other call.
    assert_eq!(o.calls(), calls_of(&[call::INSTANCE_ID]));
}

/// Upstream "node with error when getting providerID does not have shutdown taint".
#[tokio::test]
async fn nodes_shutdown_node_with_error_when_getting_provider_id_does_not_have_shutdown_taint() {
    let n = node("False", None);
    let o = monitor(
        FakeCloud {
            err_shutdown_by_provider_id: None,
            ext_id_err: HashMap::from([(n.name_any(), CpiError::Cloud("err!".into()))]),
            ..FakeCloud::default()
        },
        n,
    )
    .await;
    o.assert_kept_with_warning();
    assert_eq!(o.calls(), calls_of(&[call::INSTANCE_ID]));
}

/// Upstream "node with InstanceID returning InstanceNotFound gets deleted".
#[tokio::test]
async fn nodes_shutdown_node_with_instance_id_returning_instance_not_found_gets_deleted() {
    let n = node("False", None);
    let o = monitor(
        FakeCloud {
            err_shutdown_by_provider_id: None,
            ext_id_err: HashMap::from([(
                n.name_any(),
                CpiError::InstanceNotFound("instance not found".into()),
            )]),
            ..FakeCloud::default()
        },
        n,
    )
    .await;
    o.assert_deleted();
    assert_eq!(o.calls(), calls_of(&[call::INSTANCE_ID]));
}

/// Upstream "node is not ready, but there is error checking if node is shutdown": the fixture's
/// instance does not exist, so the node is deleted before any shutdown check.
#[tokio::test]
async fn nodes_shutdown_node_is_not_ready_but_there_is_error_checking_if_node_is_shutdown() {
    let o = monitor(
        FakeCloud {
            node_shutdown: false,
            err_shutdown_by_provider_id: err("err!"),
            ..FakeCloud::default()
        },
        node("False", None),
    )
    .await;
    o.assert_deleted();
    // No provider ID and no instance ID: gone before any other call.
    assert_eq!(o.calls(), calls_of(&[call::INSTANCE_ID]));
}

/// Upstream "node is not ready and is not shutdown": the fixture's instance does not exist.
#[tokio::test]
async fn nodes_shutdown_node_is_not_ready_and_is_not_shutdown() {
    let o = monitor(
        FakeCloud {
            node_shutdown: false,
            err_shutdown_by_provider_id: None,
            ..FakeCloud::default()
        },
        node("False", None),
    )
    .await;
    o.assert_deleted();
    // No provider ID and no instance ID: gone before any other call.
    assert_eq!(o.calls(), calls_of(&[call::INSTANCE_ID]));
}

/// Upstream "node is ready but provider says it's shutdown (maybe a bug by provider)".
#[tokio::test]
async fn nodes_shutdown_node_is_ready_but_provider_says_its_shutdown_maybe_a_bug_by_provider() {
    let o = monitor(
        FakeCloud {
            node_shutdown: true,
            err_shutdown_by_provider_id: None,
            ..FakeCloud::default()
        },
        node("True", None),
    )
    .await;
    o.assert_unchanged();
    assert_eq!(o.calls(), Vec::<String>::new());
}

/// Upstream "node is shutdown but provider says it does not exist": deletion wins.
#[tokio::test]
async fn nodes_shutdown_node_is_shutdown_but_provider_says_it_does_not_exist() {
    let o = monitor(
        FakeCloud {
            node_shutdown: true,
            exists_by_provider_id: false,
            err_shutdown_by_provider_id: None,
            ..FakeCloud::default()
        },
        node("Unknown", None),
    )
    .await;
    o.assert_deleted();
    // No provider ID and no instance ID: gone before any other call.
    assert_eq!(o.calls(), calls_of(&[call::INSTANCE_ID]));
}

/// Not an upstream case (upstream's "error checking if node is shutdown" fixture never exists):
/// the instance exists and the shutdown check fails, so the node is left as it is.
#[tokio::test]
async fn shutdown_check_error_leaves_an_existing_node_untainted() {
    let o = monitor(
        FakeCloud {
            exists_by_provider_id: true,
            err_shutdown_by_provider_id: err("err!"),
            ..FakeCloud::default()
        },
        node("False", Some("fake://node0")),
    )
    .await;
    o.assert_unchanged();
    assert_eq!(
        o.calls(),
        calls_of(&[
            call::INSTANCE_EXISTS_BY_PROVIDER_ID,
            call::INSTANCE_SHUTDOWN_BY_PROVIDER_ID
        ])
    );
}

// ------------------------------------------------------------------------------------------------
// Test_GetProviderID (legacy Instances; observed through the existence check's argument)
// ------------------------------------------------------------------------------------------------

/// Upstream "node initialized with provider ID": the node's provider ID is used as is.
#[tokio::test]
async fn get_provider_id_node_initialized_with_provider_id() {
    let o = monitor(
        FakeCloud {
            exists_by_provider_id: true,
            ..FakeCloud::default()
        },
        node("False", Some("fake://12345")),
    )
    .await;
    o.assert_unchanged();
    assert_eq!(
        o.log()[0],
        FakeCall {
            method: call::INSTANCE_EXISTS_BY_PROVIDER_ID,
            subject: "fake://12345".into()
        }
    );
    assert!(!o.calls().contains(&call::INSTANCE_ID.to_string()));
}

/// Upstream "cloud implemented with Instances": `fake://` + InstanceID.
#[tokio::test]
async fn get_provider_id_cloud_implemented_with_instances() {
    let n = node("False", None);
    let o = monitor(
        FakeCloud {
            exists_by_provider_id: true,
            ext_id: HashMap::from([(n.name_any(), "12345".to_string())]),
            ..FakeCloud::default()
        },
        n,
    )
    .await;
    o.assert_unchanged();
    assert_eq!(
        o.log()[..2],
        [
            FakeCall {
                method: call::INSTANCE_ID,
                subject: o.name()
            },
            FakeCall {
                method: call::INSTANCE_EXISTS_BY_PROVIDER_ID,
                subject: "fake://12345".into()
            },
        ]
    );
}

/// Upstream "cloud implemented with Instances with instance missing": InstanceNotFound is
/// authoritative, so the node is gone without asking anything else.
#[tokio::test]
async fn get_provider_id_cloud_implemented_with_instances_with_instance_missing() {
    let n = node("False", None);
    let o = monitor(
        FakeCloud {
            exists_by_provider_id: true,
            ext_id_err: HashMap::from([(
                n.name_any(),
                CpiError::InstanceNotFound("instance not found".into()),
            )]),
            ..FakeCloud::default()
        },
        n,
    )
    .await;
    o.assert_deleted();
    assert_eq!(o.calls(), calls_of(&[call::INSTANCE_ID]));
}

/// Upstream "cloud implemented with Instances with unknown error": the error stops the check
/// (the node is kept; upstream's exact error text is internal to `getProviderID`).
#[tokio::test]
async fn get_provider_id_cloud_implemented_with_instances_with_unknown_error() {
    let n = node("False", None);
    let o = monitor(
        FakeCloud {
            exists_by_provider_id: false,
            ext_id_err: HashMap::from([(n.name_any(), CpiError::Cloud("unknown error".into()))]),
            ..FakeCloud::default()
        },
        n,
    )
    .await;
    o.assert_kept_with_warning();
    assert_eq!(o.calls(), calls_of(&[call::INSTANCE_ID]));
}

// ------------------------------------------------------------------------------------------------
// Beyond the upstream tables: the CPI's tri-state existence (only NOT_FOUND deletes)
// ------------------------------------------------------------------------------------------------

/// Existence UNKNOWN (which upstream's bool cannot express) never deletes, on either path.
#[tokio::test]
async fn existence_unknown_never_deletes() {
    for fake in [
        legacy(FakeCloud {
            existence: Some(Existence::Unknown),
            ..FakeCloud::default()
        }),
        v2(FakeCloud {
            existence: Some(Existence::Unknown),
            ..FakeCloud::default()
        }),
    ] {
        let o = monitor(fake, node("False", Some("fake://node0"))).await;
        o.assert_kept_with_warning();
        assert_eq!(o.calls().len(), 1, "{:?}", o.calls());
    }
}

/// A node that is Ready again loses the shutdown taint, without asking the provider.
#[tokio::test]
async fn ready_node_loses_the_shutdown_taint() {
    let mut n = node("True", Some("fake://node0"));
    if let Some(spec) = n.spec.as_mut() {
        spec.taints = Some(vec![Taint {
            key: TAINT_SHUTDOWN.to_string(),
            effect: "NoSchedule".to_string(),
            ..Default::default()
        }]);
    }
    let o = monitor(
        FakeCloud {
            node_shutdown: true,
            exists_by_provider_id: true,
            ..FakeCloud::default()
        },
        n,
    )
    .await;
    assert_eq!(taints_of(o.after()), vec![]);
    assert_eq!(o.calls(), Vec::<String>::new());
    o.assert_events(&[]);
}

/// Beyond upstream: a NotReady node whose instance runs again
/// loses the shutdown taint without waiting for the kubelet to report Ready.
#[tokio::test]
async fn running_instance_loses_the_shutdown_taint_before_the_node_is_ready() {
    let mut n = node("False", Some("fake://node0"));
    if let Some(spec) = n.spec.as_mut() {
        spec.taints = Some(vec![Taint {
            key: TAINT_SHUTDOWN.to_string(),
            effect: "NoSchedule".to_string(),
            ..Default::default()
        }]);
    }
    let o = monitor(
        FakeCloud {
            node_shutdown: false,
            exists_by_provider_id: true,
            ..FakeCloud::default()
        },
        n,
    )
    .await;
    assert_eq!(taints_of(o.after()), vec![]);
    o.assert_events(&[]);
    assert_eq!(
        o.calls(),
        calls_of(&[
            call::INSTANCE_EXISTS_BY_PROVIDER_ID,
            call::INSTANCE_SHUTDOWN_BY_PROVIDER_ID
        ])
    );
}

// ---- The deletion policy (beyond upstream: README, the deletion policy) ----

fn careful(grace_period: Duration, confirmations: u32) -> DeletionPolicy {
    DeletionPolicy {
        grace_period,
        confirmations,
        budget: None,
    }
}

/// A node younger than the grace period survives NOT_FOUND.
#[tokio::test]
async fn deletion_policy_grace_period_protects_young_nodes() {
    let n = node("False", Some("fake://12345"));
    let o = monitor_with(
        FakeCloud {
            exists_by_provider_id: false,
            ..FakeCloud::default()
        },
        n,
        careful(Duration::from_secs(3600), 1),
        1,
    )
    .await;
    o.assert_unchanged();
    o.assert_events(&[]);
}

/// One NOT_FOUND is not enough when two confirmations are required; two passes are.
#[tokio::test]
async fn deletion_policy_needs_consecutive_confirmations() {
    let fake = || FakeCloud {
        exists_by_provider_id: false,
        ..FakeCloud::default()
    };
    let once = monitor_with(
        fake(),
        node("False", Some("fake://1")),
        careful(Duration::ZERO, 2),
        1,
    )
    .await;
    once.assert_unchanged();
    let twice = monitor_with(
        fake(),
        node("False", Some("fake://2")),
        careful(Duration::ZERO, 2),
        2,
    )
    .await;
    twice.assert_deleted();
}

/// The provider could not tell (UNKNOWN): the node is kept and a Warning says why.
#[tokio::test]
async fn existence_unknown_is_reported_on_the_node() {
    let o = monitor(
        FakeCloud {
            existence: Some(Existence::Unknown),
            ..FakeCloud::default()
        },
        node("False", Some("fake://12345")),
    )
    .await;
    o.assert_kept_with_warning();
    let event = &o.events[0];
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert!(
        event
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("could not say whether its instance exists"),
        "{event:?}"
    );
    assert_eq!(event.involved_object.uid, o.before.metadata.uid);
}
