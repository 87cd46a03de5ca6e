//! ADD, DEL, CHECK, GC and STATUS. Each validates everything it can before touching the
//! kernel or the agent, and ADD undoes its own work when a later step fails.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;

use mesh_agent::netlink::{netns, Link, Netlink};
use mesh_agent::node_net::{host_veth_name, is_host_veth_name};
use mesh_proto::api::{AllocationRequest, AllocationResponse, PodRef};
use serde_json::Value;

use crate::agent::Agent;
use crate::announce;
use crate::attach::{self, parse_cidr, setup_failed};
use crate::conf::NetConf;
use crate::env::CniEnv;
use crate::error::{
    CniError, CniResult, AGENT_REFUSED, CHECK_FAILED, INVALID_CONFIG, INVALID_ENVIRONMENT,
    STATUS_DEGRADED, STATUS_UNAVAILABLE, TRY_AGAIN_LATER,
};
use crate::result::{CniOutput, Interface, IpConfig, Route};

fn agent(conf: &NetConf) -> Agent {
    Agent {
        socket: conf.agent_socket.clone(),
        network: conf.name.clone(),
    }
}

async fn bridge(host: &Netlink, conf: &NetConf) -> CniResult<Link> {
    host.link_by_name(&conf.bridge)
        .await
        .map_err(setup_failed)?
        .ok_or_else(|| {
            CniError::new(
                TRY_AGAIN_LATER,
                format!(
                    "the node bridge {} does not exist: mesh-agent has not set up this node's pod network (is it running, with a data plane?)",
                    conf.bridge
                ),
            )
        })
}

fn open_netns(path: &str) -> CniResult<std::fs::File> {
    netns::open(Path::new(path)).map_err(|e| {
        CniError::new(
            INVALID_ENVIRONMENT,
            format!("CNI_NETNS={path} is not a usable network namespace: {e}"),
        )
    })
}

struct Plan {
    address: (Ipv4Addr, u8),
    gateway: Ipv4Addr,
    routes: Vec<((Ipv4Addr, u8), Ipv4Addr)>,
    mtu: u32,
}

fn plan(alloc: &AllocationResponse, conf: &NetConf) -> CniResult<Plan> {
    let broken = |what: &str| {
        CniError::new(
            AGENT_REFUSED,
            format!("mesh-agent sent an unusable allocation ({what}): {alloc:?}"),
        )
    };
    let address = parse_cidr(&alloc.address).ok_or_else(|| broken("address"))?;
    let gateway: Ipv4Addr = alloc.gateway.parse().map_err(|_| broken("gateway"))?;
    let mut routes = Vec::new();
    for r in &alloc.routes {
        let dst = parse_cidr(&r.dst).ok_or_else(|| broken("route"))?;
        let gw = r.gw.parse().map_err(|_| broken("route gateway"))?;
        routes.push((dst, gw));
    }
    let mtu = conf.mtu.map_or(alloc.mtu, |m| m.min(alloc.mtu));
    Ok(Plan {
        address,
        gateway,
        routes,
        mtu,
    })
}

fn output(conf: &NetConf, env: &CniEnv, bridge: &Link, host: &Link, pod: &Link, p: &Plan) -> Value {
    let out = CniOutput {
        interfaces: vec![
            Interface {
                name: bridge.name.clone(),
                mac: bridge.mac_string(),
                ..Default::default()
            },
            Interface {
                name: host.name.clone(),
                mac: host.mac_string(),
                ..Default::default()
            },
            Interface {
                name: pod.name.clone(),
                mac: pod.mac_string(),
                mtu: Some(p.mtu),
                sandbox: Some(env.netns.clone()),
            },
        ],
        ips: vec![IpConfig {
            address: format!("{}/{}", p.address.0, p.address.1),
            gateway: Some(p.gateway.to_string()),
            interface: Some(2),
        }],
        routes: p
            .routes
            .iter()
            .map(|((dst, prefix), gw)| Route {
                dst: format!("{dst}/{prefix}"),
                gw: Some(gw.to_string()),
            })
            .collect(),
        dns: conf.dns.clone(),
    };
    out.render_onto(conf.prev_result.as_ref(), &conf.cni_version)
}

