//! Kubernetes integration (`--kube`): Node objects become peer targets, a Lease elects the
//! single writer for the first IPAM split and for reclaiming deleted Nodes' space, and the
//! agent reports its data plane on its own Node (`NetworkUnavailable`, annotations).
//!
//! The decisions are pure (`topology`, `lease::Observer`, `reclaim`); this module is the
//! thin driver. Nothing here can stop the data plane: every API failure (unreachable
//! apiserver, missing RBAC rights, a 409) is logged in words, shown in `meshctl status`
//! and retried with backoff, while the mesh keeps running on what it already knows.

pub mod lease;
pub mod node_status;
pub mod reclaim;
pub mod topology;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use mesh_proto::api::KubeStatus;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn, Instrument};

use crate::ipam::core::ReclaimMode;
use crate::mesh::driver::ApiRequest;
use reclaim::{PeerSpace, Reclaimer};
use topology::{NodeBook, NodeEvent, NodeFacts};

/// What the Kubernetes side needs to know about this agent.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// `--kubeconfig`; without it: in-cluster config, else `$KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Where the Lease lives (the agent's own namespace in a DaemonSet).
    pub namespace: String,
    /// This node's name: the Kubernetes Node name.
    pub node_name: String,
    /// The port every agent listens on (targets built from InternalIP use it).
    pub port: u16,
    /// Published as `mesh.dev/address`.
    pub advertise: SocketAddr,
    pub peer_id: String,
    /// The data plane in use (`vxlan`, `udp`), published as `mesh.dev/backend`.
    pub backend: Option<String>,
    /// The first IPAM split is this node's to make when it holds the Lease.
    pub elected_split: bool,
}

/// The running integration: its state, and its task (which, on shutdown, hands the Lease
/// back if it holds it — worth waiting for, briefly).
pub struct Running {
    pub status: watch::Receiver<KubeStatus>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the integration.
pub fn start(
    opts: KubeOptions,
    driver: mpsc::Sender<ApiRequest>,
    shutdown: watch::Receiver<bool>,
) -> Running {
    let (status_tx, status) = watch::channel(KubeStatus {
        api: "connecting".into(),
        ..KubeStatus::default()
    });
    let span = tracing::info_span!("kube", node = %opts.node_name);
    let task = tokio::spawn(run(opts, driver, status_tx, shutdown).instrument(span));
    Running { status, task }
}

/// Backoff for reconnecting and for failed writes: 1 s doubling to 30 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(5)).min(Duration::from_secs(30))
}

async fn connect(opts: &KubeOptions) -> anyhow::Result<Client> {
    use anyhow::Context;
    let config = match &opts.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read --kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("bad kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster service account and no kubeconfig: run in a pod with a ServiceAccount, or pass --kubeconfig (or set $KUBECONFIG)")?,
    };
    Client::try_from(config).context("cannot build a Kubernetes client")
}

/// Sets (or with `None` clears) what fails in one area. `last_error` is the newest error;
/// when that one clears, another still failing area's (if any).
fn record_error(status: &watch::Sender<KubeStatus>, area: &str, error: Option<String>) {
    status.send_if_modified(|s| match error {
        Some(text) => {
            let changed = s.errors.get(area) != Some(&text) || s.last_error.as_ref() != Some(&text);
            s.errors.insert(area.to_string(), text.clone());
            s.last_error = Some(text);
            changed
        }
        None => {
            let Some(old) = s.errors.remove(area) else {
                return false;
            };
            if s.last_error.as_ref() == Some(&old) {
                s.last_error = s.errors.values().next_back().cloned();
            }
            true
        }
    });
}

/// An API error in words an operator can act on.
pub fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.code == 403 => format!(
            "forbidden by RBAC ({}): the agent's ServiceAccount needs the ClusterRole in deploy/",
            s.message
        ),
        kube::Error::Api(s) if s.code == 401 => {
            format!(
                "unauthorized ({}): the token or certificate is not accepted",
                s.message
            )
        }
        kube::Error::Service(_) | kube::Error::HyperError(_) => format!(
            "cannot reach the Kubernetes API server ({}); retrying",
            chain(e)
        ),
        other => chain(other),
    }
}

/// An error with its causes, `: `-separated (kube's own texts stop at "client error").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

fn describe_watch(e: &watcher::Error) -> String {
    match e {
        watcher::Error::InitialListFailed(k)
        | watcher::Error::WatchStartFailed(k)
        | watcher::Error::WatchFailed(k) => format!("watching Nodes: {}", describe(k)),
        other => format!("watching Nodes: {other}"),
    }
}

