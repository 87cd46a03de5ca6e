//! Workloads on the testbed cluster, through the Kubernetes API only, as a user runs them: a
//! Deployment of `mesh-probe` pods spread over every schedulable node, a ClusterIP Service,
//! NodePort Services with `externalTrafficPolicy: Cluster` and `Local`, a hostPort pod; and the
//! checks on them (`check`): pod to pod across nodes with the real source address, the
//! ClusterIP from pods on every node and from every node, NodePorts from a host outside the
//! cluster through every node, the hostPort, `kubectl logs` and `kubectl exec … meshctl status`
//! on mesh's pods.

use std::io::Write;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{items, wait_for, Cluster, PodState, OUTSIDE_IP};

pub const NAMESPACE: &str = "mesh-check";
pub const DEPLOYMENT: &str = "probe";
pub const HOST_PORT: u16 = 18080;
pub const NODE_PORT_CLUSTER: u16 = 30080;
pub const NODE_PORT_LOCAL: u16 = 30081;

fn probe_image(c: &Cluster) -> String {
    format!("localhost/mesh-probe:{}", c.opts.tag)
}

fn container(c: &Cluster, command: &[&str], host_port: Option<u16>) -> Value {
    let mut port = json!({"name": "http", "containerPort": 8080, "protocol": "TCP"});
    if let Some(hp) = host_port {
        port["hostPort"] = json!(hp);
    }
    json!({
        "name": "probe",
        "image": probe_image(c),
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "ports": [port,
                  {"name": "udp", "containerPort": 8081, "protocol": "UDP"},
                  {"name": "stream", "containerPort": 9000, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 2},
    })
}

/// `kubectl apply -f` of one object (as JSON).
pub fn apply(c: &Cluster, obj: &Value) -> Result<()> {
    let path = c.tb.work.join(format!(
        "{}-{}.json",
        obj["kind"].as_str().unwrap_or("object").to_lowercase(),
        obj["metadata"]["name"].as_str().unwrap_or("x")
    ));
    std::fs::write(&path, obj.to_string())?;
    c.kubectl_ok(&["apply", "-f", &path.display().to_string()])?;
    Ok(())
}

/// Nodes pods may be scheduled on (not the tainted control plane).
pub fn schedulable_nodes(c: &Cluster) -> Vec<String> {
    c.nodes
        .iter()
        .filter(|n| !n.control_plane)
        .map(|n| n.name.clone())
        .collect()
}

/// The Deployment (`replicas`, spread evenly over the nodes), its Services and the hostPort
/// pod; returns once every pod is ready. The measured wait is returned.
pub fn deploy(c: &Cluster, replicas: usize) -> Result<Duration> {
    apply(
        c,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
    )?;
    c.wait_service_account_token(NAMESPACE)?;
    let labels = json!({"app": DEPLOYMENT});
    apply(
        c,
        &json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": DEPLOYMENT, "namespace": NAMESPACE},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "automountServiceAccountToken": false,
                        "terminationGracePeriodSeconds": 1,
                        // Workers only: 1.20's spread counts every node the pod may
                        // select (taints are not considered), so the tainted control
                        // plane must be excluded by affinity or it holds the skew at 0.
                        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [{"matchExpressions": [
                                {"key": "node-role.kubernetes.io/master", "operator": "DoesNotExist"}]}]}}},
                        "topologySpreadConstraints": [{
                            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": labels},
                        }],
                        "containers": [container(c, &["/usr/local/bin/mesh-probe", "serve"], None)],
                    },
                },
            },
        }),
    )?;
    let service = |name: &str, spec: Value| {
        let mut s = json!({"type": "ClusterIP", "selector": labels,
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]});
        if let (Some(s), Some(extra)) = (s.as_object_mut(), spec.as_object()) {
            for (k, v) in extra {
                s.insert(k.clone(), v.clone());
            }
        }
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": NAMESPACE}, "spec": s})
    };
    apply(c, &service(DEPLOYMENT, json!({})))?;
    apply(
        c,
        &service(
            "probe-cluster",
            json!({"type": "NodePort", "externalTrafficPolicy": "Cluster",
                   "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": NODE_PORT_CLUSTER}]}),
        ),
    )?;
    apply(
        c,
        &service(
            "probe-local",
            json!({"type": "NodePort", "externalTrafficPolicy": "Local",
                   "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": NODE_PORT_LOCAL}]}),
        ),
    )?;
    let first = schedulable_nodes(c)
        .into_iter()
        .next()
        .context("no worker node")?;
    apply(
        c,
        &json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "hostport", "namespace": NAMESPACE, "labels": {"app": "hostport"}},
            "spec": {
                "automountServiceAccountToken": false,
                "terminationGracePeriodSeconds": 1,
                "nodeSelector": {"kubernetes.io/hostname": first},
                "containers": [container(c, &["/usr/local/bin/mesh-probe", "serve"], Some(HOST_PORT))],
            },
        }),
    )?;
    let (_, took) = wait_for("the probe pods ready", Duration::from_secs(180), || {
        let pods = pods(c, &format!("app={DEPLOYMENT}"))?;
        let hp = pods_all(c)?
            .into_iter()
            .filter(|p| p.name == "hostport" && p.ready)
            .count();
        Ok((pods.len() == replicas && pods.iter().all(|p| p.ready) && hp == 1).then_some(()))
    })
    .map_err(|e| anyhow::anyhow!("{e:#}\n{}", c.diagnose()))?;
    Ok(took)
}

