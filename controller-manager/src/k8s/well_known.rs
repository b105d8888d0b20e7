//! Well-known label, taint, annotation and condition names of the Kubernetes API that the
//! controllers read or write: one definition each, imported by the controllers and the tests.

/// Taint set by kubelets started with `--cloud-provider=external` until the cloud-node
/// controller has initialised the node.
pub const TAINT_UNINITIALIZED: &str = "node.cloudprovider.kubernetes.io/uninitialized";
/// Taint put on nodes whose instance is shut down.
pub const TAINT_SHUTDOWN: &str = "node.cloudprovider.kubernetes.io/shutdown";
/// Taint the API server's admission adds to every node until its kubelet reports Ready.
pub const TAINT_NOT_READY: &str = "node.kubernetes.io/not-ready";
/// Annotation in which the kubelet publishes `--node-ip`.
pub const ANNOTATION_PROVIDED_NODE_IP: &str = "alpha.kubernetes.io/provided-node-ip";
/// Node condition that names why initialisation keeps failing, set (`True`) while a tainted
/// node fails and removed once it is initialised, so `kubectl describe node` shows the cause
/// after the events have expired.
pub const CONDITION_INITIALIZATION_FAILED: &str = "CloudInitializationFailed";
/// The kubelet's readiness condition.
pub const CONDITION_READY: &str = "Ready";
/// GA instance-type label.
pub const LABEL_INSTANCE_TYPE: &str = "node.kubernetes.io/instance-type";
/// Deprecated beta instance-type label.
pub const LABEL_INSTANCE_TYPE_BETA: &str = "beta.kubernetes.io/instance-type";
/// GA zone label.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Deprecated beta zone label.
pub const LABEL_ZONE_BETA: &str = "failure-domain.beta.kubernetes.io/zone";
/// GA region label.
pub const LABEL_REGION: &str = "topology.kubernetes.io/region";
/// Deprecated beta region label.
pub const LABEL_REGION_BETA: &str = "failure-domain.beta.kubernetes.io/region";
/// Node label excluding a node from load-balancer backends unless its value parses as false.
pub const LABEL_EXCLUDE_FROM_EXTERNAL_LB: &str =
    "node.kubernetes.io/exclude-from-external-load-balancers";
/// Taint key the cluster autoscaler puts on nodes it is about to delete (any value or effect).
pub const TAINT_TO_BE_DELETED_BY_CLUSTER_AUTOSCALER: &str = "ToBeDeletedByClusterAutoscaler";
/// Finalizer the service-lb controller keeps on Services that may own a cloud load balancer.
pub const FINALIZER_LOAD_BALANCER_CLEANUP: &str = "service.kubernetes.io/load-balancer-cleanup";
/// Service annotation read when `spec.loadBalancerSourceRanges` is empty.
pub const ANNOTATION_LOAD_BALANCER_SOURCE_RANGES: &str =
    "service.beta.kubernetes.io/load-balancer-source-ranges";
