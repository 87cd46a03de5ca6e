//! What this agent writes on its own Node: the `NetworkUnavailable` condition (which the
//! scheduler and the node lifecycle controller read), and annotations saying how to reach
//! its agent.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use mesh_proto::api::{NodeNetworkStatus, Report};
use serde_json::json;

use super::topology::{ADDRESS_ANNOTATION, BACKEND_ANNOTATION, PEER_ID_ANNOTATION};
use super::KubeOptions;

pub const CONDITION: &str = "NetworkUnavailable";

/// What has been written so far (reset when our Node is re-created).
#[derive(Debug, Default)]
pub struct Published {
    pub annotations: bool,
    /// The condition's status as last written (`"False"` or `"True"`).
    pub condition: Option<String>,
    pub missing_warned: bool,
}

/// The condition to write now, if it should change: `False` once the pod network and the
/// tunnel are ready; back to `True` only if it was `False` and the data plane broke. A
/// node without a data plane (`--dataplane none`) never claims a network.
pub fn desired(
    net: Option<&NodeNetworkStatus>,
    backend: Option<&str>,
    written: Option<&str>,
) -> Option<(&'static str, &'static str, String)> {
    let net = net?;
    let ready = net.ready && net.tunnel_problem.is_none();
    let backend = backend.unwrap_or("no cross-node");
    let want = if ready {
        (
            "False",
            "MeshIsUp",
            format!("mesh: {backend} data plane ready, bridge {}", net.bridge),
        )
    } else if written.is_some() {
        let why = net
            .tunnel_problem
            .clone()
            .or_else(|| net.problem.clone())
            .unwrap_or_else(|| "not ready".into());
        ("True", "MeshNotReady", format!("mesh: {why}"))
    } else {
        return None;
    };
    (written != Some(want.0)).then_some(want)
}

pub fn annotations(opts: &KubeOptions) -> BTreeMap<String, String> {
    let mut a = BTreeMap::new();
    a.insert(ADDRESS_ANNOTATION.to_string(), opts.advertise.to_string());
    a.insert(PEER_ID_ANNOTATION.to_string(), opts.peer_id.clone());
    if let Some(b) = &opts.backend {
        a.insert(BACKEND_ANNOTATION.to_string(), b.clone());
    }
    a
}

pub async fn publish(
    nodes: &Api<Node>,
    opts: &KubeOptions,
    report: &Report,
    published: &mut Published,
) -> Result<(), kube::Error> {
    let params = PatchParams::default();
    if !published.annotations {
        let patch = json!({ "metadata": { "annotations": annotations(opts) } });
        nodes
            .patch(&opts.node_name, &params, &Patch::Merge(&patch))
            .await?;
        published.annotations = true;
    }
    let Some((status, reason, message)) = desired(
        report.status.node_network.as_ref(),
        opts.backend.as_deref(),
        published.condition.as_deref(),
    ) else {
        return Ok(());
    };
    let now = Timestamp::now().to_string();
    // Strategic merge: conditions merge by `type`, leaving kubelet's own untouched.
    let patch = json!({
        "status": { "conditions": [{
            "type": CONDITION,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now,
            "lastHeartbeatTime": now,
        }]}
    });
    nodes
        .patch_status(&opts.node_name, &params, &Patch::Strategic(&patch))
        .await?;
    tracing::info!(
        condition = CONDITION,
        status,
        reason,
        "set on this node's Node"
    );
    published.condition = Some(status.to_string());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(ready: bool, tunnel_problem: Option<&str>) -> NodeNetworkStatus {
        NodeNetworkStatus {
            bridge: "mesh0".into(),
            ready,
            address: Some("10.32.0.1/12".into()),
            mtu: 1450,
            problem: (!ready).then(|| "no address yet".to_string()),
            tunnel_problem: tunnel_problem.map(String::from),
        }
    }

    #[test]
    fn false_once_ready_and_only_once() {
        let n = net(true, None);
        let (status, reason, message) = desired(Some(&n), Some("vxlan"), None).unwrap();
        assert_eq!((status, reason), ("False", "MeshIsUp"));
        assert!(message.contains("vxlan"), "{message}");
        assert_eq!(desired(Some(&n), Some("vxlan"), Some("False")), None);
    }

    #[test]
    fn nothing_before_first_ready_and_true_when_it_breaks_afterwards() {
        assert_eq!(desired(Some(&net(false, None)), Some("vxlan"), None), None);
        let broken = net(true, Some("route to 10.32.4.0/22 missing"));
        assert_eq!(desired(Some(&broken), Some("vxlan"), None), None);
        let (status, reason, message) =
            desired(Some(&broken), Some("vxlan"), Some("False")).unwrap();
        assert_eq!((status, reason), ("True", "MeshNotReady"));
        assert!(
            message.contains("route to 10.32.4.0/22 missing"),
            "{message}"
        );
    }

    #[test]
    fn no_data_plane_claims_nothing() {
        assert_eq!(desired(None, None, None), None);
        assert_eq!(desired(None, None, Some("False")), None);
    }
}