fn node_event(e: watcher::Event<Node>) -> Option<NodeEvent> {
    Some(match e {
        watcher::Event::Apply(n) => NodeEvent::Apply(NodeFacts::of(&n)?),
        watcher::Event::Delete(n) => NodeEvent::Delete(n.metadata.name?),
        watcher::Event::Init => NodeEvent::Init,
        watcher::Event::InitApply(n) => NodeEvent::InitApply(NodeFacts::of(&n)?),
        watcher::Event::InitDone => NodeEvent::InitDone,
    })
}

async fn ask<T>(
    driver: &mpsc::Sender<ApiRequest>,
    make: impl FnOnce(oneshot::Sender<T>) -> ApiRequest,
) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    driver.send(make(tx)).await.ok()?;
    tokio::time::timeout(Duration::from_secs(15), rx)
        .await
        .ok()?
        .ok()
}

struct Integration {
    opts: KubeOptions,
    driver: mpsc::Sender<ApiRequest>,
    status: watch::Sender<KubeStatus>,
    nodes: Api<Node>,
    leases: Api<Lease>,
    book: NodeBook,
    observer: lease::Observer,
    reclaimer: Reclaimer,
    lease_failures: u32,
    next_lease_round: Instant,
    /// Since when this process holds the Lease.
    leading_since: Option<Instant>,
    own_node: node_status::Published,
}

