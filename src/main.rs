fn main() -> std::process::ExitCode {
    chgate::cli::main()
}
