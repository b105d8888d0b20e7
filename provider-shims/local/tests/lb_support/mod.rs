//! Shared pieces of the load-balancer tests: Services and nodes as the controller sends them,
//! and test backends standing in for kube-proxy on 127.x addresses (a TCP echo that names
//! itself, a UDP echo, a `/healthz` server whose answer can be flipped).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use cpi_proto::CpiError;
use cpi_proto::v1 as pb;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

pub const CLUSTER: &str = "c1";

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A LoadBalancer Service `ns/name` with `ports` = (protocol, port, nodePort).
pub fn service(name: &str, uid: &str, ports: &[(&str, i32, i32)]) -> pb::Service {
    pb::Service {
        metadata: Some(pb::ObjectMeta {
            name: name.into(),
            namespace: "ns".into(),
            uid: uid.into(),
            ..Default::default()
        }),
        r#type: "LoadBalancer".into(),
        ports: ports
            .iter()
            .map(|(protocol, port, node_port)| pb::ServicePort {
                protocol: protocol.to_string(),
                port: *port,
                node_port: Some(*node_port),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

pub fn annotate(mut svc: pb::Service, key: &str, value: &str) -> pb::Service {
    svc.metadata
        .as_mut()
        .unwrap()
        .annotations
        .insert(key.into(), value.into());
    svc
}

/// A node with one InternalIP.
pub fn node(name: &str, address: &str) -> pb::Node {
    pb::Node {
        metadata: Some(pb::ObjectMeta {
            name: name.into(),
            ..Default::default()
        }),
        addresses: vec![pb::NodeAddress {
            r#type: pb::NodeAddressType::InternalIp as i32,
            address: address.into(),
        }],
        ..Default::default()
    }
}

/// The CPI error of a failed call.
pub fn cpi(status: tonic::Status) -> CpiError {
    CpiError::from_status(&status)
}

/// A TCP echo on `addr` that first sends `id\n`.
pub async fn tcp_echo(addr: SocketAddr, id: &str) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(addr).await.unwrap();
    let id = id.to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let id = id.clone();
            tokio::spawn(async move {
                if stream
                    .write_all(format!("{id}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    })
}

/// A UDP echo on `addr` answering `id:payload`.
pub async fn udp_echo(addr: SocketAddr, id: &str) -> tokio::task::JoinHandle<()> {
    let socket = UdpSocket::bind(addr).await.unwrap();
    let id = id.to_string();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let mut reply = format!("{id}:").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, peer).await;
        }
    })
}

/// An HTTP server answering every request with the status in the returned cell.
pub async fn healthz(addr: SocketAddr) -> Arc<AtomicU16> {
    let status = Arc::new(AtomicU16::new(200));
    let listener = TcpListener::bind(addr).await.unwrap();
    let cell = Arc::clone(&status);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let code = cell.load(Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            });
        }
    });
    status
}

/// Connects from `source` (port chosen by the kernel) to `to`.
pub async fn connect_from(source: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(to).await
}

/// Connects from `source` and reads the backend's name; `None` when the proxy closed the
/// connection without one (refused client, no backend).
pub async fn backend_of(source: IpAddr, to: SocketAddr) -> Option<String> {
    let stream = connect_from(source, to).await.ok()?;
    let mut line = String::new();
    let mut reader = BufReader::new(stream);
    match tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => Some(line.trim().to_string()),
        _ => None,
    }
}

/// Sends `payload` over UDP from `source` to `to`; the reply, if one comes within 1 s.
pub async fn udp_ask(source: IpAddr, to: SocketAddr, payload: &str) -> Option<String> {
    let socket = UdpSocket::bind(SocketAddr::new(source, 0)).await.unwrap();
    socket.send_to(payload.as_bytes(), to).await.unwrap();
    let mut buf = [0u8; 2048];
    match tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        _ => None,
    }
}

/// The controller manager's fence, required on mutating calls.
/// A channel to the shim at `endpoint`, once its Provider service answers (for polling while
/// a shim process starts).
pub async fn answering_channel(
    endpoint: cpi_transport::ClientEndpoint,
) -> Result<cpi_transport::CpiChannel, String> {
    let channel = cpi_transport::connect(endpoint, cpi_transport::ConnectOptions::default())
        .map_err(|e| e.to_string())?;
    pb::provider_client::ProviderClient::new(channel.clone())
        .get_provider_info(pb::GetProviderInfoRequest {})
        .await
        .map_err(|e| e.to_string())?;
    Ok(channel)
}

/// The shim's `/metrics` page (with the HTTP head) from `127.0.0.1:<port>`.
pub async fn scrape_metrics(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

pub fn fence() -> Option<pb::Fence> {
    Some(pb::Fence {
        lease: "kube-system/cloud-controller-manager".into(),
        holder_identity: "ccm-test".into(),
        lease_transitions: 1,
        lease_uid: "lease-uid".into(),
    })
}

/// User + system CPU seconds of process `pid` so far (Linux `/proc/<pid>/stat`, 100 ticks/s).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}
