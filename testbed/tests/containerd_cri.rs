//! A real CNI client: Debian's containerd (with runc) configured with our plugin and conf
//! dirs runs pod sandboxes through the CRI API (a small tonic client; crictl is not
//! packaged in Debian bookworm) with a locally built pause image, no registry. Checks
//! that sandboxes get mesh addresses, reach each other and the node, and that stop +
//! remove release their allocations. Root only; skips loudly without it, fails under
//! MESH_E2E=1.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    LinuxPodSandboxConfig, PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StatusRequest, StopPodSandboxRequest,
    VersionRequest,
};
use mesh_testbed::bed::run;
use mesh_testbed::{gate, privns, probe, AgentOptions, Testbed};
use serde_json::Value;
use tonic::transport::{Channel, Endpoint, Uri};

const NODE: usize = 0;
const PAUSE_IMAGE: &str = "registry.local/mesh-test/pause:1";
const SANDBOXES: usize = 3;

fn main() {
    if !gate::e2e_allowed("mesh-cni under containerd (CRI)") {
        return;
    }
    let missing: Vec<&str> = ["containerd", "runc", "ctr", "nsenter", "gcc"]
        .into_iter()
        .filter(|t| !gate::on_path(t))
        .collect();
    if !missing.is_empty() {
        panic!(
            "containerd test needs {}: apt-get install containerd runc util-linux gcc libc6-dev",
            missing.join(", ")
        );
    }
    if let Err(e) = privns::enter_private_mounts() {
        panic!("cannot set up a private mount namespace: {e:#}");
    }
    let mut tb = Testbed::new("cr").unwrap_or_else(|e| panic!("testbed: {e:#}"));
    let mut containerd: Option<Child> = None;
    let outcome = scenario(&mut tb, &mut containerd);
    if let Some(mut c) = containerd.take() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    kill_leftover_shims(&tb.work.join("containerd/containerd.sock"));
    // containerd's shm and rootfs mounts live in our private mount namespace only.
    let _ = Command::new("umount")
        .args(["-R", "-l"])
        .arg(tb.work.join("containerd"))
        .stderr(Stdio::null())
        .status();
    if let Err(e) = &outcome {
        println!("FAILED: {e:#}");
        println!("{}", tb.logs(30));
        let log = tb.work.join("containerd/containerd.log");
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        println!("---- containerd log (last 30 lines)");
        for l in &lines[lines.len().saturating_sub(30)..] {
            println!("{l}");
        }
    }
    tb.down();
    if outcome.is_err() {
        std::process::exit(1);
    }
    println!("containerd CRI end-to-end: ok");
}

