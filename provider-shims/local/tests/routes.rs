//! The real `local-shim` binary programming routes into a throwaway network namespace over
//! netlink, called over mutual TLS; the kernel table is checked with `ip`. Each test has its
//! own namespace and state directory, so they run in parallel. Needs root (CAP_NET_ADMIN and
//! CAP_SYS_ADMIN) and iproute2's `ip`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod routes_support;

use cpi_proto::CpiError;
use routes_support::*;

#[tokio::test]
async fn create_is_idempotent_and_a_new_gateway_replaces_the_route_in_the_named_namespace() {
    let netns = Netns::new();
    let dir = ShimDir::new();
    let mut shim = dir.start(&route_flags(&netns, "4242")).await;
    let client = &mut shim.client;

    create(client, route("n1", "10.244.1.0/24", &["10.99.0.11"]))
        .await
        .unwrap();
    create(client, route("n1", "10.244.1.0/24", &["10.99.0.11"]))
        .await
        .unwrap();
    let lines = netns.routes("-4", "4242", "10.244.1.0/24");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("via 10.99.0.11") && lines[0].contains("proto 108"),
        "{lines:?}"
    );
    // The route is in the namespace, not in the test's own.
    let host = std::process::Command::new("ip")
        .args(["-4", "route", "show", "table", "4242"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&host.stdout).contains("10.244.1.0/24"),
        "route leaked into the host namespace"
    );

    // The node's address changed: one route, through the new next hop.
    create(client, route("n1", "10.244.1.0/24", &["10.99.0.12"]))
        .await
        .unwrap();
    let lines = netns.routes("-4", "4242", "10.244.1.0/24");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("via 10.99.0.12"), "{lines:?}");

    let (routes, _) = list_all(client, 0).await;
    let listed = listed(&routes, "10.244.1.0/24");
    assert_eq!(listed.target_node, "n1");
    assert_eq!(listed.target_node_addresses[0].address, "10.99.0.12");
    let ownership = listed.ownership.clone().unwrap();
    assert!(ownership.owned);
    assert_eq!(ownership.cluster_id.as_deref(), Some(CLUSTER));
}

