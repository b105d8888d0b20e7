//! The Routes calls (upstream `cloudprovider.Routes`): the paged listing read whole before
//! anything acts on it, and the mutating create/delete stamped with the leader fence.

use std::collections::HashSet;

use cpi_proto::CpiError;
use cpi_proto::v1;

use super::client::Cloud;
use super::convert;
use crate::k8s::CachedNode;

/// Routes asked for per ListRoutes page (the shim may answer fewer).
const LIST_PAGE_SIZE: u32 = 500;

/// Every route of the cluster as the shim listed it, and how many its route table can hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteList {
    /// The routes of every page, in the order listed.
    pub routes: Vec<v1::Route>,
    /// The capacity the shim reported on the last page; `None` when unlimited or unknown.
    pub capacity: Option<u32>,
}

/// Why the routes could not be listed; nothing is decided on a partial list.
#[derive(Debug, thiserror::Error)]
pub enum ListRoutesError {
    /// A page failed, which fails the whole listing.
    #[error("ListRoutes page {page}: {source}")]
    Page {
        /// 1-based index of the page that failed.
        page: usize,
        /// The provider's error.
        source: CpiError,
    },
    /// The shim handed out a page token it had already given: following it would loop.
    #[error("ListRoutes page {page}: the shim repeated page token {token:?}")]
    RepeatedToken {
        /// 1-based index of the page that repeated it.
        page: usize,
        /// The repeated token.
        token: String,
    },
}

/// A node's `status.addresses` as a route's `target_node_addresses`.
pub fn route_addresses(node: &CachedNode) -> Vec<v1::NodeAddress> {
    node.addresses()
        .iter()
        .map(convert::address_to_proto)
        .collect()
}

impl Cloud {
    /// Upstream `ListRoutes`: reads every page before returning; a failed page, or a page
    /// token seen before, fails the whole listing.
    pub async fn list_routes(&self, cluster_name: &str) -> Result<RouteList, ListRoutesError> {
        let mut list = RouteList::default();
        let mut seen = HashSet::new();
        let mut token = String::new();
        for page in 1.. {
            let request = v1::ListRoutesRequest {
                cluster_name: cluster_name.to_string(),
                page_size: LIST_PAGE_SIZE,
                page_token: token.clone(),
            };
            let response = self
                .call("Routes/ListRoutes", self.routes().list_routes(request))
                .await
                .map_err(|source| ListRoutesError::Page { page, source })?;
            list.routes.extend(response.routes);
            list.capacity = response.capacity;
            if response.next_page_token.is_empty() {
                break;
            }
            if !seen.insert(response.next_page_token.clone()) {
                return Err(ListRoutesError::RepeatedToken {
                    page,
                    token: response.next_page_token,
                });
            }
            token = response.next_page_token;
        }
        Ok(list)
    }

    /// Upstream `CreateRoute` (fenced); "already exists with the same target" is success.
    pub async fn create_route(
        &self,
        cluster_name: &str,
        name_hint: &str,
        route: v1::Route,
    ) -> Result<(), CpiError> {
        let request = self.fenced(v1::CreateRouteRequest {
            cluster_name: cluster_name.to_string(),
            name_hint: name_hint.to_string(),
            route: Some(route),
            fence: None,
        });
        self.call("Routes/CreateRoute", self.routes().create_route(request))
            .await
            .map(drop)
    }

    /// Upstream `DeleteRoute` (fenced) of a route as listed; an absent route is success.
    pub async fn delete_route(&self, cluster_name: &str, route: v1::Route) -> Result<(), CpiError> {
        let request = self.fenced(v1::DeleteRouteRequest {
            cluster_name: cluster_name.to_string(),
            route: Some(route),
            fence: None,
        });
        self.call("Routes/DeleteRoute", self.routes().delete_route(request))
            .await
            .map(drop)
    }
}
