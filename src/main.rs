use std::process::ExitCode;

fn main() -> ExitCode {
    sidekey::cli::main()
}