#[tokio::test]
async fn list_pages_of_two_over_five_routes_see_each_once() {
    let netns = Netns::new();
    let dir = ShimDir::new();
    let mut shim = dir.start(&route_flags(&netns, "100")).await;
    let client = &mut shim.client;
    for i in 1..=5 {
        create(
            client,
            route(
                &format!("n{i}"),
                &format!("10.244.{i}.0/24"),
                &[&format!("10.99.0.{i}")],
            ),
        )
        .await
        .unwrap();
    }
    let (routes, pages) = list_all(client, 2).await;
    let mut cidrs: Vec<_> = routes
        .iter()
        .filter(|r| r.destination_cidr.starts_with("10.244."))
        .map(|r| r.destination_cidr.clone())
        .collect();
    assert_eq!(cidrs.len(), 5, "{routes:#?}");
    cidrs.dedup();
    assert_eq!(cidrs.len(), 5);
    assert!(pages >= 3, "{pages} pages");
    let err = client
        .list_routes(cpi_proto::v1::ListRoutesRequest {
            cluster_name: CLUSTER.into(),
            page_size: 2,
            page_token: "garbage".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = CpiError::from_status(&err);
    assert!(
        matches!(&err, CpiError::InvalidObject { field, .. } if field == "page_token"),
        "{err:?}"
    );
}

#[tokio::test]
async fn delete_removes_the_route_and_absent_is_success() {
    let netns = Netns::new();
    let dir = ShimDir::new();
    let mut shim = dir.start(&route_flags(&netns, "main")).await;
    let client = &mut shim.client;
    create(client, route("n1", "10.244.1.0/24", &["10.99.0.11"]))
        .await
        .unwrap();
    assert_eq!(netns.routes("-4", "main", "10.244.1.0/24").len(), 1);
    delete(client, "10.244.1.0/24").await.unwrap();
    assert!(netns.routes("-4", "main", "10.244.1.0/24").is_empty());
    delete(client, "10.244.1.0/24").await.unwrap();
    delete(client, "10.244.9.0/24").await.unwrap();
    let (routes, _) = list_all(client, 0).await;
    assert!(routes.iter().all(|r| r.destination_cidr != "10.244.1.0/24"));
}

#[tokio::test]
async fn a_foreign_route_is_listed_not_owned_and_never_deleted() {
    let netns = Netns::new();
    netns.add_static_route("10.244.7.0/24");
    let dir = ShimDir::new();
    let mut shim = dir.start(&route_flags(&netns, "main")).await;
    let client = &mut shim.client;
    let (routes, _) = list_all(client, 0).await;
    let foreign = listed(&routes, "10.244.7.0/24");
    assert!(!foreign.ownership.clone().unwrap().owned);
    assert_eq!(foreign.target_node, "");
    assert!(!foreign.blackhole);

    let err = delete(client, "10.244.7.0/24").await.unwrap_err();
    assert!(matches!(err, CpiError::NotOwned(_)), "{err:?}");
    // Creating over it is refused too: never two routes for one destination.
    let err = create(client, route("n1", "10.244.7.0/24", &["10.99.0.11"]))
        .await
        .unwrap_err();
    assert!(matches!(err, CpiError::NotOwned(_)), "{err:?}");
    netns.assert_static_route_intact("10.244.7.0/24");
}

#[tokio::test]
async fn a_restart_re_adds_a_route_deleted_behind_the_shims_back() {
    let netns = Netns::new();
    let dir = ShimDir::new();
    let flags = route_flags(&netns, "100");
    let mut shim = dir.start(&flags).await;
    create(
        &mut shim.client,
        route("n1", "10.244.1.0/24", &["10.99.0.11"]),
    )
    .await
    .unwrap();
    create(
        &mut shim.client,
        route("n2", "10.244.2.0/24", &["10.99.0.12"]),
    )
    .await
    .unwrap();
    create(
        &mut shim.client,
        route("n3", "10.244.3.0/24", &["10.99.0.13"]),
    )
    .await
    .unwrap();
    shim.process.kill();
    drop(shim);
    netns.ip(&["route", "del", "10.244.1.0/24", "table", "100"]);
    // And one re-pointed behind its back.
    netns.repoint_route("10.244.2.0/24", "100", "10.99.0.99");

    let mut shim = dir.start(&flags).await;
    let lines = netns.routes("-4", "100", "10.244.");
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("10.244.1.0/24 via 10.99.0.11")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("10.244.2.0/24 via 10.99.0.12")),
        "{lines:?}"
    );
    let logs = shim.process.logs();
    assert!(logs.contains("routing table reconciled"), "{logs}");
    let (routes, _) = list_all(&mut shim.client, 0).await;
    assert_eq!(listed(&routes, "10.244.1.0/24").target_node, "n1");
    let metrics = scrape_metrics(shim.metrics_port).await;
    assert!(metrics.contains("local_shim_routes_managed 3"), "{metrics}");
}

#[tokio::test]
async fn state_only_mode_touches_no_routing_table() {
    let netns = Netns::new();
    let dir = ShimDir::new();
    let mut flags = route_flags(&netns, "main");
    flags.push("--routes=state-only".into());
    let mut shim = dir.start(&flags).await;
    let client = &mut shim.client;
    create(client, route("n1", "10.244.1.0/24", &["10.99.0.11"]))
        .await
        .unwrap();
    create(client, route("n2", "fd10:2::/64", &["fd99::12"]))
        .await
        .unwrap();
    assert!(netns.routes("-4", "main", "10.244.").is_empty());
    assert!(netns.routes("-6", "main", "fd10:").is_empty());
    let (routes, _) = list_all(client, 0).await;
    assert_eq!(routes.len(), 2, "{routes:#?}");
    assert_eq!(listed(&routes, "fd10:2::/64").target_node, "n2");
    delete(client, "10.244.1.0/24").await.unwrap();
    let (routes, _) = list_all(client, 0).await;
    assert_eq!(routes.len(), 1);
}