/// Pods of the check namespace with `selector`.
pub fn pods(c: &Cluster, selector: &str) -> Result<Vec<PodState>> {
    let v = c.get_json(&["-n", NAMESPACE, "pods", "-l", selector])?;
    Ok(items(&v).iter().map(PodState::from_json).collect())
}

fn pods_all(c: &Cluster) -> Result<Vec<PodState>> {
    let v = c.get_json(&["-n", NAMESPACE, "pods"])?;
    Ok(items(&v).iter().map(PodState::from_json).collect())
}

/// `kubectl exec POD -- mesh-probe get URL`: the answer body.
pub fn get_from_pod(c: &Cluster, pod: &str, url: &str) -> Result<String> {
    c.kubectl_ok(&["-n", NAMESPACE, "exec", pod, "--", "mesh-probe", "get", url])
}

/// The probe binary on the host (next to mesh-testbed), for node and outside clients.
fn probe_bin() -> Result<std::path::PathBuf> {
    let p = crate::bed::bin_dir()?.join("mesh-probe");
    if !p.is_file() {
        bail!("{} is missing: build the workspace's binaries", p.display());
    }
    Ok(p)
}

/// `mesh-probe get URL` from node `node` (its network namespace: host networking).
pub fn get_from_node(c: &Cluster, node: usize, url: &str) -> Result<String> {
    get_in_netns(c, &c.nodes[node].netns, url)
}

/// `mesh-probe get URL` from the host outside the cluster.
pub fn get_from_outside(c: &Cluster, url: &str) -> Result<String> {
    get_in_netns(c, &c.outside, url)
}

fn get_in_netns(c: &Cluster, netns: &str, url: &str) -> Result<String> {
    let probe = probe_bin()?.display().to_string();
    let out =
        c.tb.ns_output(netns, &[&probe, "get", url, "--timeout-ms", "3000"])?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The client address in a probe's answer (`client=IP:PORT host=NAME`).
pub fn client_of(answer: &str) -> Option<Ipv4Addr> {
    let c = answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix("client="))?;
    c.rsplit_once(':')?.0.parse().ok()
}

pub fn host_of(answer: &str) -> Option<String> {
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix("host="))
        .map(str::to_string)
}

fn cluster_ip(c: &Cluster, service: &str) -> Result<Ipv4Addr> {
    c.kubectl_ok(&[
        "-n",
        NAMESPACE,
        "get",
        "service",
        service,
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?
    .trim()
    .parse()
    .context("the Service has no clusterIP")
}

struct Report<'a> {
    out: &'a mut dyn Write,
    failed: usize,
}

impl Report<'_> {
    fn check(&mut self, what: &str, r: Result<String>) {
        let line = match r {
            Ok(detail) => format!(
                "  ok   {what}{}",
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({detail})")
                }
            ),
            Err(e) => {
                self.failed += 1;
                format!("  FAIL {what}: {e:#}")
            }
        };
        let _ = writeln!(self.out, "{line}");
        let _ = self.out.flush();
    }
}

