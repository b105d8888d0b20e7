//! The netlink executor: one rtnetlink connection opened inside the namespace named by
//! `--route-netns`, programming one table with one protocol marker. It decides nothing.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};

/// A netlink failure, naming what was being done.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The namespace file could not be opened or entered.
    #[error("entering network namespace {}: {message}", .path.display())]
    Netns {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The netlink socket could not be opened.
    #[error("opening a netlink socket: {0}")]
    Socket(std::io::Error),
    /// `--route-onlink-device` does not exist in the namespace.
    #[error("--route-onlink-device {0:?}: no such interface in the route namespace")]
    NoDevice(String),
    /// The kernel refused a request.
    #[error("{action} {destination} in table {table}: {message}")]
    Request {
        /// What was being done (`adding`, `replacing`, `deleting`).
        action: &'static str,
        /// The destination.
        destination: String,
        /// The table.
        table: u32,
        /// The kernel's errno, if it sent one.
        errno: Option<i32>,
        /// The kernel's explanation.
        message: String,
    },
    /// Dumping the table failed.
    #[error("listing routes of table {table}: {message}")]
    Dump {
        /// The table.
        table: u32,
        /// Why.
        message: String,
    },
}

/// `ENETUNREACH`: the next hop is on no connected network.
pub const ENETUNREACH: i32 = 101;
/// `EEXIST`: an exclusive add found a route at the destination.
pub const EEXIST: i32 = 17;
/// `ESRCH`: no such route.
const ESRCH: i32 = 3;

/// A connection programming one table of one namespace.
#[derive(Clone)]
pub struct Kernel {
    handle: Handle,
    table: u32,
    protocol: u8,
    onlink_device: Option<u32>,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("table", &self.table)
            .field("protocol", &self.protocol)
            .field("onlink_device", &self.onlink_device)
            .finish()
    }
}

/// Opens a netlink route socket inside the namespace at `netns` (the caller's own when
/// `None`) and spawns its connection on the current runtime.
///
/// `setns` changes the namespace of the calling thread only, so a dedicated thread enters the
/// namespace and opens the socket there (registered with this runtime's reactor); a socket
/// stays in the namespace it was created in, and the thread ends.
async fn connect(netns: Option<&Path>) -> Result<Handle, KernelError> {
    let runtime = tokio::runtime::Handle::current();
    let (connection, handle) = match netns {
        None => {
            let (connection, handle, _) =
                rtnetlink::new_connection().map_err(KernelError::Socket)?;
            (connection, handle)
        }
        Some(path) => {
            let netns_error = |message: String| KernelError::Netns {
                path: path.to_path_buf(),
                message,
            };
            let file = std::fs::File::open(path).map_err(|e| netns_error(e.to_string()))?;
            let (sender, receiver) = tokio::sync::oneshot::channel();
            let entering = runtime.clone();
            std::thread::Builder::new()
                .name("route-netns".into())
                .spawn(move || {
                    let opened = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|errno| format!("setns: {errno}"))
                        .and_then(|()| {
                            let _runtime = entering.enter();
                            rtnetlink::new_connection()
                                .map(|(connection, handle, _)| (connection, handle))
                                .map_err(|e| format!("opening a netlink socket: {e}"))
                        });
                    // The receiver only goes away when the caller was cancelled.
                    let _ = sender.send(opened);
                })
                .map_err(|e| netns_error(format!("spawning a thread: {e}")))?;
            receiver
                .await
                .map_err(|_| netns_error("the namespace thread ended without answering".into()))?
                .map_err(netns_error)?
        }
    };
    runtime.spawn(connection);
    Ok(handle)
}

impl Kernel {
    /// Connects to `table` of the namespace at `netns`, marking routes with `protocol`.
    pub async fn open(
        netns: Option<&Path>,
        table: u32,
        protocol: u8,
        onlink_device: Option<&str>,
    ) -> Result<Self, KernelError> {
        let handle = connect(netns).await?;
        let onlink_device = match onlink_device {
            None => None,
            Some(name) => Some(link_index(&handle, name).await?),
        };
        Ok(Self {
            handle,
            table,
            protocol,
            onlink_device,
        })
    }