#[tokio::test]
async fn an_unreachable_gateway_is_a_clear_error() {
    let netns = Netns::new();
    let dir = ShimDir::new();
    let mut shim = dir.start(&route_flags(&netns, "main")).await;
    let client = &mut shim.client;
    let err = create(client, route("far", "10.244.1.0/24", &["192.0.2.10"]))
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("192.0.2.10") && message.contains("unreachable"),
        "{message}"
    );
    assert!(
        message.contains("table main") && message.contains("\"far\""),
        "{message}"
    );
    assert!(netns.routes("-4", "main", "10.244.1.0/24").is_empty());
    // Nothing recorded either.
    let (routes, _) = list_all(client, 0).await;
    assert!(routes.iter().all(|r| r.destination_cidr != "10.244.1.0/24"));
    // No InternalIP of the family: names node and family.
    let err = create(client, route("v4only", "fd10:1::/64", &["10.99.0.11"]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CpiError::InvalidObject { message, .. } if message.contains("\"v4only\"") && message.contains("IPv6")),
        "{err:?}"
    );
}

#[tokio::test]
async fn dual_stack_routes_both_families() {
    let netns = Netns::new();
    let dir = ShimDir::new();
    let mut shim = dir.start(&route_flags(&netns, "100")).await;
    let client = &mut shim.client;
    let both = ["10.99.0.11", "fd99::11"];
    create(client, route("n1", "10.244.1.0/24", &both))
        .await
        .unwrap();
    create(client, route("n1", "fd10:1::/64", &both))
        .await
        .unwrap();
    let v4 = netns.routes("-4", "100", "10.244.1.0/24");
    let v6 = netns.routes("-6", "100", "fd10:1::/64");
    assert_eq!(v4.len(), 1, "{v4:?}");
    assert_eq!(v6.len(), 1, "{v6:?}");
    assert!(v4[0].contains("via 10.99.0.11"), "{v4:?}");
    assert!(
        v6[0].contains("via fd99::11") && v6[0].contains("proto 108"),
        "{v6:?}"
    );
    let (routes, _) = list_all(client, 0).await;
    assert_eq!(listed(&routes, "fd10:1::/64").target_node, "n1");
    delete(client, "fd10:1::/64").await.unwrap();
    assert!(netns.routes("-6", "100", "fd10:1::/64").is_empty());
    assert_eq!(netns.routes("-4", "100", "10.244.1.0/24").len(), 1);
}

#[tokio::test]
async fn onlink_device_routes_through_a_next_hop_on_no_connected_subnet() {
    let netns = Netns::new();
    let dir = ShimDir::new();
    // The namespace given as a path this time.
    let shim_flags = vec![
        format!("--route-netns=/var/run/netns/{}", netns.name),
        "--route-table=main".into(),
        "--route-onlink-device=nodes0".into(),
    ];
    let mut shim = dir.start(&shim_flags).await;
    create(
        &mut shim.client,
        route("far", "10.244.1.0/24", &["192.0.2.10"]),
    )
    .await
    .unwrap();
    let lines = netns.routes("-4", "main", "10.244.1.0/24");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("via 192.0.2.10 dev nodes0") && lines[0].contains("onlink"),
        "{lines:?}"
    );
}

#[tokio::test]
async fn an_unrecorded_route_of_ours_is_listed_owned_without_target_and_deletable() {
    let netns = Netns::new();
    // As if the database had been lost: a route with the shim's marker and no record.
    netns.ip(&[
        "route",
        "add",
        "10.244.8.0/24",
        "via",
        "10.99.0.88",
        "proto",
        "108",
    ]);
    let dir = ShimDir::new();
    let mut shim = dir.start(&route_flags(&netns, "main")).await;
    let (routes, _) = list_all(&mut shim.client, 0).await;
    let orphan = listed(&routes, "10.244.8.0/24");
    assert!(orphan.ownership.clone().unwrap().owned);
    assert_eq!(orphan.target_node, "");
    assert_eq!(netns.routes("-4", "main", "10.244.8.0/24").len(), 1);
    delete(&mut shim.client, "10.244.8.0/24").await.unwrap();
    assert!(netns.routes("-4", "main", "10.244.8.0/24").is_empty());
}
