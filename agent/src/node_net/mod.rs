//! The node side of the pod network: the bridge `mesh0` that every pod veth is attached
//! to, holding the gateway address of this node's first block. Created (or adopted) at
//! start and kept correct by a reconcile loop: a deleted bridge comes back, with its
//! address, MTU, MAC and its pod veths re-attached.

pub mod plan;

use std::net::Ipv4Addr;
use std::time::Duration;

use mesh_proto::api::NodeNetworkStatus;
use rtnetlink::{LinkBridge, LinkUnspec};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::netlink::{Netlink, NetlinkError};
pub use plan::{bridge_mac, host_veth_name, is_host_veth_name, BridgeSpec, HOST_VETH_PREFIX};
use plan::{Observed, Plan, Step};

/// The default bridge name (`mesh-cni`'s `bridge` key must match `--bridge`).
pub const DEFAULT_BRIDGE: &str = "mesh0";
const RECONCILE_EVERY: Duration = Duration::from_secs(1);

/// Turns on IPv4 forwarding in this network namespace (pods reach other nodes through it).
/// Written only if it is off: in an unprivileged container /proc/sys is read-only, and
/// Kubernetes nodes have it on already (kubeadm's preflight requires it).
pub fn enable_forwarding() -> std::io::Result<()> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(PATH)?.trim() == "1" {
        return Ok(());
    }
    std::fs::write(PATH, b"1").map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("{e} (set net.ipv4.ip_forward=1 on the node, e.g. in /etc/sysctl.d)"),
        )
    })
}

