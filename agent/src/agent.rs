//! Start-up and shutdown: turns a validated configuration into running parts (store,
//! TLS, QUIC endpoint, driver, local API, metrics) and tears them down on a signal.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use mesh_proto::peer::Capabilities;
use mesh_proto::PeerRecord;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::api::{metrics::Metrics, server};
use crate::config::{AgentConfig, Dataplane};
use crate::dataplane::udp::{self, UdpConfig};
use crate::dataplane::{self, vxlan, vxlan::VxlanConfig, Backend};
use crate::ipam;
use crate::ipam::block::Block;
use crate::ipam::core::IpamConfig;
use crate::ipam::service::IpamService;
use crate::mesh::driver::{Driver, DriverConfig, NodeNetLink, TunnelLink};
use crate::mesh::status::StaticInfo;
use crate::mesh::{CoreConfig, MeshCore};
use crate::netlink::Netlink;
use crate::node_net::{self, BridgeSpec};
use crate::store::Store;
use crate::transport::tls::{self, Auth};
use mesh_proto::api::NodeNetworkStatus;

/// A store the agent cannot use as it is: say so with the way out, never start on a guess
/// (an empty view of a damaged store would hand out addresses that are in use).
fn store_refusal(e: crate::store::StoreError, dir: &std::path::Path) -> anyhow::Error {
    if e.is_damage() {
        anyhow::anyhow!(
            "{e}. The agent will not start on a damaged or foreign state database: with the agent \
             stopped, 'mesh-agent store inspect --state-dir {}' lists each problem and its way out",
            dir.display()
        )
    } else {
        e.into()
    }
}

