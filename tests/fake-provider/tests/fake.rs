//! The fake served over its Unix socket and called with the generated clients: capabilities
//! follow the toggles, answers follow upstream's fake, every call is logged.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cpi_transport::{ClientEndpoint, ConnectOptions, CpiChannel};
use fake_provider::{
    CpiError, FakeCall, FakeCloud, FakeZone, ServedFake, call, external_ip, hostname, internal_ip,
    proto as pb,
};
use pb::{Capability, Existence};

fn channel(fake: &ServedFake) -> CpiChannel {
    cpi_transport::connect(
        ClientEndpoint::Unix {
            path: fake.socket_path().to_path_buf(),
        },
        ConnectOptions::default(),
    )
    .unwrap()
}

async fn info(fake: &ServedFake) -> pb::ProviderInfo {
    pb::provider_client::ProviderClient::new(channel(fake))
        .get_provider_info(pb::GetProviderInfoRequest {})
        .await
        .unwrap()
        .into_inner()
}

fn node(name: &str, provider_id: Option<&str>) -> pb::Node {
    pb::Node {
        metadata: Some(pb::ObjectMeta {
            name: name.into(),
            ..Default::default()
        }),
        provider_id: provider_id.map(str::to_string),
        ..Default::default()
    }
}

fn by_id(id: &str) -> pb::ProviderIdRequest {
    pb::ProviderIdRequest {
        provider_id: id.into(),
        consistency: 0,
    }
}

fn by_name(name: &str) -> pb::NodeNameRequest {
    pb::NodeNameRequest {
        node_name: name.into(),
        consistency: 0,
    }
}

#[tokio::test]
async fn capabilities_follow_the_toggles() {
    let legacy = FakeCloud::default().serve().await.unwrap();
    let i = info(&legacy).await;
    assert_eq!(i.name, "fake");
    assert_eq!(i.provider_id_prefixes, vec!["fake://".to_string()]);
    assert_eq!(
        i.capabilities,
        vec![
            Capability::Instances as i32,
            Capability::Zones as i32,
            Capability::LoadBalancer as i32,
            Capability::LoadBalancerNodeSets as i32,
            Capability::Routes as i32
        ]
    );

    let v2 = FakeCloud {
        provider: "aws".into(),
        provider_id_prefixes: vec!["aws://".into(), "fake://".into()],
        instances_v2_enabled: true,
        zones_disabled: true,
        load_balancers_disabled: true,
        routes_disabled: true,
        ..FakeCloud::default()
    }
    .serve()
    .await
    .unwrap();
    let i = info(&v2).await;
    assert_eq!(i.name, "aws");
    assert_eq!(i.provider_id_prefixes, vec!["aws://", "fake://"]);
    assert_eq!(
        i.capabilities,
        vec![Capability::InstancesV2 as i32, Capability::Instances as i32]
    );
    let status = pb::zones_client::ZonesClient::new(channel(&v2))
        .get_zone(pb::GetZoneRequest {})
        .await
        .unwrap_err();
    assert!(matches!(
        CpiError::from_status(&status),
        CpiError::NotImplemented(_)
    ));
    legacy.shutdown().await.unwrap();
    v2.shutdown().await.unwrap();
}