/// Sandbox shims (`containerd-shim-runc-v2 … -address <our socket>`) outlive containerd
/// by design; after a failure some may remain. They are ours: they name our socket.
fn kill_leftover_shims(socket: &Path) {
    let needle = socket.display().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("containerd-shim") && cmdline.contains(&needle) {
            println!("killing leftover shim {pid}: {cmdline}");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn scenario(tb: &mut Testbed, containerd: &mut Option<Child>) -> Result<()> {
    tb.add_node(&AgentOptions {
        ipalloc_init: Some("consensus=1".into()),
        ..AgentOptions::default()
    })?;
    tb.start_agent(NODE)?;
    tb.wait_ready(NODE, Duration::from_secs(20))?;
    let w = tb.work.join("containerd");
    let cni_log = prepare_cni_dirs(tb, &w)?;
    let image = build_pause_image(&w)?;
    *containerd = Some(start_containerd(tb, &w)?);
    let socket = w.join("containerd.sock");
    run(
        "ctr",
        &[
            "-a",
            &socket.display().to_string(),
            "-n",
            "k8s.io",
            "images",
            "import",
            &image.display().to_string(),
        ],
    )?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(cri_scenario(tb, &socket, &w, &cni_log))
}

/// CNI bin dir (mesh-cni + the reference plugins containerd and the conflist need) and
/// conf dir holding deploy/10-mesh.conflist pointed at this node's agent.
fn prepare_cni_dirs(tb: &Testbed, w: &Path) -> Result<PathBuf> {
    let bin = w.join("cni/bin");
    let conf = w.join("cni/net.d");
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(&conf)?;
    std::os::unix::fs::symlink(tb.bin("mesh-cni"), bin.join("mesh-cni"))?;
    for p in ["loopback", "portmap", "bandwidth"] {
        let src = Path::new(mesh_testbed::bed::REFERENCE_PLUGINS).join(p);
        ensure!(
            src.is_file(),
            "{} missing: apt-get install containernetworking-plugins",
            src.display()
        );
        std::os::unix::fs::symlink(src, bin.join(p))?;
    }
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/10-mesh.conflist");
    let mut list: Value = serde_json::from_str(&std::fs::read_to_string(&shipped)?)
        .with_context(|| format!("{} is not JSON", shipped.display()))?;
    let log = w.join("cni/calls.log");
    list["plugins"][0]["agentSocket"] = tb.nodes[NODE].socket.display().to_string().into();
    list["plugins"][0]["logFile"] = log.display().to_string().into();
    std::fs::write(
        conf.join("10-mesh.conflist"),
        serde_json::to_vec_pretty(&list)?,
    )?;
    Ok(log)
}

/// A static `pause` (C, built here) in an OCI image-layout tarball: no registry, no pulls.
fn build_pause_image(w: &Path) -> Result<PathBuf> {
    let dir = w.join("pause");
    std::fs::create_dir_all(&dir)?;
    let src = dir.join("pause.c");
    std::fs::write(
        &src,
        r#"/* pause: sleep until SIGINT/SIGTERM, reaping children (the sandbox's init). */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void stop(int s) { (void)s; _exit(0); }
static void reap(int s) { (void)s; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
    signal(SIGINT, stop);
    signal(SIGTERM, stop);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
"#,
    )?;
    let bin = dir.join("pause");
    run(
        "gcc",
        &[
            "-Os",
            "-static",
            "-s",
            "-o",
            &bin.display().to_string(),
            &src.display().to_string(),
        ],
    )
    .context("building the static pause binary (needs libc6-dev)")?;
    let sha = |b: &[u8]| -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, b);
        d.as_ref().iter().map(|x| format!("{x:02x}")).collect()
    };
    let tar_of = |files: &[(&str, &[u8], u32)]| -> Result<Vec<u8>> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data, mode) in files {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, name, *data)?;
        }
        Ok(b.into_inner()?)
    };
    let pause = std::fs::read(&bin)?;
    let layer = tar_of(&[("pause", &pause, 0o755)])?;
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        "os": "linux",
        "config": {"Entrypoint": ["/pause"], "WorkingDir": "/", "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha(&layer))]},
    }))?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{}", sha(&config)), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": format!("sha256:{}", sha(&layer)), "size": layer.len()}],
    }))?;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": format!("sha256:{}", sha(&manifest)), "size": manifest.len(),
                       "annotations": {"io.containerd.image.name": PAUSE_IMAGE,
                                       "org.opencontainers.image.ref.name": "1"}}],
    }))?;
    let blobs: Vec<(String, &[u8])> = [&config[..], &manifest[..], &layer[..]]
        .into_iter()
        .map(|b| (format!("blobs/sha256/{}", sha(b)), b))
        .collect();
    let mut files: Vec<(&str, &[u8], u32)> = vec![
        ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, 0o644),
        ("index.json", &index, 0o644),
    ];
    for (name, b) in &blobs {
        files.push((name, b, 0o644));
    }
    let out = dir.join("pause-oci.tar");
    std::fs::write(&out, tar_of(&files)?)?;
    Ok(out)
}