pub async fn run(cfg: AgentConfig) -> Result<()> {
    if cfg.uninstall {
        return uninstall(&cfg).await;
    }
    let resolved = cfg.resolve()?;
    let auth = match resolved.secret.clone() {
        Some(s) => Auth::ClusterSecret(s, cfg.secret_kdf),
        None => {
            warn!("running with --insecure-no-auth: any host that reaches the listen port can join this mesh");
            Auth::InsecureNoAuth
        }
    };
    let store =
        Arc::new(Store::open(&cfg.state_dir).map_err(|e| store_refusal(e, &cfg.state_dir))?);
    // Generated up front (cheap) so a failure cannot leave an empty key in the store.
    let fresh_key = tls::generate_node_key().context("cannot generate a node key")?;
    let identity = store
        .start_identity(&resolved.node_name, fresh_key)
        .map_err(|e| store_refusal(e, &cfg.state_dir))?;
    if let Some(old) = &identity.renamed_from {
        warn!(old = %old, new = %resolved.node_name, "node name changed since the last run; keeping the same peer id");
    }
    let crypto = tls::endpoint_crypto(&auth, &resolved.node_name, &identity.node_key)?;
    let mut endpoint = quinn::Endpoint::server(crypto.server, cfg.listen).with_context(|| {
        format!(
            "cannot listen on {} (UDP): is another agent running?",
            cfg.listen
        )
    })?;
    endpoint.set_default_client_config(crypto.client);

    let netlink = match cfg.dataplane {
        Dataplane::None => None,
        _ => Some(
            Netlink::connect()
                .context("cannot open netlink (the data plane needs root / CAP_NET_ADMIN)")?,
        ),
    };
    let mtu = match (cfg.mtu, &netlink) {
        (Some(m), _) => m,
        (None, Some(nl)) => pod_mtu_from_underlay(nl, resolved.advertise.ip()).await,
        (None, None) => DEFAULT_POD_MTU,
    };
    let range: Block = cfg
        .ipalloc_range
        .parse()
        .map_err(|e| anyhow::anyhow!("--ipalloc-range {}: {e}", cfg.ipalloc_range))?;
    let vtep_mac = dataplane::vtep_mac(identity.peer_id.0);
    let vx = match resolved.advertise.ip() {
        std::net::IpAddr::V4(local) => Some(VxlanConfig {
            vni: vxlan::DEFAULT_VNI,
            port: cfg.vxlan_port,
            local,
            mtu,
            mac: vtep_mac,
            range,
            masquerade: cfg.masquerade,
        }),
        std::net::IpAddr::V6(_) => None,
    };
    let backend = match (&netlink, &vx) {
        (None, _) => None,
        (Some(_), None) => {
            warn!("the data plane needs an IPv4 --advertise-addr; pods can be attached but nothing crosses nodes");
            None
        }
        (Some(nl), Some(vx)) => {
            let kernel = match cfg.dataplane {
                Dataplane::Auto => Some(vxlan::kernel_has_vxlan(nl, vx).await),
                _ => None,
            };
            dataplane::choose(cfg.dataplane, kernel)
        }
    };
    if let (Dataplane::Auto, Some(b)) = (cfg.dataplane, backend) {
        info!(backend = b.name(), "--dataplane auto chose a backend");
    }

    let record = PeerRecord {
        id: identity.peer_id,
        name: resolved.node_name.clone(),
        incarnation: identity.incarnation,
        version: 0,
        addresses: vec![resolved.advertise],
        capabilities: Capabilities {
            dataplanes: backend.map(|b| b.name().to_string()).into_iter().collect(),
            vtep_mac: backend.map(|_| vtep_mac),
            vxlan_port: backend.map(|_| cfg.vxlan_port),
            authenticated: matches!(auth, Auth::ClusterSecret(_, _)),
        },
        connections: Vec::new(),
    };
    let core_cfg = CoreConfig {
        seed: identity.peer_id.0 ^ identity.incarnation,
        ..CoreConfig::default()
    };
    let core = MeshCore::new(core_cfg, record, std::time::Instant::now());
    let metrics = Metrics::new();
    let info = StaticInfo {
        auth: auth.describe().to_string(),
        listen: cfg.listen.to_string(),
        dataplane: match (cfg.dataplane, backend) {
            (Dataplane::Auto, Some(b)) => format!("auto ({})", b.name()),
            (d, _) => d.as_str().to_string(),
        },
        ipam_range: cfg.ipalloc_range.clone(),
        protocol: resolved.protocol,
    };
    let driver_cfg = DriverConfig {
        persistent_peers: resolved.peers.clone(),
        max_connections: cfg.max_connections,
        protocol: resolved.protocol,
        info,
    };
    let init = if cfg.kube {
        ipam::core::InitMode::Elected
    } else {
        ipam::service::parse_init(cfg.ipalloc_init.as_deref(), resolved.peers_listed + 1)
            .map_err(anyhow::Error::msg)?
    };
    let mut ipam_cfg = IpamConfig::new(range, init);
    ipam_cfg.seed = identity.peer_id.0;
    // A node with a pod network needs its gateway before its first pod.
    ipam_cfg.claim_space = netlink.is_some();
    let ipam = IpamService::new(
        ipam_cfg,
        identity.peer_id,
        &resolved.node_name,
        store.clone(),
        mtu,
        metrics.clone(),
        std::time::Instant::now(),
    )
    .map_err(|e| store_refusal(e, &cfg.state_dir))?;
    let driver = Driver::new(
        core,
        driver_cfg,
        store.clone(),
        endpoint,
        metrics.clone(),
        ipam,
    );

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let driver = match netlink {
        Some(nl) => {
            let spec = BridgeSpec {
                name: cfg.bridge.clone(),
                mtu,
                mac: node_net::bridge_mac(identity.peer_id.0),
                gateway: None,
                range,
            };
            if let Err(e) = node_net::enable_forwarding() {
                warn!(error = %e, "cannot enable IPv4 forwarding; pods will not reach other nodes");
            }
            let (gateway_tx, gateway_rx) = watch::channel(None);
            let (status_tx, status_rx) = watch::channel(NodeNetworkStatus::default());
            let tunnel_link = match (backend, vx) {
                (Some(b), Some(vx)) => {
                    let (desired_tx, desired_rx) = watch::channel(dataplane::Desired::default());
                    let (problem_tx, problem_rx) = watch::channel(None);
                    // Its own socket: the kernel allows one dump at a time per netlink
                    // socket, and the bridge task dumps too.
                    let tunnel_nl = Netlink::connect().context("cannot open netlink")?;
                    match b {
                        Backend::Kernel => {
                            tokio::spawn(vxlan::run(
                                tunnel_nl,
                                vx,
                                desired_rx,
                                problem_tx,
                                shutdown_rx.clone(),
                            ));
                        }
                        Backend::Userspace => {
                            let u = UdpConfig {
                                vni: vx.vni,
                                port: vx.port,
                                mtu: vx.mtu,
                                mac: vx.mac,
                                range: vx.range,
                                masquerade: vx.masquerade,
                                queues: cfg.udp_queues.unwrap_or_else(udp::default_queues),
                                local: vx.local,
                            };
                            tokio::spawn(udp::run(
                                tunnel_nl,
                                u,
                                desired_rx,
                                problem_tx,
                                shutdown_rx.clone(),
                                metrics.clone(),
                            ));
                        }
                    }
                    Some(TunnelLink {
                        desired: desired_tx,
                        problem: problem_rx,
                    })
                }
                _ => None,
            };
            tokio::spawn(node_net::run(
                nl,
                spec,
                gateway_rx,
                status_tx,
                shutdown_rx.clone(),
            ));
            driver.with_node_network(NodeNetLink {
                gateway: gateway_tx,
                status: status_rx,
                tunnel: tunnel_link,
            })
        }
        None => driver,
    };

    let (api_tx, api_rx) = mpsc::channel(64);
    let health = driver.health();
    let mut kube_task = None;
    let driver = if cfg.kube {
        let opts = crate::k8s::KubeOptions {
            kubeconfig: cfg.kubeconfig.clone(),
            namespace: cfg.kube_namespace.clone(),
            node_name: resolved.node_name.clone(),
            port: cfg.listen.port(),
            advertise: resolved.advertise,
            peer_id: identity.peer_id.to_string(),
            backend: backend.map(|b| b.name().to_string()),
            elected_split: true,
        };
        let kube = crate::k8s::start(opts, api_tx.clone(), shutdown_rx.clone());
        kube_task = Some(kube.task);
        driver.with_kube(kube.status)
    } else {
        driver
    };
    let api_listener = server::bind_socket(&cfg.socket).await?;
    let metrics_listener = tokio::net::TcpListener::bind(cfg.metrics_addr)
        .await
        .with_context(|| format!("cannot bind --metrics-addr {}", cfg.metrics_addr))?;
    tokio::spawn(server::serve_metrics(
        metrics_listener,
        metrics,
        api_tx.clone(),
        health.clone(),
    ));
    tokio::spawn(server::serve_api(
        api_listener,
        api_tx,
        health,
        cfg.socket.clone(),
    ));

    info!(
        node = %resolved.node_name,
        id = %identity.peer_id,
        incarnation = identity.incarnation,
        listen = %cfg.listen,
        advertise = %resolved.advertise,
        peers = resolved.peers.len(),
        auth = auth.describe(),
        socket = %cfg.socket.display(),
        metrics = %cfg.metrics_addr,
        "mesh-agent started"
    );

    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = shutdown_tx.send(true);
    });
    let outcome = driver.run(api_rx, shutdown_rx).await;
    if let Some(task) = kube_task {
        // It hands the Lease back if it holds it; the apiserver may be gone, so not long.
        let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
    }
    let _ = std::fs::remove_file(&cfg.socket);
    outcome.map_err(|e| anyhow::anyhow!("mesh-agent stopped: {e}"))?;
    info!("mesh-agent stopped");
    Ok(())
}

