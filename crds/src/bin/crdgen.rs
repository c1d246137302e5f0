//! Writes the Brokkr CRDs into the operator chart, one file per kind.
//!
//! Usage: `cargo run -p brokkr-crds --bin crdgen [OUTPUT_DIR]`
//!
//! OUTPUT_DIR defaults to `charts/brokkr-operator/crds` in the workspace root (the parent of
//! this crate's directory when run through cargo, else the current directory).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let dir = match (args.next(), args.next()) {
        (None, _) => default_dir(),
        (Some(arg), None) if arg == "-h" || arg == "--help" => {
            println!(
                "usage: crdgen [OUTPUT_DIR]  (default: <workspace>/{})",
                brokkr_crds::CHART_CRDS_DIR
            );
            return ExitCode::SUCCESS;
        }
        (Some(dir), None) => PathBuf::from(dir),
        (Some(_), Some(_)) => {
            eprintln!("usage: crdgen [OUTPUT_DIR]");
            return ExitCode::FAILURE;
        }
    };
    match brokkr_crds::write_crd_files(&dir) {
        Ok(written) => {
            for path in written {
                println!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("failed to write CRDs into {}: {err}", dir.display());
            ExitCode::FAILURE
        }
    }
}

/// `<workspace>/charts/brokkr-operator/crds`: cargo sets CARGO_MANIFEST_DIR to this crate's
/// directory, whose parent is the workspace root; without cargo, the current directory.
fn default_dir() -> PathBuf {
    let root = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .and_then(|crate_dir| crate_dir.parent().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("."));
    root.join(brokkr_crds::CHART_CRDS_DIR)
}
