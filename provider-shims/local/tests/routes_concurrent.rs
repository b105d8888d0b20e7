//! The real `local-shim` binary taking many CreateRoute calls at once, and the table changing
//! behind its back between calls (it decides from its own view of the table, not a dump per
//! call). Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2's `ip`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod routes_support;

use cpi_proto::CpiError;
use routes_support::*;

const CONCURRENT: usize = 200;

fn cidr(i: usize) -> String {
    format!("10.{}.{}.0/24", 128 + i / 256, i % 256)
}

#[tokio::test]
async fn two_hundred_concurrent_creates_of_distinct_cidrs_all_land_and_persist_across_a_restart() {
    let netns = Netns::new();
    let dir = ShimDir::new();
    let flags = route_flags(&netns, "100");
    let shim = dir.start(&flags).await;
    let creates = (0..CONCURRENT).map(|i| {
        let mut client = shim.client.clone();
        async move {
            let node = format!("n{i}");
            let gateway = format!("10.99.{}.{}", 1 + i / 250, 1 + i % 250);
            create(&mut client, route(&node, &cidr(i), &[&gateway])).await
        }
    });
    for (i, created) in futures::future::join_all(creates)
        .await
        .into_iter()
        .enumerate()
    {
        created.unwrap_or_else(|e| panic!("create {}: {e}", cidr(i)));
    }
    let lines = netns.routes("-4", "100", "10.");
    assert_eq!(lines.len(), CONCURRENT, "{lines:?}");
    assert!(lines.iter().all(|l| l.contains("proto 108")), "{lines:?}");
    let metrics = scrape_metrics(shim.metrics_port).await;
    assert!(
        metrics.contains(&format!("local_shim_routes_managed {CONCURRENT}")),
        "{metrics}"
    );

    // Every record was durable when its call returned: a killed shim on an emptied table
    // programs them all again from the database.
    shim.process.kill();
    drop(shim);
    netns.ip(&["route", "flush", "table", "100"]);
    let mut shim = dir.start(&flags).await;
    assert_eq!(netns.routes("-4", "100", "10.").len(), CONCURRENT);
    let (routes, _) = list_all(&mut shim.client, 0).await;
    assert_eq!(routes.len(), CONCURRENT);
    for i in 0..CONCURRENT {
        assert_eq!(listed(&routes, &cidr(i)).target_node, format!("n{i}"));
    }
}

#[tokio::test]
async fn a_foreign_route_added_after_start_up_is_refused_and_the_record_rolled_back() {
    let netns = Netns::new();
    let dir = ShimDir::new();
    let mut shim = dir.start(&route_flags(&netns, "main")).await;
    // Not in the shim's start-up view of the table.
    netns.add_static_route("10.244.7.0/24");
    let err = create(
        &mut shim.client,
        route("n1", "10.244.7.0/24", &["10.99.0.11"]),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, CpiError::NotOwned(_)), "{err:?}");
    netns.assert_static_route_intact("10.244.7.0/24");
    let (routes, _) = list_all(&mut shim.client, 0).await;
    let foreign = listed(&routes, "10.244.7.0/24");
    assert!(!foreign.ownership.clone().unwrap().owned);
    assert_eq!(foreign.target_node, "");
    let metrics = scrape_metrics(shim.metrics_port).await;
    assert!(metrics.contains("local_shim_routes_managed 0"), "{metrics}");
}

#[tokio::test]
async fn a_route_of_ours_deleted_behind_the_shims_back_is_re_added_after_a_listing() {
    let netns = Netns::new();
    let dir = ShimDir::new();
    let mut shim = dir.start(&route_flags(&netns, "100")).await;
    let wanted = route("n1", "10.244.1.0/24", &["10.99.0.11"]);
    create(&mut shim.client, wanted.clone()).await.unwrap();
    netns.ip(&["route", "del", "10.244.1.0/24", "table", "100"]);
    // The controller's ListRoutes shows it missing (and refreshes the shim's view)...
    let (routes, _) = list_all(&mut shim.client, 0).await;
    assert!(routes.is_empty(), "{routes:#?}");
    // ...so its CreateRoute programs it again.
    create(&mut shim.client, wanted).await.unwrap();
    let lines = netns.routes("-4", "100", "10.244.1.0/24");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("via 10.99.0.11"), "{lines:?}");

    // Ours re-pointed behind its back and listed: the create replaces it.
    netns.repoint_route("10.244.1.0/24", "100", "10.99.0.99");
    list_all(&mut shim.client, 0).await;
    create(
        &mut shim.client,
        route("n1", "10.244.1.0/24", &["10.99.0.11"]),
    )
    .await
    .unwrap();
    let lines = netns.routes("-4", "100", "10.244.1.0/24");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("via 10.99.0.11"), "{lines:?}");
}