pub async fn add(env: &CniEnv, conf: &NetConf) -> CniResult<Value> {
    let host = Netlink::connect().map_err(setup_failed)?;
    let bridge = bridge(&host, conf).await?;
    let ns_file = open_netns(&env.netns)?;
    let pod = Netlink::connect_in(Path::new(&env.netns)).map_err(setup_failed)?;
    let host_name = host_veth_name(&env.container_id, &env.ifname);
    let existing_host = host.link_by_name(&host_name).await.map_err(setup_failed)?;
    let repeat = match pod.link_by_name(&env.ifname).await.map_err(setup_failed)? {
        Some(l)
            if existing_host
                .as_ref()
                .is_some_and(|h| l.peer_index == Some(h.index)) =>
        {
            true
        }
        Some(_) => {
            return Err(CniError::new(
                crate::error::NETWORK_SETUP_FAILED,
                format!(
                    "{} already exists in {} and was not created by mesh-cni for container {}",
                    env.ifname, env.netns, env.container_id
                ),
            ))
        }
        None => false,
    };
    if !repeat && existing_host.is_some() {
        // Left by an ADD that died half-way; its pod end is gone, so it is ours to remove.
        host.delete_link(&host_name).await.map_err(setup_failed)?;
    }
    let request = AllocationRequest {
        network: conf.name.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        netns: Some(env.netns.clone()),
        pod: match (&env.pod.namespace, &env.pod.name) {
            (Some(namespace), Some(name)) => Some(PodRef {
                namespace: namespace.clone(),
                name: name.clone(),
            }),
            _ => None,
        },
    };
    let agent = agent(conf);
    let (alloc, created) = agent.allocate(&request).await?;
    let attempt = async {
        let p = plan(&alloc, conf)?;
        // The node's own entry for a reused address may still name the previous pod.
        host.forget_neighbour(bridge.index, p.address.0)
            .await
            .map_err(setup_failed)?;
        if !repeat {
            attach::create_veth(&host, &host_name, &env.ifname, &ns_file, p.mtu).await?;
        }
        let host_end = host
            .link_by_name(&host_name)
            .await
            .map_err(setup_failed)?
            .ok_or_else(|| {
                CniError::new(
                    crate::error::NETWORK_SETUP_FAILED,
                    format!("the host end {host_name} vanished during set-up"),
                )
            })?;
        attach::attach_host_end(&host, host_end.index, bridge.index).await?;
        let pod_end = attach::configure_pod_end(&pod, &env.ifname, p.address, &p.routes).await?;
        if let Ok(mac) = <[u8; 6]>::try_from(pod_end.mac.as_slice()) {
            // Not fatal: the pod works; only caches holding a previous pod's MAC for this
            // address stay wrong until they expire.
            if let Err(e) = announce::announce(
                &host,
                &host_name,
                Path::new(&env.netns),
                pod_end.index,
                mac,
                p.address.0,
            )
            .await
            {
                eprintln!(
                    "mesh-cni: could not announce {} (gratuitous ARP): {e}",
                    p.address.0
                );
            }
        }
        Ok::<_, CniError>(output(conf, env, &bridge, &host_end, &pod_end, &p))
    };
    match attempt.await {
        Ok(v) => Ok(v),
        Err(e) => {
            // Leave nothing behind: the pair (deleting one end removes both) and an
            // address this call took.
            if !repeat {
                let _ = host.delete_link(&host_name).await;
            }
            if created {
                if let Err(r) = agent.release(&env.container_id, &env.ifname).await {
                    return Err(
                        e.with_details(format!("and releasing its address failed too: {r}"))
                    );
                }
            }
            Err(e)
        }
    }
}

