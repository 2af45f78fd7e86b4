use clap::Parser;

fn main() -> anyhow::Result<()> {
    qtune::tune_allocator();
    qtune::cli::main(qtune::cli::Cli::parse())
}