    /// Every unicast and blackhole route of the table, both families.
    pub async fn list(&self) -> Result<Vec<super::plan::KernelRoute>, KernelError> {
        let mut routes = Vec::new();
        for query in [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let mut dump = self.handle.route().get(query).execute();
            while let Some(message) = dump.try_next().await.map_err(|e| KernelError::Dump {
                table: self.table,
                message: e.to_string(),
            })? {
                if let Some(route) = self.parse(&message) {
                    routes.push(route);
                }
            }
        }
        Ok(routes)
    }

    fn parse(&self, message: &RouteMessage) -> Option<super::plan::KernelRoute> {
        let header = &message.header;
        let table = message
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(table) => Some(*table),
                _ => None,
            })
            .unwrap_or(u32::from(header.table));
        if table != self.table {
            return None;
        }
        let blackhole = match header.kind {
            RouteType::Unicast => false,
            RouteType::BlackHole | RouteType::Unreachable | RouteType::Prohibit => true,
            _ => return None,
        };
        let mut destination = None;
        let mut gateway = None;
        for attribute in &message.attributes {
            match attribute {
                RouteAttribute::Destination(address) => destination = address_ip(address),
                RouteAttribute::Gateway(address) => gateway = address_ip(address),
                _ => {}
            }
        }
        let address = match (destination, header.address_family) {
            (Some(ip), _) => ip,
            (None, AddressFamily::Inet) => IpAddr::from([0u8; 4]),
            (None, AddressFamily::Inet6) => IpAddr::from([0u16; 8]),
            _ => return None,
        };
        let destination = IpNet::new(address, header.destination_prefix_length).ok()?;
        Some(super::plan::KernelRoute {
            destination,
            gateway,
            protocol: u8::from(header.protocol),
            blackhole,
        })
    }

    fn message(&self, destination: &IpNet, gateway: Option<IpAddr>) -> RouteMessage {
        let mut builder = RouteMessageBuilder::<IpAddr>::new()
            .table_id(self.table)
            .protocol(RouteProtocol::from(self.protocol));
        // The builder refuses only a prefix longer than its family, which IpNet rules out.
        builder = match builder
            .clone()
            .destination_prefix(destination.network(), destination.prefix_len())
        {
            Ok(with) => with,
            Err(_) => builder,
        };
        if let Some(gateway) = gateway {
            builder = match builder.clone().gateway(gateway) {
                Ok(with) => with,
                Err(_) => builder,
            };
            if let Some(index) = self.onlink_device {
                builder = builder.output_interface(index).onlink();
            }
        }
        builder.build()
    }

    /// Adds the route only if the destination holds none (`NLM_F_EXCL`): a route there, ours
    /// or not, fails with errno [`EEXIST`] and is left as it is.
    pub async fn add(&self, destination: &IpNet, gateway: IpAddr) -> Result<(), KernelError> {
        let message = self.message(destination, Some(gateway));
        self.handle
            .route()
            .add(message)
            .execute()
            .await
            .map_err(|e| self.request_error("adding", destination, e))
    }

    /// Adds the route, or atomically replaces ours at the same destination (never two routes
    /// for one destination).
    pub async fn replace(&self, destination: &IpNet, gateway: IpAddr) -> Result<(), KernelError> {
        let message = self.message(destination, Some(gateway));
        self.handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(|e| self.request_error("programming", destination, e))
    }

    /// Deletes our route at `destination`; absent is success. Routes of another protocol are
    /// not matched (the kernel compares the protocol of a delete).
    pub async fn delete(&self, destination: &IpNet) -> Result<(), KernelError> {
        let message = self.message(destination, None);
        match self.handle.route().del(message).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.code.map(|c| -c.get()) == Some(ESRCH) => {
                Ok(())
            }
            Err(e) => Err(self.request_error("deleting", destination, e)),
        }
    }

    fn request_error(
        &self,
        action: &'static str,
        destination: &IpNet,
        error: rtnetlink::Error,
    ) -> KernelError {
        let errno = match &error {
            rtnetlink::Error::NetlinkError(e) => e.code.map(|c| -c.get()),
            _ => None,
        };
        let message = match errno {
            Some(errno) => std::io::Error::from_raw_os_error(errno).to_string(),
            None => error.to_string(),
        };
        KernelError::Request {
            action,
            destination: destination.to_string(),
            table: self.table,
            errno,
            message,
        }
    }
}

fn address_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

async fn link_index(handle: &Handle, name: &str) -> Result<u32, KernelError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        _ => Err(KernelError::NoDevice(name.to_string())),
    }
}
