//! The `poolkeeper` binary: parses arguments and hands over to the library.

fn main() -> std::process::ExitCode {
    poolkeeper::cli::main()
}
