//! The success result (`interfaces`, `ips`, `routes`, `dns`) in each spec version's shape,
//! merged onto a `prevResult` when mesh-cni is not first in a chain.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::conf::at_least;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default)]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

/// A result as far as mesh-cni reads one (unknown keys of other plugins are kept by
/// `render_onto`, which works on the raw JSON).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CniOutput {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Value>,
}

impl CniOutput {
    pub fn from_value(v: &Value) -> Option<CniOutput> {
        serde_json::from_value(v.clone()).ok()
    }

    /// This result on top of `prev` (if any), in `version`'s shape: prev's entries first
    /// and untouched, ours appended with interface indexes shifted past prev's.
    pub fn render_onto(&self, prev: Option<&Value>, version: &str) -> Value {
        let mut out: Map<String, Value> =
            prev.and_then(Value::as_object).cloned().unwrap_or_default();
        let list = |out: &mut Map<String, Value>, key: &str| -> Vec<Value> {
            out.remove(key)
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default()
        };
        let mut interfaces = list(&mut out, "interfaces");
        let mut ips = list(&mut out, "ips");
        let mut routes = list(&mut out, "routes");
        let offset = interfaces.len();
        for i in &self.interfaces {
            let mut v = json!({"name": i.name, "mac": i.mac});
            if let Some(s) = &i.sandbox {
                v["sandbox"] = json!(s);
            }
            if let (Some(mtu), true) = (i.mtu, at_least(version, "1.1.0")) {
                v["mtu"] = json!(mtu);
            }
            interfaces.push(v);
        }
        for ip in &self.ips {
            let mut v = json!({"address": ip.address});
            if let Some(g) = &ip.gateway {
                v["gateway"] = json!(g);
            }
            if let Some(i) = ip.interface {
                v["interface"] = json!(i + offset);
            }
            ips.push(v);
        }
        for r in &self.routes {
            let mut v = json!({"dst": r.dst});
            if let Some(gw) = &r.gw {
                v["gw"] = json!(gw);
            }
            routes.push(v);
        }
        // Before 1.0.0 every IP entry carried its family.
        for ip in &mut ips {
            if let Some(o) = ip.as_object_mut() {
                if at_least(version, "1.0.0") {
                    o.remove("version");
                } else if !o.contains_key("version") {
                    let v4 = o
                        .get("address")
                        .and_then(Value::as_str)
                        .is_some_and(|a| !a.contains(':'));
                    o.insert("version".into(), json!(if v4 { "4" } else { "6" }));
                }
            }
        }
        if !at_least(version, "1.1.0") {
            for i in &mut interfaces {
                if let Some(o) = i.as_object_mut() {
                    o.remove("mtu");
                    o.remove("socketPath");
                    o.remove("pciID");
                }
            }
        }
        out.insert("cniVersion".into(), json!(version));
        out.insert("interfaces".into(), Value::Array(interfaces));
        out.insert("ips".into(), Value::Array(ips));
        out.insert("routes".into(), Value::Array(routes));
        if !out.contains_key("dns") {
            out.insert("dns".into(), self.dns.clone().unwrap_or_else(|| json!({})));
        }
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours() -> CniOutput {
        CniOutput {
            interfaces: vec![
                Interface {
                    name: "mesh0".into(),
                    mac: "0a:6d:00:00:00:01".into(),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:02".into(),
                    mtu: Some(1450),
                    sandbox: Some("/run/netns/p".into()),
                },
            ],
            ips: vec![IpConfig {
                address: "10.32.0.2/12".into(),
                gateway: Some("10.32.0.1".into()),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".into(),
                gw: Some("10.32.0.1".into()),
            }],
            dns: None,
        }
    }

    #[test]
    fn shapes_per_version() {
        let v11 = ours().render_onto(None, "1.1.0");
        assert_eq!(v11["interfaces"][1]["mtu"], 1450);
        assert!(v11["ips"][0].get("version").is_none());
        assert_eq!(v11["ips"][0]["interface"], 1);
        let v10 = ours().render_onto(None, "1.0.0");
        assert!(v10["interfaces"][1].get("mtu").is_none());
        let v04 = ours().render_onto(None, "0.4.0");
        assert_eq!(v04["ips"][0]["version"], "4");
        assert_eq!(v04["cniVersion"], "0.4.0");
        assert_eq!(v04["dns"], json!({}));
    }

    #[test]
    fn appended_after_a_previous_plugin_with_its_keys_kept() {
        let prev = json!({"cniVersion":"1.0.0","interfaces":[{"name":"x","mac":"m","custom":1}],
                          "ips":[{"address":"192.168.0.2/24","interface":0}],"dns":{"nameservers":["1.1.1.1"]}});
        let v = ours().render_onto(Some(&prev), "1.0.0");
        assert_eq!(v["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(v["interfaces"][0]["custom"], 1);
        assert_eq!(v["ips"][1]["interface"], 2);
        assert_eq!(v["dns"]["nameservers"][0], "1.1.1.1");
    }

    #[test]
    fn prev_result_reads_leniently() {
        let v = ours().render_onto(None, "0.4.0");
        let back = CniOutput::from_value(&v).unwrap();
        assert_eq!(back.ips[0].address, "10.32.0.2/12");
        assert_eq!(back.interfaces[1].sandbox.as_deref(), Some("/run/netns/p"));
    }
}
