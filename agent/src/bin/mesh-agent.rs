//! `mesh-agent`: the node daemon. See `mesh-agent --help` and ARCHITECTURE.md.

use std::process::ExitCode;

use clap::Parser;
use mesh_agent::config::{AgentCommand, AgentConfig, StoreCommand};

fn main() -> ExitCode {
    let cfg = AgentConfig::parse();
    if let Some(AgentCommand::Store(cmd)) = &cfg.command {
        return store_command(&cfg, cmd);
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mesh-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(mesh_agent::agent::run(cfg));
    // A firewall command still running on a blocking thread (a hung nft or iptables) must
    // not keep the process alive after it was told to stop.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("mesh-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `mesh-agent store inspect|repair`: synchronous, no runtime, no logging setup needed.
fn store_command(cfg: &AgentConfig, cmd: &StoreCommand) -> ExitCode {
    let dir = &cfg.state_dir;
    if let StoreCommand::Repair { discard } = cmd {
        match mesh_agent::store::repair(dir, discard) {
            Ok(done) => done.iter().for_each(|d| println!("{d}")),
            Err(e) => {
                eprintln!("mesh-agent store repair: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    match mesh_agent::store::inspect(dir) {
        Ok(ins) => {
            print!("{}", ins.render());
            if ins.findings.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("mesh-agent store inspect: {e}");
            ExitCode::FAILURE
        }
    }
}