/// containerd in the node's network namespace (so its CNI calls and pods are on that
/// node), everything under the test's work dir. It dies with this process.
fn start_containerd(tb: &Testbed, w: &Path) -> Result<Child> {
    let config = format!(
        r#"version = 2
root = "{w}/lib"
state = "{w}/run"
disabled_plugins = ["io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{w}/containerd.sock"
[ttrpc]
  address = "{w}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{w}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  # Without CAP_SYS_RESOURCE runc cannot set a negative oom_score_adj.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{w}/cni/bin"
    conf_dir = "{w}/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"#,
        w = w.display()
    );
    std::fs::write(w.join("config.toml"), config)?;
    let log = std::fs::File::create(w.join("containerd.log"))?;
    let mut cmd = Command::new("nsenter");
    // `ip netns exec` would remount /sys and hide the cgroup mounts runc needs.
    cmd.arg(format!("--net=/run/netns/{}", tb.nodes[NODE].netns))
        .arg("containerd")
        .arg("--config")
        .arg(w.join("config.toml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    mesh_testbed::bed::die_with_parent(&mut cmd);
    let child = cmd.spawn().context("spawn containerd")?;
    let socket = w.join("containerd.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let ok = Command::new("ctr")
            .args(["-a", &socket.display().to_string(), "version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(child);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("containerd did not serve within 30 s")
}

async fn cri_channel(socket: &Path) -> Result<Channel> {
    let socket = socket.to_path_buf();
    // tonic wants a URI; the connector ignores it and dials the unix socket.
    Ok(Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await?)
}

/// (container id, netns) of every mesh-cni ADD containerd made, from the plugin's logFile.
fn cni_calls(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

async fn cri_scenario(tb: &Testbed, socket: &Path, w: &Path, cni_log: &Path) -> Result<()> {
    let mut rt = RuntimeServiceClient::new(cri_channel(socket).await?);
    let v = rt
        .version(VersionRequest {
            version: "v1".into(),
        })
        .await?
        .into_inner();
    println!(
        "runtime {} {} (CRI {})",
        v.runtime_name, v.runtime_version, v.runtime_api_version
    );
    // The CRI reports NetworkReady once it has loaded our conflist.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let st = rt
            .status(StatusRequest { verbose: false })
            .await?
            .into_inner();
        let net = st
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.r#type == "NetworkReady"))
            .cloned();
        if net.as_ref().is_some_and(|c| c.status) {
            break;
        }
        if Instant::now() > deadline {
            bail!("containerd never reported NetworkReady: {net:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let logs = w.join("podlogs");
    std::fs::create_dir_all(&logs)?;
    let mut sandboxes = Vec::new();
    for i in 0..SANDBOXES {
        let cfg = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: format!("web-{i}"),
                uid: format!("uid-web-{i}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: format!("web-{i}"),
            log_directory: logs.display().to_string(),
            linux: Some(LinuxPodSandboxConfig::default()),
            ..Default::default()
        };
        let started = Instant::now();
        let id = rt
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(cfg),
                runtime_handler: String::new(),
            })
            .await
            .map_err(|s| anyhow!("RunPodSandbox web-{i}: {s}"))?
            .into_inner()
            .pod_sandbox_id;
        let status = rt
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .context("no sandbox status")?;
        let ip: Ipv4Addr = status
            .network
            .as_ref()
            .map(|n| n.ip.clone())
            .unwrap_or_default()
            .parse()
            .with_context(|| {
                format!("sandbox web-{i} has no IPv4 address: {:?}", status.network)
            })?;
        ensure!(
            u32::from(ip) & 0xfff0_0000 == u32::from(Ipv4Addr::new(10, 32, 0, 0)),
            "sandbox web-{i} got {ip}, outside 10.32.0.0/12"
        );
        println!(
            "sandbox web-{i} {} ip {ip} ready in {:.0?}",
            &id[..12],
            started.elapsed()
        );
        sandboxes.push((id, ip));
    }
    // Each sandbox's netns, as containerd passed it to mesh-cni.
    let calls = cni_calls(cni_log);
    let netns_of = |id: &str| -> Result<String> {
        calls
            .iter()
            .find(|c| c["command"] == "ADD" && c["container_id"] == id && c["exit"] == 0)
            .and_then(|c| c["netns"].as_str().map(str::to_string))
            .with_context(|| format!("no successful mesh-cni ADD logged for {id}"))
    };
    let node_ns = tb.nodes[NODE].netns.clone();
    for (a, a_ip) in &sandboxes {
        let a_ns = netns_of(a)?;
        for (_, b_ip) in &sandboxes {
            if a_ip == b_ip {
                continue;
            }
            let ok = Command::new("nsenter")
                .arg(format!("--net={a_ns}"))
                .args(["ping", "-c", "1", "-W", "2", &b_ip.to_string()])
                .stdout(Stdio::null())
                .status()?
                .success();
            ensure!(ok, "sandbox {a_ip} cannot ping sandbox {b_ip}");
        }
        ensure!(
            tb.ns_output(&node_ns, &["ping", "-c", "1", "-W", "2", &a_ip.to_string()])?
                .status
                .success(),
            "the node cannot ping sandbox {a_ip}"
        );
    }
    let allocated = |tb: &Testbed| -> Result<Vec<String>> {
        let v = probe::agent_get(&tb.nodes[NODE].socket, "/v1/allocations")?;
        Ok(v["allocations"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|a| a["container_id"].as_str().map(str::to_string))
            .collect())
    };
    let before = allocated(tb)?;
    for (id, _) in &sandboxes {
        ensure!(
            before.contains(id),
            "agent has no allocation for sandbox {id}"
        );
    }
    for (id, ip) in &sandboxes {
        rt.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .map_err(|s| anyhow!("StopPodSandbox {ip}: {s}"))?;
        rt.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .map_err(|s| anyhow!("RemovePodSandbox {ip}: {s}"))?;
    }
    let after = allocated(tb)?;
    for (id, ip) in &sandboxes {
        ensure!(
            !after.contains(id),
            "allocation of removed sandbox {ip} was not released"
        );
    }
    let links = tb.ns(&node_ns, &["ip", "-o", "link", "show"])?;
    let left: Vec<String> = String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter(|l| l.contains("vmesh"))
        .map(str::to_string)
        .collect();
    ensure!(left.is_empty(), "veths left after remove: {left:?}");
    let calls = cni_calls(cni_log);
    let count = |cmd: &str| calls.iter().filter(|c| c["command"] == cmd).count();
    let failed: Vec<&Value> = calls.iter().filter(|c| c["exit"] != 0).collect();
    ensure!(
        failed.is_empty(),
        "containerd saw failing mesh-cni calls: {failed:?}"
    );
    let adds: Vec<f64> = calls
        .iter()
        .filter(|c| c["command"] == "ADD")
        .filter_map(|c| c["took_ms"].as_f64())
        .collect();
    println!(
        "mesh-cni calls from containerd: ADD {} DEL {} (ADD took {:?} ms)",
        count("ADD"),
        count("DEL"),
        adds.iter()
            .map(|t| (t * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    ensure!(count("ADD") == SANDBOXES, "expected {SANDBOXES} ADDs");
    ensure!(
        count("DEL") >= SANDBOXES,
        "expected a DEL per sandbox at least"
    );
    Ok(())
}