async fn run(
    opts: KubeOptions,
    driver: mpsc::Sender<ApiRequest>,
    status: watch::Sender<KubeStatus>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failures = 0;
    let client = loop {
        match connect(&opts).await {
            Ok(c) => break c,
            Err(e) => {
                let text = format!("{e:#}");
                warn!(error = %text, "cannot connect to the Kubernetes API; the mesh runs on without it and retries");
                status.send_modify(|s| s.api = "not connected".into());
                record_error(&status, "connect", Some(text));
                failures += 1;
                tokio::select! {
                    _ = tokio::time::sleep(backoff(failures)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    };
    status.send_modify(|s| s.api = "listing nodes".into());
    record_error(&status, "connect", None);
    let mut k = Integration {
        nodes: Api::all(client.clone()),
        leases: Api::namespaced(client, &opts.namespace),
        book: NodeBook::new(&opts.node_name, opts.port),
        observer: lease::Observer::default(),
        reclaimer: Reclaimer::default(),
        lease_failures: 0,
        next_lease_round: Instant::now(),
        leading_since: None,
        own_node: node_status::Published::default(),
        opts,
        driver,
        status,
    };
    // The watcher relists and rewatches by itself, with backoff, after any failure.
    let mut events = watcher(k.nodes.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(e)) => k.on_node_event(e).await,
                Some(Err(e)) => {
                    let text = describe_watch(&e);
                    warn!(error = %text, "Node watch failed; retrying with backoff (the mesh keeps its current peers)");
                    record_error(&k.status, "watch", Some(text));
                }
                None => break,
            },
            _ = tick.tick() => k.on_tick().await,
            _ = shutdown.changed() => break,
        }
    }
    if k.leading_since.is_some() {
        // Like client-go's ReleaseOnCancel: another agent takes over on its next round
        // instead of waiting out the Lease duration (a rolling update restarts every pod).
        match lease::release(&k.leases, &k.opts.node_name).await {
            Ok(true) => info!("handed the mesh Lease back on shutdown"),
            Ok(false) => {}
            Err(e) => {
                warn!(error = %describe(&e), "could not hand the mesh Lease back; it expires on its own")
            }
        }
    }
}

impl Integration {
    async fn on_node_event(&mut self, e: watcher::Event<Node>) {
        let Some(event) = node_event(e) else {
            return;
        };
        let changes = self.book.apply(event);
        for name in &changes.added {
            if self.book.synced() {
                info!(peer = %name, target = ?self.book.get(name).and_then(|n| n.target(self.opts.port)), "Node added");
            }
        }
        for name in &changes.deleted {
            info!(peer = %name, "Node deleted; its agent is no longer a peer target");
        }
        if changes.added.contains(&self.opts.node_name) {
            // Our Node was (re)created: publish everything again.
            self.own_node = node_status::Published::default();
        }
        if changes.targets_changed && self.book.synced() {
            let _ = self
                .driver
                .send(ApiRequest::SetKubeTargets(self.book.targets()))
                .await;
        }
        let (nodes, targets, synced) = (
            self.book.len(),
            self.book.targets().len(),
            self.book.synced(),
        );
        self.status.send_modify(|s| {
            s.nodes = nodes;
            s.peer_targets = targets;
            if synced {
                s.api = "watching nodes".into();
            }
        });
        if synced {
            record_error(&self.status, "watch", None);
        }
    }

    async fn on_tick(&mut self) {
        if !self.book.synced() {
            return;
        }
        let Some(report) = ask(&self.driver, ApiRequest::Report).await else {
            return;
        };
        self.publish_own_node(&report).await;
        if Instant::now() >= self.next_lease_round {
            self.lease_round(&report).await;
        }
    }

    async fn publish_own_node(&mut self, report: &mesh_proto::api::Report) {
        if !self.book.contains(&self.opts.node_name) {
            if !self.own_node.missing_warned {
                warn!(node = %self.opts.node_name, "no Node of this name: is --node-name the Kubernetes node name (spec.nodeName)?");
                self.own_node.missing_warned = true;
            }
            return;
        }
        let result =
            node_status::publish(&self.nodes, &self.opts, report, &mut self.own_node).await;
        match result {
            Ok(()) => {
                let value = self.own_node.condition.clone();
                self.status.send_modify(|s| s.network_unavailable = value);
                record_error(&self.status, "node", None);
            }
            Err(e) => {
                let text = format!("updating Node {}: {}", self.opts.node_name, describe(&e));
                warn!(error = %text, "cannot update this node's Node object; retrying");
                record_error(&self.status, "node", Some(text));
            }
        }
    }

    async fn lease_round(&mut self, report: &mesh_proto::api::Report) {
        let me = self.opts.node_name.clone();
        match lease::round(&self.leases, &mut self.observer, &me).await {
            Ok(current) => {
                self.lease_failures = 0;
                record_error(&self.status, "lease", None);
                self.next_lease_round = Instant::now() + lease::RETRY;
                let Some(current) = current else {
                    return; // lost a race; look again next round
                };
                let holder = lease::holder(&current).map(String::from);
                let leading = holder.as_deref() == Some(me.as_str());
                if leading && self.leading_since.is_none() {
                    info!(lease = %format!("{}/{}", self.opts.namespace, lease::LEASE_NAME), "this node now holds the mesh Lease (first split, reclaims of deleted Nodes)");
                    self.leading_since = Some(Instant::now());
                } else if !leading && self.leading_since.is_some() {
                    info!(leader = ?holder, "this node no longer holds the mesh Lease");
                    self.leading_since = None;
                }
                self.status.send_modify(|s| {
                    s.leader = holder.clone();
                    s.is_leader = leading;
                });
                if leading {
                    self.lead(&current, report).await;
                }
            }
            Err(e) => {
                self.lease_failures += 1;
                self.next_lease_round = Instant::now() + backoff(self.lease_failures);
                let text = format!(
                    "Lease {}/{}: {}",
                    self.opts.namespace,
                    lease::LEASE_NAME,
                    describe(&e)
                );
                warn!(error = %text, "leader election failed; retrying with backoff");
                self.leading_since = None;
                self.status.send_modify(|s| s.is_leader = false);
                record_error(&self.status, "lease", Some(text));
            }
        }
    }

    /// The leader's duties: the first split of a fresh cluster, and reclaiming the space of
    /// Nodes that are gone.
    async fn lead(&mut self, current: &Lease, report: &mesh_proto::api::Report) {
        let Some(ipam) = ask(&self.driver, ApiRequest::IpamStatus).await else {
            return;
        };
        if ipam.owners.is_empty() {
            self.first_split(current, report).await;
            return;
        }
        let states: BTreeMap<&str, &str> = report
            .peers
            .peers
            .iter()
            .map(|p| (p.name.as_str(), p.state.as_str()))
            .collect();
        let peers: Vec<PeerSpace> = ipam
            .owners
            .iter()
            .map(|o| PeerSpace {
                name: o.name.clone(),
                addresses: o.addresses,
                state: states.get(o.name.as_str()).map(|s| s.to_string()),
            })
            .collect();
        let now = Instant::now();
        let book = &self.book;
        let due = self.reclaimer.due(
            now,
            &self.opts.node_name,
            book.synced(),
            |n| book.contains(n),
            &peers,
        );
        // One reclaim per round (every 2 s): each is fenced by its own fresh Lease write,
        // and no reclaim runs long after the write that allowed it.
        let Some(name) = due.into_iter().next() else {
            return;
        };
        self.reclaimer.asked(&name, now);
        // Fencing: the reclaim is first written on the Lease (renewing it) with a
        // resourceVersion check, so a holder that lost the Lease cannot act on stale
        // leadership, and nobody can take it over for a whole duration from here. As the
        // sole writer, this node may then decide alone for a peer that owns every reclaim
        // anchor (the first splitter does); any other peer goes through its coordinator.
        match lease::record_reclaim(&self.leases, current, &self.opts.node_name, &name).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                info!(peer = %name, "the Lease changed under us; not reclaiming this round");
                return;
            }
            Err(e) => {
                let text = format!(
                    "recording the reclaim of {name} on the Lease: {}",
                    describe(&e)
                );
                warn!(error = %text, "cannot fence the reclaim; will retry");
                record_error(&self.status, "lease", Some(text));
                return;
            }
        }
        let answer = ask(&self.driver, |reply| ApiRequest::Reclaim {
            name: name.clone(),
            mode: ReclaimMode::SoleWriter,
            reply,
        })
        .await;
        match answer {
            Some(Ok(r)) => {
                info!(peer = %name, result = %r.message, "reclaimed the address space of a deleted Node");
                let line = format!("{name} (Node deleted): {}", r.message);
                self.status.send_modify(|s| {
                    s.reclaims.push(line);
                    let excess = s.reclaims.len().saturating_sub(10);
                    s.reclaims.drain(..excess);
                });
            }
            Some(Err(f)) => {
                warn!(peer = %name, reason = %f.message, "reclaim of a deleted Node's space refused; will retry");
            }
            None => warn!(peer = %name, "reclaim got no answer from the agent; will retry"),
        }
    }

    async fn first_split(&mut self, current: &Lease, report: &mesh_proto::api::Report) {
        if !self.opts.elected_split {
            return;
        }
        let me = self.opts.node_name.clone();
        let split = match lease::first_split_by(current) {
            None => match lease::claim_first_split(&self.leases, current, &me).await {
                Ok(won) => won,
                Err(e) => {
                    warn!(error = %describe(&e), "cannot record the first split on the Lease; retrying");
                    false
                }
            },
            Some(by) if by == me => {
                // We claimed it before (a crash between the claim and the split, or a wiped
                // state directory). If any other agent is alive it may hold the ring: give
                // gossip time to bring it before splitting again.
                let others_alive = report
                    .peers
                    .peers
                    .iter()
                    .any(|p| !p.is_self && p.state == "alive");
                let waited = self
                    .leading_since
                    .is_some_and(|t| t.elapsed() >= Duration::from_secs(20));
                !others_alive || waited
            }
            Some(_) => false, // its ring arrives by gossip
        };
        if !split {
            return;
        }
        match ask(&self.driver, ApiRequest::FirstSplit).await {
            Some(Ok(addresses)) => {
                info!(addresses, "made the first split of the range (elected through the Lease); other nodes get space from here")
            }
            Some(Err(reason)) => info!(reason = %reason, "first split not made"),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failing Lease round and a failing Node watch are both shown; each clears only
    /// when its own area works again.
    #[test]
    fn errors_of_different_areas_do_not_hide_each_other() {
        let (tx, rx) = watch::channel(KubeStatus::default());
        record_error(&tx, "watch", Some("watch down".into()));
        record_error(&tx, "lease", Some("lease down".into()));
        assert_eq!(rx.borrow().errors.len(), 2);
        assert_eq!(rx.borrow().last_error.as_deref(), Some("lease down"));
        record_error(&tx, "lease", None);
        assert_eq!(rx.borrow().last_error.as_deref(), Some("watch down"));
        assert_eq!(rx.borrow().errors.keys().collect::<Vec<_>>(), ["watch"]);
        record_error(&tx, "node", None); // nothing to clear
        record_error(&tx, "watch", None);
        assert!(rx.borrow().errors.is_empty() && rx.borrow().last_error.is_none());
    }

    #[test]
    fn an_unreachable_apiserver_is_described_with_its_cause() {
        let refused =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let text = describe(&kube::Error::Service(Box::new(refused)));
        assert!(
            text.starts_with("cannot reach the Kubernetes API server"),
            "{text}"
        );
        assert!(text.contains("connection refused"), "{text}");
    }
}