/// Every workload check; true when all pass.
pub fn check(c: &Cluster, out: &mut dyn Write) -> Result<bool> {
    let mut r = Report { out, failed: 0 };
    let probes = pods(c, &format!("app={DEPLOYMENT}"))?;
    let nodes = schedulable_nodes(c);
    r.check(
        &format!(
            "Deployment {DEPLOYMENT}: {} pods spread over every schedulable node",
            probes.len()
        ),
        (|| {
            let missing: Vec<&String> = nodes
                .iter()
                .filter(|n| !probes.iter().any(|p| &p.node == *n))
                .collect();
            if !missing.is_empty() {
                bail!("no pod on {missing:?}");
            }
            if let Some(p) = probes.iter().find(|p| !p.ready || p.ip.is_none()) {
                bail!("{} is not ready or has no address", p.name);
            }
            Ok(probes
                .iter()
                .map(|p| {
                    format!(
                        "{}@{}",
                        p.ip.map(|i| i.to_string()).unwrap_or_default(),
                        p.node
                    )
                })
                .collect::<Vec<_>>()
                .join(" "))
        })(),
    );
    // Pod to pod across nodes: every pod to one pod on each other node; the server must see
    // the client pod's own address (no NAT inside the cluster).
    let mut pairs = 0;
    let mut bad = Vec::new();
    for a in &probes {
        for node in nodes.iter().filter(|n| **n != a.node) {
            let Some(b) = probes.iter().find(|p| &p.node == node) else {
                continue;
            };
            let (Some(aip), Some(bip)) = (a.ip, b.ip) else {
                continue;
            };
            pairs += 1;
            match get_from_pod(c, &a.name, &format!("http://{bip}:8080/")) {
                Ok(ans) if client_of(&ans) == Some(aip) => {}
                Ok(ans) => bad.push(format!("{} -> {}: server saw {ans:?}", a.name, b.name)),
                Err(e) => bad.push(format!("{} -> {}: {e:#}", a.name, b.name)),
            }
        }
    }
    r.check(
        &format!("pod -> pod across nodes with the pod's own source address ({pairs} pairs)"),
        if bad.is_empty() {
            Ok(String::new())
        } else {
            Err(anyhow::anyhow!("{}", bad.join("; ")))
        },
    );
    let vip = cluster_ip(c, DEPLOYMENT)?;
    for node in &nodes {
        let Some(a) = probes.iter().find(|p| &p.node == node) else {
            continue;
        };
        r.check(
            &format!("ClusterIP {vip}:80 from pod {} on {node}", a.name),
            get_from_pod(c, &a.name, &format!("http://{vip}:80/")).and_then(|ans| {
                match (client_of(&ans), a.ip) {
                    (Some(seen), Some(own)) if seen == own => Ok(format!(
                        "answered by {}, source kept",
                        host_of(&ans).unwrap_or_default()
                    )),
                    _ => bail!("answer {ans:?}"),
                }
            }),
        );
    }
    for (i, n) in c.nodes.iter().enumerate() {
        r.check(
            &format!("ClusterIP {vip}:80 from node {}", n.name),
            get_from_node(c, i, &format!("http://{vip}:80/"))
                .map(|ans| format!("answered by {}", host_of(&ans).unwrap_or_default())),
        );
    }
    // NodePort from outside the cluster through every node.
    for n in &c.nodes {
        r.check(
            &format!(
                "NodePort {}:{NODE_PORT_CLUSTER} (externalTrafficPolicy Cluster) from {OUTSIDE_IP}",
                n.address
            ),
            get_from_outside(c, &format!("http://{}:{NODE_PORT_CLUSTER}/", n.address)).map(|ans| {
                format!(
                    "answered by {}, seen from {}",
                    host_of(&ans).unwrap_or_default(),
                    client_of(&ans).map(|a| a.to_string()).unwrap_or_default()
                )
            }),
        );
        let has_local = probes.iter().any(|p| p.node == n.name);
        let ans = get_from_outside(c, &format!("http://{}:{NODE_PORT_LOCAL}/", n.address));
        if has_local {
            r.check(
                &format!("NodePort {}:{NODE_PORT_LOCAL} (Local) from {OUTSIDE_IP} keeps the client's address", n.address),
                ans.and_then(|a| match client_of(&a) {
                    Some(ip) if ip == OUTSIDE_IP => Ok(format!("answered by {} on the same node", host_of(&a).unwrap_or_default())),
                    _ => bail!("answer {a:?}"),
                }),
            );
        } else {
            r.check(
                &format!("NodePort {}:{NODE_PORT_LOCAL} (Local) on a node without a local endpoint drops", n.address),
                match ans {
                    Ok(a) => Err(anyhow::anyhow!("answered: {a:?}")),
                    // Dropped by kube-proxy: the connection times out (anything else —
                    // refused, a missing binary — is not the behaviour checked here).
                    Err(e) if format!("{e:#}").contains("timed out") => Ok("timed out".into()),
                    Err(e) => Err(e.context("expected a timeout")),
                },
            );
        }
    }
    let hostport = pods_all(c)?.into_iter().find(|p| p.name == "hostport");
    let hp_node = hostport
        .as_ref()
        .and_then(|p| c.nodes.iter().find(|n| n.name == p.node));
    r.check(
        &format!("hostPort {HOST_PORT} (portmap) from {OUTSIDE_IP}"),
        match hp_node {
            Some(n) => {
                get_from_outside(c, &format!("http://{}:{HOST_PORT}/", n.address)).and_then(|a| {
                    if host_of(&a).as_deref() == Some("hostport") {
                        Ok(format!(
                            "{}:{HOST_PORT} answered by the hostport pod",
                            n.address
                        ))
                    } else {
                        bail!("answer {a:?}")
                    }
                })
            }
            None => Err(anyhow::anyhow!("the hostport pod is not scheduled")),
        },
    );
    let mesh = c.mesh_pods()?;
    let names = c.node_names()?;
    for p in &mesh {
        r.check(
            &format!(
                "kubectl logs + exec meshctl status on {} ({})",
                p.name, p.node
            ),
            (|| {
                let logs = c.mesh_logs(&p.name, Some(200))?;
                if logs.trim().is_empty() {
                    bail!("kubectl logs printed nothing");
                }
                let status = c.meshctl(&p.name, &["status", "-o", "json"])?;
                let v: Value = serde_json::from_str(&status).context("meshctl status -o json")?;
                if v["ready"] != true {
                    bail!("meshctl status: not ready: {status}");
                }
                let peers = v["peers"].as_u64().unwrap_or(0) as usize;
                if peers < names.len() {
                    bail!(
                        "meshctl status shows {peers} peers, the cluster has {} nodes",
                        names.len()
                    );
                }
                Ok(format!(
                    "{} log lines, {peers} peers, data plane {}",
                    logs.lines().count(),
                    v["dataplane"].as_str().unwrap_or("?")
                ))
            })(),
        );
    }
    let _ = writeln!(
        r.out,
        "{}",
        if r.failed == 0 {
            "all workload checks passed".to_string()
        } else {
            format!("{} workload checks FAILED", r.failed)
        }
    );
    Ok(r.failed == 0)
}

