//! mesh-cni: the CNI plugin (spec 1.1.0; configs of 0.3.0 to 1.1.0 accepted and answered
//! in their own version). It asks the node's mesh-agent for an address over its unix
//! socket and wires the pod to the node bridge with a veth pair. One short-lived process
//! per call: a single-threaded runtime, no daemon state of its own.

mod agent;
mod announce;
mod attach;
mod commands;
mod conf;
mod env;
mod error;
mod install;
mod result;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use error::{CniError, CniResult, INCOMPATIBLE_VERSION, IO_FAILURE};
use serde_json::json;

use crate::env::{CniEnv, Command};

/// Configs are small; refuse anything absurd rather than read it all.
const MAX_STDIN: u64 = 4 << 20;

fn main() {
    // Runtimes call plugins without arguments (CNI_COMMAND says what to do); an argument
    // means a person or the DaemonSet's init container.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.is_empty() {
        std::process::exit(admin(&args));
    }
    let started = Instant::now();
    let mut stdin = Vec::new();
    let read = std::io::stdin()
        .take(MAX_STDIN)
        .read_to_end(&mut stdin)
        .map_err(|e| CniError::new(IO_FAILURE, format!("cannot read stdin: {e}")));
    let mut log_file = None;
    let outcome = read.and_then(|_| run(&stdin, &mut log_file));
    let (code, printed) = match outcome {
        Ok(Some(v)) => (0, Some(v.to_string())),
        Ok(None) => (0, None),
        Err(e) => {
            eprintln!("mesh-cni: {}", e.msg);
            (1, Some(e.to_json(&conf::requested_version(&stdin))))
        }
    };
    if let Some(path) = log_file {
        log_call(&path, code, printed.as_deref(), started);
    }
    if let Some(p) = printed {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{p}");
        let _ = out.flush();
    }
    std::process::exit(code);
}

fn admin(args: &[String]) -> i32 {
    match args[0].as_str() {
        "install" => {
            let outcome = install::parse_args(&args[1..]).and_then(|a| {
                let exe =
                    std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
                install::install(&a, &exe)
            });
            match outcome {
                Ok(paths) => {
                    for p in paths {
                        println!("installed {}", p.display());
                    }
                    0
                }
                Err(e) => {
                    eprintln!("mesh-cni install: {e}");
                    1
                }
            }
        }
        "--version" | "version" => {
            println!("mesh-cni {}", env!("CARGO_PKG_VERSION"));
            0
        }
        _ => {
            eprintln!(
                "mesh-cni is a CNI plugin: runtimes run it with CNI_COMMAND set and the config on stdin.\n{}",
                install::USAGE
            );
            2
        }
    }
}

/// `log_file` is set as soon as the configuration names one, so failures are logged too.
fn run(stdin: &[u8], log_file: &mut Option<PathBuf>) -> CniResult<Option<serde_json::Value>> {
    let env = env::parse(|k| std::env::var(k).ok())?;
    if env.command == Command::Version {
        return Ok(Some(json!({
            "cniVersion": conf::requested_version(stdin),
            "supportedVersions": conf::SUPPORTED_VERSIONS,
        })));
    }
    let conf = conf::parse(stdin)?;
    log_file.clone_from(&conf.log_file);
    let min = match env.command {
        Command::Check => "0.4.0",
        Command::Gc | Command::Status => "1.1.0",
        _ => "0.3.0",
    };
    if !conf::at_least(&conf.cni_version, min) {
        return Err(CniError::new(
            INCOMPATIBLE_VERSION,
            format!(
                "{:?} needs cniVersion {min} or later; the configuration says {}",
                env.command, conf.cni_version
            ),
        ));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(IO_FAILURE, format!("cannot start the runtime: {e}")))?;
    runtime.block_on(dispatch(&env, &conf))
}

async fn dispatch(env: &CniEnv, conf: &conf::NetConf) -> CniResult<Option<serde_json::Value>> {
    match env.command {
        Command::Add => commands::add(env, conf).await.map(Some),
        Command::Del => commands::del(env, conf).await.map(|_| None),
        Command::Check => commands::check(env, conf).await.map(|_| None),
        Command::Gc => commands::gc(conf).await.map(|_| None),
        Command::Status => commands::status(conf).await.map(|_| None),
        Command::Version => Ok(None),
    }
}

/// With `logFile` set, one JSON line per call (best effort: logging never fails a call).
fn log_call(path: &Path, code: i32, printed: Option<&str>, started: Instant) {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let line = json!({
        "time_unix_ms": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        "command": var("CNI_COMMAND"),
        "container_id": var("CNI_CONTAINERID"),
        "ifname": var("CNI_IFNAME"),
        "netns": var("CNI_NETNS"),
        "exit": code,
        "took_ms": started.elapsed().as_secs_f64() * 1e3,
        "output": printed.and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok()),
    });
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}
