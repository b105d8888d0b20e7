//! Request validation shared by the adapters: a missing or malformed required field becomes
//! `INVALID_OBJECT` naming the field, never a panic and never a guess.

use std::fmt::Display;

use cpi_proto::CpiError;
use cpi_proto::v1::{Consistency, Node, ObjectMeta, Service};

/// The `InvalidObject` error for `field`.
pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> CpiError {
    CpiError::InvalidObject {
        field: field.into(),
        message: message.into(),
    }
}

/// A required sub-message.
pub(crate) fn require<T>(value: Option<T>, field: &str) -> Result<T, CpiError> {
    value.ok_or_else(|| invalid(field, "is required"))
}

/// A required, non-empty string.
pub(crate) fn require_non_empty(value: String, field: &str) -> Result<String, CpiError> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    Ok(value)
}

/// A node that must be present and named; `field` is its path in the request (`node`).
pub(crate) fn require_node(node: Option<Node>, field: &str) -> Result<Node, CpiError> {
    let node = require(node, field)?;
    check_node(&node, field)?;
    Ok(node)
}

/// Checks that a present node carries a name; `field` is only formatted when it does not.
pub(crate) fn check_node(node: &Node, field: impl Display) -> Result<(), CpiError> {
    check_meta(node.metadata.as_ref(), field).map(drop)
}

/// A Service that must be present with a name and a namespace.
pub(crate) fn require_service(service: Option<Service>, field: &str) -> Result<Service, CpiError> {
    let service = require(service, field)?;
    let meta = check_meta(service.metadata.as_ref(), field)?;
    if meta.namespace.is_empty() {
        return Err(invalid(
            format!("{field}.metadata.namespace"),
            "must not be empty",
        ));
    }
    Ok(service)
}

/// Checks that an object's metadata is present and carries a name; `field` is the object's path.
fn check_meta(meta: Option<&ObjectMeta>, field: impl Display) -> Result<&ObjectMeta, CpiError> {
    let meta = meta.ok_or_else(|| invalid(format!("{field}.metadata"), "is required"))?;
    if meta.name.is_empty() {
        return Err(invalid(
            format!("{field}.metadata.name"),
            "must not be empty",
        ));
    }
    Ok(meta)
}

/// The node's name (`metadata.name`); empty only for nodes the framework has not validated.
pub fn node_name(node: &Node) -> &str {
    node.metadata.as_ref().map_or("", |meta| meta.name.as_str())
}

/// Decodes a request's `consistency`. An unknown value from a newer caller reads as STRONG: the
/// cautious choice is to bypass caches, never to serve something staler than asked for.
pub fn consistency(raw: i32) -> Consistency {
    Consistency::try_from(raw).unwrap_or(Consistency::Strong)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn field_of(err: CpiError) -> String {
        match err {
            CpiError::InvalidObject { field, .. } => field,
            other => panic!("not InvalidObject: {other:?}"),
        }
    }

    #[test]
    fn node_checks_name_the_field() {
        assert_eq!(field_of(require_node(None, "node").unwrap_err()), "node");
        let bare = Node::default();
        assert_eq!(
            field_of(require_node(Some(bare), "node").unwrap_err()),
            "node.metadata"
        );
        let unnamed = Node {
            metadata: Some(ObjectMeta::default()),
            ..Node::default()
        };
        assert_eq!(
            field_of(require_node(Some(unnamed), "nodes[2]").unwrap_err()),
            "nodes[2].metadata.name"
        );
    }

    #[test]
    fn service_needs_name_and_namespace() {
        let svc = Service {
            metadata: Some(ObjectMeta {
                name: "web".into(),
                ..ObjectMeta::default()
            }),
            ..Service::default()
        };
        assert_eq!(
            field_of(require_service(Some(svc), "service").unwrap_err()),
            "service.metadata.namespace"
        );
    }

    #[test]
    fn unknown_consistency_is_strong() {
        assert_eq!(consistency(1), Consistency::Cached);
        assert_eq!(consistency(0), Consistency::Unspecified);
        assert_eq!(consistency(99), Consistency::Strong);
    }
}
