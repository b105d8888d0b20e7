//! One trace across the hop: the controller-manager's reconcile span and the `local` shim's span
//! for the CPI call it made end up in one trace, as seen by an OTLP collector (a minimal OTLP/gRPC
//! receiver run by this test) that both binaries export to through the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` variable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use e2e_tests::write_inventory;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use test_support::wait_for;

/// A span as received, flattened with its service name.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: Vec<(String, String)>,
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    out.push(Received {
                        service: service.clone(),
                        name: span.name.clone(),
                        trace_id: span.trace_id.clone(),
                        span_id: span.span_id.clone(),
                        parent_span_id: span.parent_span_id.clone(),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| {
                                let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                    Some(Value::StringValue(s)) => s.clone(),
                                    other => format!("{other:?}"),
                                };
                                (kv.key.clone(), v)
                            })
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test]
async fn ccm_reconcile_and_shim_handling_are_one_trace() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);

    let (cp, client, dir) = start_control_plane().await;
    let d = dir.path();
    let inventory = write_inventory(d, INVENTORY).unwrap();
    let env = |service: &str| {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.clone()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
            ("OTEL_SERVICE_NAME", service.to_string()),
        ]
    };
    let (_shim, socket) = spawn_local_shim_unix(d, &inventory, &[], &env("local-shim"));
    let _ccm = spawn_ccm_unix(
        &cp,
        &socket,
        "ccm",
        &["--leader-elect=false".into()],
        &env("cloud-controller-manager"),
        d,
    );

    create_tainted_node(&client, "node-a").await;
    let nodes: Api<Node> = Api::all(client.clone());
    wait_initialised(&nodes, "node-a", Duration::from_secs(60))
        .await
        .unwrap();

    let spans = collector.spans.clone();
    let (ccm_span, shim_span) = wait_for(
        "both spans at the collector",
        Duration::from_secs(30),
        || {
            let spans = spans.lock().unwrap().clone();
            async move {
                let ccm = spans
                    .iter()
                    .find(|s| {
                        s.service == "cloud-controller-manager"
                            && s.name == "cloud-node.sync"
                            && s.attributes
                                .iter()
                                .any(|(k, v)| k == "node" && v == "node-a")
                    })
                    .cloned();
                let Some(ccm) = ccm else {
                    return Err(format!(
                        "no cloud-node.sync span for node-a among {} spans",
                        spans.len()
                    ));
                };
                let shim = spans
                    .iter()
                    .find(|s| {
                        s.service == "local-shim"
                            && s.trace_id == ccm.trace_id
                            && s.attributes
                                .iter()
                                .any(|(k, v)| k == "rpc.method" && v.contains("InstanceMetadata"))
                    })
                    .cloned();
                match shim {
                    Some(shim) => Ok((ccm, shim)),
                    None => Err(format!(
                        "no local-shim InstanceMetadata span in trace {:02x?}; shim spans: {:?}",
                        ccm.trace_id,
                        spans
                            .iter()
                            .filter(|s| s.service == "local-shim")
                            .map(|s| (&s.name, &s.attributes))
                            .collect::<Vec<_>>()
                    )),
                }
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(shim_span.trace_id, ccm_span.trace_id);
    assert!(!ccm_span.trace_id.iter().all(|b| *b == 0));
    // The shim's server span is a child of the controller-manager's reconcile span.
    assert_eq!(shim_span.parent_span_id, ccm_span.span_id);
}