#[tokio::test]
async fn legacy_instances_answer_like_upstream() {
    let fake = FakeCloud {
        ext_id: HashMap::from([("node0".into(), "12345".into())]),
        ext_id_err: HashMap::from([("gone".into(), CpiError::InstanceNotFound("gone".into()))]),
        instance_types: HashMap::from([
            ("node0".into(), "by-name".into()),
            ("fake://12345".into(), "by-id".into()),
        ]),
        addresses: vec![hostname("node0.cloud.internal"), internal_ip("10.0.0.1")],
        zone: FakeZone {
            failure_domain: "us-west-1a".into(),
            region: "us-west".into(),
        },
        ..FakeCloud::default()
    }
    .serve()
    .await
    .unwrap();
    let mut instances = pb::instances_client::InstancesClient::new(channel(&fake));
    let id = instances.instance_id(by_name("node0")).await.unwrap();
    assert_eq!(id.into_inner().instance_id, "12345");
    let missing = instances.instance_id(by_name("other")).await.unwrap();
    assert_eq!(missing.into_inner().instance_id, "");
    let gone = instances.instance_id(by_name("gone")).await.unwrap_err();
    assert!(matches!(
        CpiError::from_status(&gone),
        CpiError::InstanceNotFound(_)
    ));
    let t = instances.instance_type(by_name("node0")).await.unwrap();
    assert_eq!(t.into_inner().instance_type.as_deref(), Some("by-name"));
    let t = instances
        .instance_type_by_provider_id(by_id("fake://12345"))
        .await
        .unwrap();
    assert_eq!(t.into_inner().instance_type.as_deref(), Some("by-id"));
    let t = instances
        .instance_type_by_provider_id(by_id("fake://node0"))
        .await
        .unwrap();
    assert_eq!(t.into_inner().instance_type, None);
    let a = instances
        .node_addresses_by_provider_id(by_id("fake://12345"))
        .await
        .unwrap();
    assert_eq!(
        a.into_inner().addresses,
        vec![hostname("node0.cloud.internal"), internal_ip("10.0.0.1")]
    );
    let zone = pb::zones_client::ZonesClient::new(channel(&fake))
        .get_zone_by_provider_id(by_id("fake://12345"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(zone.failure_domain.as_deref(), Some("us-west-1a"));
    assert_eq!(zone.region.as_deref(), Some("us-west"));

    fake.update(|s| s.err = Some(CpiError::Cloud("err!".into())));
    let err = instances
        .node_addresses(by_name("node0"))
        .await
        .unwrap_err();
    assert_eq!(CpiError::from_status(&err), CpiError::Cloud("err!".into()));

    assert_eq!(
        fake.calls(),
        vec![
            call::INSTANCE_ID,
            call::INSTANCE_ID,
            call::INSTANCE_ID,
            call::INSTANCE_TYPE,
            call::INSTANCE_TYPE_BY_PROVIDER_ID,
            call::INSTANCE_TYPE_BY_PROVIDER_ID,
            call::NODE_ADDRESSES_BY_PROVIDER_ID,
            call::GET_ZONE_BY_PROVIDER_ID,
            call::NODE_ADDRESSES,
        ]
    );
    assert_eq!(
        fake.call_log().last(),
        Some(&FakeCall {
            method: call::NODE_ADDRESSES,
            subject: "node0".into()
        })
    );
    fake.clear_calls();
    assert!(fake.calls().is_empty());
}

#[tokio::test]
async fn existence_is_tri_state_and_errors_stay_errors() {
    let fake = FakeCloud {
        instances_v2_enabled: true,
        ..FakeCloud::default()
    }
    .serve()
    .await
    .unwrap();
    let mut v2 = pb::instances_v2_client::InstancesV2Client::new(channel(&fake));
    let mut legacy = pb::instances_client::InstancesClient::new(channel(&fake));
    let exists = |n| pb::InstanceExistsRequest {
        node: Some(n),
        consistency: 0,
    };
    // Upstream `ExistsByProviderID: false, ErrByProviderID: nil` is an authoritative NOT_FOUND.
    let answer = v2
        .instance_exists(exists(node("node0", None)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.existence, Existence::NotFound as i32);
    fake.update(|s| s.exists_by_provider_id = true);
    let answer = legacy
        .instance_exists_by_provider_id(by_id("fake://node0"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.existence, Existence::Exists as i32);
    fake.update(|s| s.existence = Some(Existence::Unknown));
    let answer = v2
        .instance_exists(exists(node("node0", Some("fake://node0"))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.existence, Existence::Unknown as i32);
    fake.update(|s| s.err_by_provider_id = Some(CpiError::Cloud("err!".into())));
    let err = legacy
        .instance_exists_by_provider_id(by_id("fake://node0"))
        .await
        .unwrap_err();
    assert_eq!(CpiError::from_status(&err), CpiError::Cloud("err!".into()));

    fake.update(|s| s.node_shutdown = true);
    let shutdown = legacy
        .instance_shutdown_by_provider_id(by_id("fake://node0"))
        .await
        .unwrap()
        .into_inner();
    assert!(shutdown.shutdown);
    fake.update(|s| s.err_shutdown_by_provider_id = Some(CpiError::Cloud("down?".into())));
    let err = v2
        .instance_shutdown(pb::InstanceShutdownRequest {
            node: Some(node("node0", None)),
            consistency: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(CpiError::from_status(&err), CpiError::Cloud("down?".into()));
    assert_eq!(
        fake.calls(),
        vec![
            call::INSTANCE_EXISTS,
            call::INSTANCE_EXISTS_BY_PROVIDER_ID,
            call::INSTANCE_EXISTS,
            call::INSTANCE_EXISTS_BY_PROVIDER_ID,
            call::INSTANCE_SHUTDOWN_BY_PROVIDER_ID,
            call::INSTANCE_SHUTDOWN,
        ]
    );
}

#[tokio::test]
async fn instance_metadata_answers_like_upstream() {
    let fake = FakeCloud {
        instances_v2_enabled: true,
        provider_id: HashMap::from([("node0".into(), "fake://12345".into())]),
        instance_types: HashMap::from([("fake://abc".into(), "t1.micro".into())]),
        addresses: vec![internal_ip("10.0.0.1"), external_ip("132.143.154.163")],
        zone: FakeZone {
            failure_domain: "us-west-1a".into(),
            region: "us-west".into(),
        },
        additional_labels: HashMap::from([("my.custom.label/foo".into(), "bar".into())]),
        ..FakeCloud::default()
    }
    .serve()
    .await
    .unwrap();
    let mut v2 = pb::instances_v2_client::InstancesV2Client::new(channel(&fake));
    let metadata = |n| pb::InstanceMetadataRequest { node: Some(n) };
    let md = v2
        .instance_metadata(metadata(node("node0", None)))
        .await
        .unwrap()
        .into_inner()
        .metadata
        .unwrap();
    assert_eq!(
        md,
        pb::InstanceMetadata {
            provider_id: Some("fake://12345".into()),
            instance_type: None,
            node_addresses: vec![internal_ip("10.0.0.1"), external_ip("132.143.154.163")],
            zone: Some("us-west-1a".into()),
            region: Some("us-west".into()),
            additional_labels: HashMap::from([("my.custom.label/foo".into(), "bar".into())]),
        }
    );
    // Instance type is keyed by the node's provider ID; the provider ID by node name.
    let md = v2
        .instance_metadata(metadata(node("node1", Some("fake://abc"))))
        .await
        .unwrap()
        .into_inner()
        .metadata
        .unwrap();
    assert_eq!(md.provider_id, None);
    assert_eq!(md.instance_type.as_deref(), Some("t1.micro"));

    fake.update(|s| s.metadata_err = Some(CpiError::Cloud("metadata error".into())));
    let err = v2
        .instance_metadata(metadata(node("node0", None)))
        .await
        .unwrap_err();
    assert_eq!(
        CpiError::from_status(&err),
        CpiError::Cloud("metadata error".into())
    );
    fake.update(|s| s.override_metadata = Some(None));
    let none = v2
        .instance_metadata(metadata(node("node0", None)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.metadata, None);
    assert_eq!(fake.calls(), vec![call::INSTANCE_METADATA; 4]);
}

#[tokio::test]
async fn request_delay_is_applied_per_call() {
    let fake = FakeCloud {
        request_delay: Duration::from_millis(50),
        ..FakeCloud::default()
    }
    .serve()
    .await
    .unwrap();
    let mut instances = pb::instances_client::InstancesClient::new(channel(&fake));
    let started = Instant::now();
    instances.node_addresses(by_name("node0")).await.unwrap();
    instances.node_addresses(by_name("node0")).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(fake.calls().len(), 2);
}

#[tokio::test]
async fn dropping_the_fake_stops_serving() {
    let fake = FakeCloud::default().serve().await.unwrap();
    let path = fake.socket_path().to_path_buf();
    assert!(path.exists());
    drop(fake);
    assert!(!path.exists(), "the socket directory is removed on drop");
}

fn lb_fence() -> pb::Fence {
    pb::Fence {
        lease: "kube-system/cloud-controller-manager".into(),
        holder_identity: "test".into(),
        lease_transitions: 1,
        lease_uid: "uid".into(),
    }
}

fn lb_service(name: &str, uid: &str) -> pb::Service {
    pb::Service {
        metadata: Some(pb::ObjectMeta {
            name: name.into(),
            namespace: "default".into(),
            uid: uid.into(),
            ..Default::default()
        }),
        r#type: "LoadBalancer".into(),
        ports: vec![pb::ServicePort {
            name: String::new(),
            protocol: "TCP".into(),
            port: 80,
            target_port_number: None,
            target_port_name: None,
            node_port: Some(30080),
            app_protocol: None,
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn load_balancer_calls_follow_upstream_fake() {
    let fake = FakeCloud {
        external_ip: "203.0.113.10".into(),
        balancer_ip_mode: Some("Proxy".into()),
        zone: FakeZone {
            failure_domain: String::new(),
            region: "us-central".into(),
        },
        ..FakeCloud::default()
    }
    .serve()
    .await
    .unwrap();
    let mut lb = pb::load_balancer_client::LoadBalancerClient::new(channel(&fake));
    let svc = lb_service("s", "1234-5678-9abc-def0-1234-5678-9abc-def0-extra");
    let name = lb
        .get_load_balancer_name(pb::LoadBalancerRequest {
            cluster_name: "c".into(),
            service: Some(svc.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .name;
    assert_eq!(name, "a123456789abcdef0123456789abcdef");
    let ensured = lb
        .ensure_load_balancer(pb::EnsureLoadBalancerRequest {
            cluster_name: "c".into(),
            service: Some(svc.clone()),
            nodes: vec![node("n1", Some("fake://n1")), node("n2", None)],
            fence: Some(lb_fence()),
            allow_replacement: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ingress = &ensured.status.unwrap().ingress[0];
    assert_eq!(ingress.ip, "203.0.113.10");
    assert_eq!(ingress.ip_mode.as_deref(), Some("Proxy"));
    let balancer = fake.state().balancers.get(&name).cloned().unwrap();
    assert_eq!(balancer.region, "us-central");
    assert_eq!(balancer.hosts, ["n1", "n2"]);
    assert_eq!(balancer.ports[0].port, 80);
    let calls = fake.ensure_calls();
    assert_eq!(calls[0].service, "default/s");
    assert_eq!(calls[0].provider_ids, ["fake://n1", ""]);

    lb.update_load_balancer(pb::UpdateLoadBalancerRequest {
        cluster_name: "c".into(),
        service: Some(svc.clone()),
        nodes: vec![node("n3", None)],
        fence: Some(lb_fence()),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(fake.update_calls()[0].hosts, ["n3"]);
    assert_eq!(fake.state().balancers[&name].hosts, ["n3"]);

    // Exists follows the script, as upstream's `Exists`.
    let got = lb
        .get_load_balancer(pb::LoadBalancerRequest {
            cluster_name: "c".into(),
            service: Some(svc.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!got.exists);

    // Scripted errors: RETRY_AFTER keeps its delay, IMPLEMENTED_ELSEWHERE its class; `err` is
    // the fallback of every LB call.
    fake.update(|f| {
        f.ensure_err = Some(CpiError::RetryAfter {
            message: "LB create in progress".into(),
            delay: Duration::from_secs(42),
        });
        f.update_err = Some(CpiError::ImplementedElsewhere("elsewhere".into()));
        f.err = Some(CpiError::Cloud("boom".into()));
    });
    let status = lb
        .ensure_load_balancer(pb::EnsureLoadBalancerRequest {
            cluster_name: "c".into(),
            service: Some(svc.clone()),
            nodes: vec![],
            fence: Some(lb_fence()),
            allow_replacement: false,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        CpiError::from_status(&status).retry_after(),
        Some(Duration::from_secs(42))
    );
    let status = lb
        .update_load_balancer(pb::UpdateLoadBalancerRequest {
            cluster_name: "c".into(),
            service: Some(svc.clone()),
            nodes: vec![],
            fence: Some(lb_fence()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(
        CpiError::from_status(&status),
        CpiError::ImplementedElsewhere(_)
    ));
    let status = lb
        .ensure_load_balancer_deleted(pb::EnsureLoadBalancerDeletedRequest {
            cluster_name: "c".into(),
            service: Some(svc.clone()),
            fence: Some(lb_fence()),
        })
        .await
        .unwrap_err();
    assert!(matches!(CpiError::from_status(&status), CpiError::Cloud(_)));
    fake.update(|f| f.err = None);
    lb.ensure_load_balancer_deleted(pb::EnsureLoadBalancerDeletedRequest {
        cluster_name: "c".into(),
        service: Some(svc),
        fence: Some(lb_fence()),
    })
    .await
    .unwrap();
    assert!(fake.state().balancers.is_empty());
    let methods: Vec<&str> = fake.lb_calls().iter().map(|c| c.method).collect();
    assert_eq!(
        methods,
        [
            call::CREATE,
            call::UPDATE,
            call::GET,
            call::CREATE,
            call::UPDATE,
            call::DELETE,
            call::DELETE
        ]
    );
    assert!(fake.lb_calls().iter().all(|c| c.subject == "default/s"));
}

fn list(token: &str) -> pb::ListRoutesRequest {
    pb::ListRoutesRequest {
        cluster_name: "c1".into(),
        page_size: 0,
        page_token: token.into(),
    }
}

fn create(node: &str, cidr: &str) -> pb::CreateRouteRequest {
    pb::CreateRouteRequest {
        cluster_name: "c1".into(),
        name_hint: format!("uid-{node}"),
        route: Some(pb::Route {
            target_node: node.into(),
            destination_cidr: cidr.into(),
            ..Default::default()
        }),
        fence: Some(lb_fence()),
    }
}

#[tokio::test]
async fn routes_are_paged_capped_and_a_duplicate_create_sticks_as_upstream() {
    let mut fake = FakeCloud {
        route_page_size: 2,
        route_capacity: Some(4),
        ..FakeCloud::default()
    };
    for i in 0..3 {
        fake.add_route(
            "c1",
            pb::Route {
                target_node: format!("n{i}"),
                destination_cidr: format!("10.0.{i}.0/24"),
                ..Default::default()
            },
        );
    }
    fake.add_route("other", pb::Route::default());
    let served = fake.serve().await.unwrap();
    let mut routes = pb::routes_client::RoutesClient::new(channel(&served));

    let first = routes.list_routes(list("")).await.unwrap().into_inner();
    assert_eq!(first.routes.len(), 2);
    assert_eq!(first.capacity, Some(4));
    let second = routes
        .list_routes(list(&first.next_page_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.routes.len(), 1, "only cluster c1's routes");
    assert!(second.next_page_token.is_empty());

    routes
        .create_route(create("n3", "10.0.3.0/24"))
        .await
        .unwrap();
    let created = &served.routes("c1")[3];
    assert_eq!(created.name, "c1-uid-n3");
    assert!(created.ownership.as_ref().unwrap().owned);
    // Full: the fifth route does not fit.
    assert!(
        routes
            .create_route(create("n4", "10.0.4.0/24"))
            .await
            .is_err()
    );
    // A duplicate fails and, as upstream, makes every later call that checks `err` fail.
    routes
        .create_route(create("n3", "10.0.3.0/24"))
        .await
        .unwrap_err();
    routes.list_routes(list("")).await.unwrap_err();
    assert_eq!(served.count(call::CREATE_ROUTE), 3);
    assert_eq!(served.count(call::LIST_ROUTES), 3);
}
