//! Runs kubesim standalone, for demos and poking at it with kubectl or curl.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;

/// An in-memory Kubernetes API server simulator (test infrastructure; see the crate README for
/// what it does not do).
#[derive(Debug, Parser)]
#[command(name = "kubesim")]
struct Args {
    /// Port to listen on; 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    bind: IpAddr,
    /// Also write a kubeconfig for the simulator to this path.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let sim = kubesim::KubeSim::start_on(SocketAddr::new(args.bind, args.port)).await?;
    if let Some(path) = &args.kubeconfig {
        std::fs::write(path, sim.kubeconfig_yaml())?;
        eprintln!("kubeconfig written to {}", path.display());
    }
    println!("{}", sim.url());
    tokio::signal::ctrl_c().await?;
    eprintln!("shutting down");
    drop(sim);
    Ok(())
}