/// Removes what the data plane put on this node (iptables chains, the VXLAN device with
/// its routes, the bridge) and exits; durable state in --state-dir is left alone.
async fn uninstall(cfg: &AgentConfig) -> Result<()> {
    dataplane::masquerade::remove();
    dataplane::guard::remove();
    let nl = Netlink::connect().context("cannot open netlink (needs root)")?;
    for name in [vxlan::DEVICE, cfg.bridge.as_str()] {
        match nl.delete_link(name).await {
            Ok(true) => info!(link = name, "removed"),
            Ok(false) => info!(link = name, "not present"),
            Err(e) => warn!(link = name, error = %e, "cannot remove"),
        }
    }
    info!("mesh data plane removed from this node (iptables chains MESH-POSTROUTING/MESH-FORWARD, {}, {})", vxlan::DEVICE, cfg.bridge);
    Ok(())
}

/// Pod MTU when none was given: VXLAN over IPv4 costs 50 bytes of the underlay's MTU.
const DEFAULT_POD_MTU: u32 = 1450;
const VXLAN_OVERHEAD: u32 = 50;

async fn pod_mtu_from_underlay(nl: &Netlink, advertise: std::net::IpAddr) -> u32 {
    let std::net::IpAddr::V4(ip) = advertise else {
        return DEFAULT_POD_MTU;
    };
    match nl.link_with_address(ip).await {
        Ok(Some(link)) if link.mtu > VXLAN_OVERHEAD + 576 => {
            info!(underlay = %link.name, underlay_mtu = link.mtu, pod_mtu = link.mtu - VXLAN_OVERHEAD, "pod MTU from the underlay");
            link.mtu - VXLAN_OVERHEAD
        }
        Ok(_) => {
            warn!(advertise = %ip, pod_mtu = DEFAULT_POD_MTU, "no local interface holds the advertise address; assuming a 1500-byte underlay (set --mtu)");
            DEFAULT_POD_MTU
        }
        Err(e) => {
            warn!(error = %e, pod_mtu = DEFAULT_POD_MTU, "cannot read the underlay MTU (set --mtu)");
            DEFAULT_POD_MTU
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the agent still runs; it just cannot leave politely.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
