//! `meshctl`: what the mesh looks like from this node. Talks to the local agent's API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use mesh_agent::api::client::{self, ClientError};
use mesh_agent::cli_render as render;
use mesh_proto::api::{
    ConnectionsResponse, IpamStatusResponse, PeersResponse, ReclaimResponse, Report, StatusResponse,
};

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Inspect the mesh from this node")]
struct Cli {
    /// The agent's local API socket.
    #[arg(
        long,
        env = "MESH_SOCKET",
        default_value = "/run/mesh/mesh.sock",
        global = true
    )]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Summary, or one view: peers, connections, ipam.
    Status {
        #[command(subcommand)]
        view: Option<View>,
        /// Output format.
        #[arg(
            short = 'o',
            long = "output",
            value_enum,
            default_value = "table",
            global = true
        )]
        output: Format,
    },
    /// Everything the agent knows, as one JSON document.
    Report,
    /// Move a dead peer's address space to this node (only for peers that are gone for good).
    Rmpeer {
        /// The peer's name (or id).
        name: String,
        /// Also skip reclaim coordinators this node sees down (only when they are gone for good too).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum View {
    /// The whole topology as this node sees it.
    Peers {
        /// Graphviz output (pipe to `dot -Tsvg`).
        #[arg(long)]
        dot: bool,
    },
    /// This node's control connections, with state and reason.
    Connections,
    /// Address shares of the cluster range.
    Ipam,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, ClientError> {
    Ok(serde_json::to_string_pretty(v)? + "\n")
}

async fn run(cli: Cli) -> Result<String, ClientError> {
    let s = &cli.socket;
    match cli.command {
        Command::Report => json(&client::get_json::<Report>(s, "/v1/report").await?),
        Command::Rmpeer { name, force } => {
            let query = if force { "?force=true" } else { "" };
            let path = format!("/v1/peers/{}{query}", client::path_segment(&name));
            let answer: ReclaimResponse = client::send_json(s, "DELETE", &path).await?;
            Ok(format!("{}\n", answer.message))
        }
        Command::Status { view, output } => match view {
            None => {
                let st: StatusResponse = client::get_json(s, "/v1/status").await?;
                if output == Format::Json {
                    json(&st)
                } else {
                    Ok(render::summary(&st))
                }
            }
            Some(View::Peers { dot }) => {
                let p: PeersResponse = client::get_json(s, "/v1/status/peers").await?;
                if dot {
                    Ok(render::peers_dot(&p))
                } else if output == Format::Json {
                    json(&p)
                } else {
                    Ok(render::peers(&p))
                }
            }
            Some(View::Connections) => {
                let c: ConnectionsResponse = client::get_json(s, "/v1/status/connections").await?;
                if output == Format::Json {
                    json(&c)
                } else {
                    Ok(render::connections(&c))
                }
            }
            Some(View::Ipam) => {
                let v: IpamStatusResponse = client::get_json(s, "/v1/status/ipam").await?;
                if output == Format::Json {
                    json(&v)
                } else {
                    Ok(render::ipam(&v))
                }
            }
        },
    }
}
