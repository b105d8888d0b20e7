//! The CPI views of the objects under admission, built with the conversions every caller
//! shares (`cpi_proto::k8s_view`); an object the API server is about to store has no status
//! worth sending.

use cpi_proto::k8s_view;
use cpi_proto::v1 as pb;
use k8s_openapi::api::core::v1::Service;

/// The CPI view of a Service under admission; `raw` embeds it as JSON.
pub(crate) fn service_view(service: &Service, raw: bool) -> pb::Service {
    pb::Service {
        metadata: Some(k8s_view::object_meta(&service.metadata)),
        status: None,
        raw_json: if raw {
            serde_json::to_vec(service).unwrap_or_default()
        } else {
            Vec::new()
        },
        ..service
            .spec
            .as_ref()
            .map(k8s_view::service_spec)
            .unwrap_or_default()
    }
}