pub async fn del(env: &CniEnv, conf: &NetConf) -> CniResult<()> {
    let host = Netlink::connect().map_err(setup_failed)?;
    host.delete_link(&host_veth_name(&env.container_id, &env.ifname))
        .await
        .map_err(setup_failed)?;
    let agent = agent(conf);
    // The node forgets the pod's MAC with its address: whoever gets the address next is
    // reachable from the node at once. (Best effort: an agent that is down fails the
    // release below with the error that matters.)
    if let Ok(Some(held)) = agent.allocation(&env.container_id, &env.ifname).await {
        if let (Some((ip, _)), Ok(Some(bridge))) = (
            parse_cidr(&held.address),
            host.link_by_name(&conf.bridge).await,
        ) {
            if let Err(e) = host.forget_neighbour(bridge.index, ip).await {
                eprintln!("mesh-cni: could not forget the neighbour entry of {ip}: {e}");
            }
        }
    }
    // A gone or empty netns means its interfaces are gone too (spec: DEL succeeds then).
    if !env.netns.is_empty() && netns::open(Path::new(&env.netns)).is_ok() {
        if let Ok(pod) = Netlink::connect_in(Path::new(&env.netns)) {
            if let Ok(Some(l)) = pod.link_by_name(&env.ifname).await {
                if l.kind.as_deref() == Some("veth") {
                    pod.delete_link(&env.ifname).await.map_err(setup_failed)?;
                }
            }
        }
    }
    agent.release(&env.container_id, &env.ifname).await
}

fn drift(msg: impl Into<String>) -> CniError {
    CniError::new(CHECK_FAILED, msg)
}

pub async fn check(env: &CniEnv, conf: &NetConf) -> CniResult<()> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(INVALID_CONFIG, "CHECK needs prevResult (the result of ADD)")
    })?;
    let prev = CniOutput::from_value(prev)
        .ok_or_else(|| CniError::new(INVALID_CONFIG, "prevResult is not a CNI result"))?;
    let index = prev
        .interfaces
        .iter()
        .position(|i| i.name == env.ifname && i.sandbox.as_deref() == Some(env.netns.as_str()))
        .ok_or_else(|| {
            drift(format!(
                "prevResult lists no interface {} in {}",
                env.ifname, env.netns
            ))
        })?;
    let wanted_ips: Vec<(Ipv4Addr, u8)> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface == Some(index))
        .filter_map(|ip| parse_cidr(&ip.address))
        .collect();
    if wanted_ips.is_empty() {
        return Err(drift(format!(
            "prevResult gives {} no IPv4 address",
            env.ifname
        )));
    }
    let recorded = agent(conf)
        .allocation(&env.container_id, &env.ifname)
        .await?
        .ok_or_else(|| {
            drift(format!(
                "mesh-agent has no address recorded for container {} / {}",
                env.container_id, env.ifname
            ))
        })?;
    let recorded_ip = parse_cidr(&recorded.address);
    if !recorded_ip.is_some_and(|r| wanted_ips.contains(&r)) {
        return Err(drift(format!(
            "mesh-agent records {} for this attachment, prevResult says {:?}",
            recorded.address,
            prev.ips.iter().map(|i| &i.address).collect::<Vec<_>>()
        )));
    }
    let host = Netlink::connect().map_err(setup_failed)?;
    let bridge = bridge(&host, conf).await?;
    let host_name = host_veth_name(&env.container_id, &env.ifname);
    match host.link_by_name(&host_name).await.map_err(setup_failed)? {
        None => return Err(drift(format!("the host end {host_name} is missing"))),
        Some(h) if h.controller != Some(bridge.index) => {
            return Err(drift(format!(
                "the host end {host_name} is not attached to {}",
                conf.bridge
            )))
        }
        Some(h) if !h.up => return Err(drift(format!("the host end {host_name} is down"))),
        Some(_) => {}
    }
    open_netns(&env.netns)?;
    let pod = Netlink::connect_in(Path::new(&env.netns)).map_err(setup_failed)?;
    let link = pod
        .link_by_name(&env.ifname)
        .await
        .map_err(setup_failed)?
        .ok_or_else(|| drift(format!("{} is missing from {}", env.ifname, env.netns)))?;
    if !link.up {
        return Err(drift(format!("{} is down in {}", env.ifname, env.netns)));
    }
    if let Some(mtu) = prev.interfaces[index].mtu {
        if link.mtu != mtu {
            return Err(drift(format!(
                "{} has MTU {}, prevResult says {mtu}",
                env.ifname, link.mtu
            )));
        }
    }
    let present = pod.addresses_v4(link.index).await.map_err(setup_failed)?;
    for (ip, prefix) in &wanted_ips {
        if !present.contains(&(*ip, *prefix)) {
            return Err(drift(format!(
                "address {ip}/{prefix} is missing on {} in {} (present: {:?})",
                env.ifname,
                env.netns,
                present
                    .iter()
                    .map(|(a, p)| format!("{a}/{p}"))
                    .collect::<Vec<_>>()
            )));
        }
    }
    let routes = pod.routes_v4().await.map_err(setup_failed)?;
    for r in &prev.routes {
        let (Some((dst, prefix)), Some(gw)) = (
            parse_cidr(&r.dst),
            r.gw.as_deref().and_then(|g| g.parse::<Ipv4Addr>().ok()),
        ) else {
            continue;
        };
        let found = routes.iter().any(|x| {
            x.dst == dst && x.prefix == prefix && x.gateway == Some(gw) && x.oif == Some(link.index)
        });
        if !found {
            return Err(drift(format!(
                "route {dst}/{prefix} via {gw} dev {} is missing in {}",
                env.ifname, env.netns
            )));
        }
    }
    Ok(())
}