/// The long TCP stream of the lifecycle checks: a pod on `client_node` sending a frame every
/// 10 ms to the stream sink of probe pod `server` (on another node), over one connection
/// that is never re-dialled. Returns once the sink sees frames.
pub fn start_stream(c: &Cluster, server: &PodState, client_node: &str) -> Result<()> {
    let ip = server.ip.context("the stream server has no address")?;
    apply(
        c,
        &json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "stream-client", "namespace": NAMESPACE, "labels": {"app": "stream-client"}},
            "spec": {
                "automountServiceAccountToken": false,
                "terminationGracePeriodSeconds": 1,
                "restartPolicy": "Never",
                "nodeSelector": {"kubernetes.io/hostname": client_node},
                "containers": [{
                    "name": "stream", "image": probe_image(c), "imagePullPolicy": "IfNotPresent",
                    "command": ["/usr/local/bin/mesh-probe", "stream", format!("{ip}:9000"), "--interval-ms", "10"],
                }],
            },
        }),
    )?;
    wait_for("the stream flowing", Duration::from_secs(60), || {
        let s = stream_stats(c, &server.name)?;
        Ok((s["open"] == 1 && s["frames"].as_u64().unwrap_or(0) > 10).then_some(()))
    })?;
    Ok(())
}

/// The sink's statistics on probe pod `server` (`GET /stream`).
pub fn stream_stats(c: &Cluster, server: &str) -> Result<Value> {
    let body = get_from_pod(c, server, "http://127.0.0.1:8080/stream")?;
    serde_json::from_str(&body).with_context(|| format!("stream stats {body:?}"))
}
