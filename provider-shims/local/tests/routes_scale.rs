//! Cost of CreateRoute at the bench's scale: 2000 routes into a namespace's table, 200 calls
//! in flight as the controller manager sends them, then the same 2000 again (all already in
//! place). Ignored by default (it measures, it does not judge); run with
//! `cargo test -p local-shim --release --test routes_scale -- --ignored --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod routes_support;

use std::time::Instant;

use futures::StreamExt as _;
use routes_support::*;

const ROUTES: usize = 2000;
const IN_FLIGHT: usize = 200;

/// Creates every route, `IN_FLIGHT` at a time; returns wall and shim CPU seconds.
async fn create_all(shim: &Shim) -> (f64, f64) {
    let pid = shim.process.pid();
    let (started, cpu) = (Instant::now(), cpu_seconds(pid));
    let created: Vec<_> = futures::stream::iter(0..ROUTES)
        .map(|i| {
            let mut client = shim.client.clone();
            async move {
                let cidr = format!("10.{}.{}.0/24", 128 + i / 256, i % 256);
                let gateway = format!("10.99.{}.{}", 1 + i / 250, 1 + i % 250);
                create(&mut client, route(&format!("n{i}"), &cidr, &[&gateway])).await
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let took = (started.elapsed().as_secs_f64(), cpu_seconds(pid) - cpu);
    for result in created {
        result.unwrap();
    }
    took
}

#[tokio::test]
#[ignore = "measurement"]
async fn two_thousand_creates_two_hundred_in_flight() {
    let netns = Netns::new();
    let dir = ShimDir::new();
    let shim = dir.start(&route_flags(&netns, "100")).await;
    let (wall, cpu) = create_all(&shim).await;
    assert_eq!(netns.routes("-4", "100", "10.").len(), ROUTES);
    let (again_wall, again_cpu) = create_all(&shim).await;
    println!(
        "{ROUTES} CreateRoute, {IN_FLIGHT} in flight: new {wall:.2} s wall, shim CPU {cpu:.2} s \
         ({:.0}/s); in place {again_wall:.2} s wall, shim CPU {again_cpu:.2} s",
        ROUTES as f64 / wall
    );
}