pub async fn gc(conf: &NetConf) -> CniResult<()> {
    // Without the runtime's list every allocation would look stale: releasing them all
    // would hand live pods' addresses out again.
    let valid = conf.valid_attachments.as_deref().ok_or_else(|| {
        CniError::new(
            INVALID_CONFIG,
            "GC needs cni.dev/valid-attachments (the runtime's list of live attachments); \
             without it nothing is released",
        )
    })?;
    let agent = agent(conf);
    let released = agent.gc(valid).await?;
    for a in &released.released {
        eprintln!(
            "mesh-cni GC: released {} of {} / {}",
            a.address, a.container_id, a.ifname
        );
    }
    // Host ends whose attachment the runtime no longer lists (their pod namespace is
    // normally gone, which removes them; this catches the ones something kept alive) —
    // but never one whose attachment still holds an address, in this network or another
    // (a GC of one network must not cut another's pods).
    let held = agent.allocations().await?;
    let keep: BTreeSet<String> = valid
        .iter()
        .map(|(c, i)| host_veth_name(c, i))
        .chain(
            held.iter()
                .map(|a| host_veth_name(&a.container_id, &a.ifname)),
        )
        .collect();
    let host = Netlink::connect().map_err(setup_failed)?;
    let mut failures = Vec::new();
    for l in host.links().await.map_err(setup_failed)? {
        if is_host_veth_name(&l.name)
            && l.kind.as_deref() == Some("veth")
            && !keep.contains(&l.name)
        {
            if let Err(e) = host.delete_link(&l.name).await {
                failures.push(format!("{}: {e}", l.name));
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(setup_failed_msg(format!(
            "GC could not remove stale veths: {}",
            failures.join("; ")
        )))
    }
}

fn setup_failed_msg(msg: String) -> CniError {
    CniError::new(crate::error::NETWORK_SETUP_FAILED, msg)
}

pub async fn status(conf: &NetConf) -> CniResult<()> {
    let s = agent(conf)
        .status()
        .await
        .map_err(|e| CniError::new(STATUS_UNAVAILABLE, e.msg).with_details(e.details))?;
    if s.ipam.status != "ready" {
        return Err(CniError::new(
            STATUS_UNAVAILABLE,
            format!(
                "mesh-agent cannot hand out addresses yet: {}",
                s.ipam.status
            ),
        ));
    }
    match s.node_network {
        None => Err(CniError::new(
            STATUS_UNAVAILABLE,
            "mesh-agent runs with --dataplane none: this node has no pod network",
        )),
        Some(n) if !n.ready => Err(CniError::new(
            STATUS_DEGRADED,
            format!(
                "the node bridge {} is not ready: {}",
                n.bridge,
                n.problem.unwrap_or_else(|| "unknown reason".into())
            ),
        )),
        Some(_) => Ok(()),
    }
}