/// Runs the reconcile loop until `shutdown` flips. `gateway` carries the gateway (with
/// the range prefix) as IPAM learns it; `status` publishes what `meshctl status` shows.
pub async fn run(
    nl: Netlink,
    mut spec: BridgeSpec,
    mut gateway: watch::Receiver<Option<(Ipv4Addr, u8)>>,
    status: watch::Sender<NodeNetworkStatus>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last_problem: Option<String> = None;
    loop {
        spec.gateway = *gateway.borrow_and_update();
        let outcome = reconcile(&nl, &spec).await;
        let problem = outcome.err().map(|e| e.to_string());
        if problem != last_problem {
            match &problem {
                Some(p) => warn!(bridge = %spec.name, problem = %p, "node bridge is not right"),
                None if last_problem.is_some() => {
                    info!(bridge = %spec.name, "node bridge repaired")
                }
                None => {}
            }
            last_problem = problem.clone();
        }
        if problem.is_none() {
            proxy_arp(&nl, &spec.name).await;
        }
        let ready = problem.is_none() && spec.gateway.is_some();
        status.send_replace(NodeNetworkStatus {
            bridge: spec.name.clone(),
            ready,
            address: spec.gateway.map(|(ip, p)| format!("{ip}/{p}")),
            mtu: spec.mtu,
            tunnel_problem: None,
            problem: problem.or_else(|| {
                spec.gateway
                    .is_none()
                    .then(|| "waiting for IPAM to give this node address space".to_string())
            }),
        });
        tokio::select! {
            _ = tokio::time::sleep(RECONCILE_EVERY) => {}
            r = gateway.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

/// Pods hold the whole range on-link (`/12`), so they ARP for remote pods on the
/// bridge; the node answers for addresses it routes elsewhere (proxy ARP), at once rather
/// than after the default random 0-0.8 s proxy delay. Read from /proc/sys, set through
/// netlink: that needs only CAP_NET_ADMIN, where /proc/sys is read-only in a container.
async fn proxy_arp(nl: &Netlink, bridge: &str) {
    let is =
        |path: String, value: &str| std::fs::read_to_string(path).is_ok_and(|v| v.trim() == value);
    let arp_on = is(format!("/proc/sys/net/ipv4/conf/{bridge}/proxy_arp"), "1");
    let no_delay = is(
        format!("/proc/sys/net/ipv4/neigh/{bridge}/proxy_delay"),
        "0",
    );
    if arp_on && no_delay {
        return;
    }
    let index = match nl.link_by_name(bridge).await {
        Ok(Some(l)) => l.index,
        Ok(None) => return, // the next reconcile recreates it
        Err(e) => {
            warn!(bridge = %bridge, error = %e, "cannot look up the bridge for proxy ARP");
            return;
        }
    };
    if !arp_on {
        if let Err(e) = nl.enable_proxy_arp(index).await {
            warn!(bridge = %bridge, error = %e, "cannot enable proxy ARP: pods will not reach other nodes");
        }
    }
    if !no_delay {
        if let Err(e) = nl.set_arp_proxy_delay(index, 0).await {
            warn!(bridge = %bridge, error = %e, "cannot zero the proxy ARP delay: first packets to other nodes wait up to 0.8 s");
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ReconcileError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("{0}")]
    Refused(String),
}

async fn observe(nl: &Netlink, name: &str) -> Result<Observed, NetlinkError> {
    let links = nl.links().await?;
    let bridge = links.iter().find(|l| l.name == name).cloned();
    let addresses = match &bridge {
        Some(b) => nl.addresses_v4(b.index).await?,
        None => Vec::new(),
    };
    let pod_veths = links
        .into_iter()
        .filter(|l| is_host_veth_name(&l.name) && l.kind.as_deref() == Some("veth"))
        .collect();
    Ok(Observed {
        bridge,
        addresses,
        pod_veths,
    })
}

async fn reconcile(nl: &Netlink, spec: &BridgeSpec) -> Result<(), ReconcileError> {
    // A created bridge is planned again at once, so one round reaches the full state.
    for _ in 0..3 {
        let seen = observe(nl, &spec.name).await?;
        let steps = match plan::plan(spec, &seen) {
            Plan::Refuse(why) => return Err(ReconcileError::Refused(why)),
            Plan::Steps(s) if s.is_empty() => return Ok(()),
            Plan::Steps(s) => s,
        };
        let index = seen.bridge.as_ref().map(|b| b.index).unwrap_or(0);
        for step in steps {
            apply(nl, spec, index, &step).await?;
        }
    }
    Ok(())
}

async fn apply(
    nl: &Netlink,
    spec: &BridgeSpec,
    index: u32,
    step: &Step,
) -> Result<(), NetlinkError> {
    let links = nl.handle().link();
    let set = |msg| async { links.set(msg).execute().await };
    match step {
        Step::CreateBridge => {
            info!(bridge = %spec.name, mtu = spec.mtu, "creating the node bridge");
            let msg = LinkBridge::new(&spec.name)
                .mtu(spec.mtu)
                .address(spec.mac.to_vec())
                .up()
                .build();
            match links.add(msg).execute().await {
                Err(e) if crate::netlink::errno(&e) != Some(libc::EEXIST) => {
                    return Err(NetlinkError::request(format!(
                        "create bridge {}",
                        spec.name
                    ))(e))
                }
                _ => {}
            }
        }
        Step::SetMtu(mtu) => {
            info!(bridge = %spec.name, mtu, "setting the bridge MTU");
            set(LinkUnspec::new_with_index(index).mtu(*mtu).build())
                .await
                .map_err(NetlinkError::request("set bridge MTU"))?;
        }
        Step::SetMac(mac) => {
            set(LinkUnspec::new_with_index(index)
                .address(mac.to_vec())
                .build())
            .await
            .map_err(NetlinkError::request("set bridge MAC"))?;
        }
        Step::SetUp => {
            info!(bridge = %spec.name, "bringing the bridge up");
            set(LinkUnspec::new_with_index(index).up().build())
                .await
                .map_err(NetlinkError::request("set bridge up"))?;
        }
        Step::AddAddress(ip, prefix) => {
            info!(bridge = %spec.name, address = %format!("{ip}/{prefix}"), "adding the gateway address");
            nl.add_address(index, *ip, *prefix).await?;
        }
        Step::RemoveAddress(ip, prefix) => {
            info!(bridge = %spec.name, address = %format!("{ip}/{prefix}"), "removing a stale address from the pod range");
            nl.delete_address(index, *ip, *prefix).await?;
        }
        Step::Attach { veth, name } => {
            info!(bridge = %spec.name, veth = %name, "re-attaching a pod veth");
            match set(LinkUnspec::new_with_index(*veth)
                .controller(index)
                .up()
                .build())
            .await
            {
                // The pod went away between the dump and now.
                Err(e) if crate::netlink::errno(&e) == Some(libc::ENODEV) => {}
                r => r.map_err(NetlinkError::request(format!("attach {name}")))?,
            }
        }
    }
    Ok(())
}
