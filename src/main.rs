//! The `edge-replicator` binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    edge_replicator::cli::main()
}
