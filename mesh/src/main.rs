use std::process::ExitCode;

use clap::Parser;

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = dstack_mesh::cli::Cli::parse();
    dstack_mesh::logging::init(cli.log_format);
    ratls::crypto::install_default();
    let runtime = match dstack_mesh::runtime::build() {
        Ok((rt, _)) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(71);
        }
    };
    runtime.block_on(dstack_mesh::cli::run(cli))
}
